"""The same-host fast path: which host this is, and which table files a client may map in place.

The daemon advertises its host id and its table's files (path, device, inode) in Describe; a
client whose host id matches and whose `os.stat` of each path finds the very same file (a
container with another mount namespace would not) opens the table read-only and gathers in its
own process. Rows are then as in-process as they can be: no serialisation, no socket.

A trainable table also advertises its sequence-lock file: the client reads rows the way the
daemon does (memstore.tabledir.seqlock.consistent_gather), so a push never tears a row it reads, and gives
up to gRPC for a call when pushes keep overlapping its reads. That protocol needs a CPU that
keeps loads and stores in order (x86-64); elsewhere a trainable table is read over gRPC.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import numpy as np

from memstore.table import Table
from memstore.tabledir.manifest import Backend
from memstore.tabledir.seqlock import SeqLock, consistent_gather
from memstore.wire import memstore_pb2 as pb

_ORDERED_MEMORY = platform.machine().lower() in {"x86_64", "amd64"}

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def host_id() -> str:
    """Hostname plus the kernel's boot id (changes on reboot; equal for processes of one host)."""
    boot = _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else ""
    return f"{socket.gethostname()}/{boot}"


def advertise(table: Table, seqlock: SeqLock | None) -> pb.SameHostAccess | None:
    """What the daemon tells clients so those on its host can map `table`'s files, read under
    `seqlock` when the table is trained (None for an LMDB table: LMDB allows one open of an
    environment per process, and a same-host client may be the daemon's own process)."""
    if table.manifest.backend is not Backend.MMAP:
        return None
    files = []
    for layer_id in table.manifest.layout.layer_ids:
        path = (table.path / table.manifest.layer_file(layer_id)).resolve()
        stat = path.stat()
        files.append(pb.LayerFile(layer_id=layer_id, path=str(path), device=stat.st_dev, inode=stat.st_ino))
    seqlock_path = str(seqlock.path.resolve()) if seqlock is not None else ""
    return pb.SameHostAccess(
        host_id=host_id(), table_dir=str(table.path.resolve()), files=files, seqlock_path=seqlock_path
    )


class SameHostReader:
    """The daemon's table mapped read-only in this process, read under its sequence lock if trained."""

    def __init__(self, table: Table, seqlock: SeqLock | None, frozen_version: int = 0) -> None:
        self.table = table
        self.manifest = table.manifest
        self.seqlock = seqlock
        self.frozen_version = frozen_version

    def gather(
        self, layer_id: int, row_ids: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, int] | None:
        """(rows as the daemon would return them, the version they show), or None when pushes
        kept overlapping the read. A frozen table's version is the one it was served at."""
        ids = self.table.local_ids(layer_id, row_ids)
        return consistent_gather(self.table.store(layer_id), self.seqlock, ids, out, self.frozen_version)

    def close(self) -> None:
        self.table.close()
        if self.seqlock is not None:
            self.seqlock.close()


def open_if_same_host(access: pb.SameHostAccess, fingerprint: str, version: int = 0) -> SameHostReader | None:
    """The daemon's table opened read-only in this process, or None when it is not the same table here
    (or it is trained and this CPU does not keep memory accesses in order)."""
    if not access.host_id or access.host_id != host_id():
        return None
    if access.seqlock_path and not _ORDERED_MEMORY:
        return None
    try:
        for file in access.files:
            stat = os.stat(file.path)
            if (stat.st_dev, stat.st_ino) != (file.device, file.inode):
                return None
        table = Table.open(access.table_dir, read_only=True)
    except OSError:
        return None
    if table.manifest.fingerprint != fingerprint:
        table.close()
        return None
    try:
        seqlock = SeqLock(Path(access.seqlock_path)) if access.seqlock_path else None
    except OSError:
        table.close()
        return None
    return SameHostReader(table, seqlock, version)
