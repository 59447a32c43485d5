"""The same-host fast path: which host this is, and which table files a client may map in place.

The daemon advertises its host id and its table's files (path, device, inode) in Describe; a
client whose host id matches and whose `os.stat` of each path finds the very same file (a
container with another mount namespace would not) opens the table read-only and gathers in its
own process. Rows are then as in-process as they can be: no serialisation, no socket.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from memstore.table import Table
from memstore.wire import memstore_pb2 as pb

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def host_id() -> str:
    """Hostname plus the kernel's boot id (changes on reboot; equal for processes of one host)."""
    boot = _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else ""
    return f"{socket.gethostname()}/{boot}"


def advertise(table: Table) -> pb.SameHostAccess:
    """What the daemon tells clients so those on its host can map the table's files."""
    files = []
    for layer_id in table.manifest.layout.layer_ids:
        path = (table.path / table.manifest.layer_file(layer_id)).resolve()
        stat = path.stat()
        files.append(pb.LayerFile(layer_id=layer_id, path=str(path), device=stat.st_dev, inode=stat.st_ino))
    return pb.SameHostAccess(host_id=host_id(), table_dir=str(table.path.resolve()), files=files)


def open_if_same_host(access: pb.SameHostAccess, fingerprint: str) -> Table | None:
    """The daemon's table opened read-only in this process, or None when it is not the same table here."""
    if not access.host_id or access.host_id != host_id():
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
    return table
