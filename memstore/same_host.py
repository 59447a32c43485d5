"""The same-host fast path: which host this is, and which table files a client may map in place.

The daemon advertises its host id and its table's files (path, device, inode) in Describe; a
client whose host id matches and whose `os.stat` of each path finds the very same file (a
container with another mount namespace would not) opens the table read-only and gathers in its
own process. Rows are then as in-process as they can be: no serialisation, no socket.

A trainable table also advertises its sequence-lock file: the client reads rows the way the
daemon does (memstore.tabledir.seqlock.consistent_gather), so a push never tears a row it reads, and gives
up to gRPC for a call when pushes keep overlapping its reads. That protocol needs a CPU that
keeps loads and stores in order (x86-64); elsewhere a trainable table is read over gRPC.

A daemon with a row cache (memstore.rowcache) advertises its shared-memory file instead: the client
copies the rows it holds (each checked by its slot's sequence word) and asks the daemon for the rest
over gRPC, so the table's files are never read here (that would fill the page cache the row cache
keeps them out of) and every miss warms the cache for every client. The same CPU requirement holds.

Decoding asks for a few dozen rows per token, so a lookup's fixed cost matters as much as its copy: each
layer's store and row view are looked up once (`_Layer`), ids are checked with one pass (the daemon's
check, and its message, only when that pass finds a bad id) and rows are copied straight from the map.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import numpy as np

from memstore.errors import TableFormatError
from memstore.rowcache import RowCache, RowCacheReader
from memstore.storage.base import RowStore
from memstore.storage.mmap_store import MmapRowStore
from memstore.table import Table
from memstore.tabledir.manifest import Backend
from memstore.tabledir.seqlock import SeqLock, consistent_gather
from memstore.wire import memstore_pb2 as pb

_ORDERED_MEMORY = platform.machine().lower() in {"x86_64", "amd64"}

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_INT64 = np.dtype(np.int64)
_UINT64 = np.dtype(np.uint64)


def host_id() -> str:
    """Hostname plus the kernel's boot id (changes on reboot; equal for processes of one host)."""
    boot = _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else ""
    return f"{socket.gethostname()}/{boot}"


def advertise(table: Table, seqlock: SeqLock | None, row_cache: RowCache | None = None) -> pb.SameHostAccess | None:
    """What the daemon tells clients so those on its host can map `table`'s files, read under
    `seqlock` when the table is trained (None for an LMDB table: LMDB allows one open of an
    environment per process, and a same-host client may be the daemon's own process), or
    `row_cache`'s shared file when it has one."""
    if table.manifest.backend is not Backend.MMAP:
        return None
    files = []
    for layer_id in table.manifest.layout.layer_ids:
        path = (table.path / table.manifest.layer_file(layer_id)).resolve()
        stat = path.stat()
        files.append(pb.LayerFile(layer_id=layer_id, path=str(path), device=stat.st_dev, inode=stat.st_ino))
    seqlock_path = str(seqlock.path.resolve()) if seqlock is not None else ""
    cache = None
    if row_cache is not None:
        cache = pb.RowCacheFile(path=str(row_cache.path), device=row_cache.device, inode=row_cache.inode)
    return pb.SameHostAccess(
        host_id=host_id(), table_dir=str(table.path.resolve()), files=files, seqlock_path=seqlock_path, row_cache=cache
    )


class _Layer:
    """One layer of the mapped table as a lookup reads it, found once: `check` gives the daemon's ids and
    errors, `gather` copies rows of checked ids (RowStore.gather without checking them again).

    A plain mapped layer is read as one opaque item per row, one memcpy per row; an unsharded table's ids
    are checked in one pass (a shard's go through the table: its partitions map ids to its rows). A lazy
    table (rows generated until written) is read through the table.
    """

    __slots__ = ("store", "_table", "_layer_id", "_num_rows", "_one_pass", "_items", "_row_type", "_as_rows")

    def __init__(self, table: Table, layer_id: int) -> None:
        self.store: RowStore = table.store(layer_id)  # InvalidArgumentError for a layer the table lacks
        self._table = table
        self._layer_id = layer_id
        self._num_rows = self.store.num_rows
        rows = self.store.plain_rows if isinstance(self.store, MmapRowStore) else None  # [num_rows, width]
        self._one_pass = rows is not None and table.manifest.sharding is None
        self._items: np.ndarray | None = None
        if rows is not None:
            self._row_type = np.dtype((np.void, rows.shape[1] * rows.itemsize))
            self._items = rows.view(self._row_type).reshape(len(rows))  # [num_rows] opaque rows
            # Viewing [N] opaque rows as this subarray type gives [N, width] values without a copy.
            self._as_rows = np.dtype((rows.dtype, (rows.shape[1],)))

    def check(self, row_ids: np.ndarray) -> np.ndarray:
        """`row_ids` as checked indices into the store; InvalidArgumentError as the daemon words it."""
        if self._one_pass and type(row_ids) is np.ndarray and row_ids.dtype == _INT64 and row_ids.ndim == 1:
            unsigned = row_ids.view(_UINT64)  # a negative id reads as one past every row: one pass checks both ends
            if len(unsigned) and unsigned.item(unsigned.argmax()) < self._num_rows:
                return row_ids
        return self._table.local_ids(self._layer_id, row_ids)  # the daemon's check, and its error message

    def gather(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [len(ids), width] of ids from `check` (into `out` if given, checked as RowStore checks it)."""
        if self._items is None:
            return self.store.gather(ids, out)
        if out is None:
            return self._items.take(ids).view(self._as_rows)  # [len(ids), width]
        self.store.check_out(out, len(ids))
        # mode="clip": ids are checked, and the default mode buffers the whole result when `out` is given.
        self._items.take(ids, out=out.view(self._row_type).reshape(len(ids)), mode="clip")
        return out


class SameHostReader:
    """The daemon's table mapped read-only in this process, read under its sequence lock if trained;
    or, with `row_cache`, the daemon's row cache mapped read-only (`gather_cached`).

    `max_rows_per_request` is the daemon's limit (from the same Describe), which the client applies to
    the rows the wire would have carried (None: none known).
    """

    def __init__(
        self,
        table: Table,
        seqlock: SeqLock | None,
        frozen_version: int = 0,
        row_cache: RowCacheReader | None = None,
        max_rows_per_request: int | None = None,
    ) -> None:
        self.table = table
        self.manifest = table.manifest
        self.seqlock = seqlock
        self.frozen_version = frozen_version
        self.row_cache = row_cache
        self.max_rows_per_request = max_rows_per_request
        self._row_bytes = table.manifest.dtype.row_bytes(table.manifest.layout.dim)
        self._layers: dict[int, _Layer] = {}
        # Rows copied from the daemon's row cache here, and rows it lacked (asked of the daemon): the
        # daemon's own counters do not see this client's hits.
        self.cache_hits = 0
        self.cache_misses = 0

    def gather_cached(
        self, layer_id: int, row_ids: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(rows, which of them the daemon's row cache did not hold (left for the caller to fetch),
        a version every copied row shows at least). Only with a row cache."""
        assert self.row_cache is not None
        layer = self.layer(layer_id)
        ids = layer.check(row_ids)
        dim = layer.store.dim
        rows = np.empty((len(ids), dim), dtype=self.manifest.dtype.numpy) if out is None else out
        # Read before the copies: a slot written since holds a row of a later version.
        version = self.frozen_version if self.seqlock is None else self.seqlock.read() // 2
        missed = self.row_cache.lookup(layer_id, ids, rows.view(np.uint8).reshape(len(ids), self._row_bytes))
        misses = int(missed.sum())
        self.cache_hits += len(ids) - misses  # a race between threads may lose a count: these are statistics
        self.cache_misses += misses
        return rows, missed, version

    def gather(
        self, layer_id: int, row_ids: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, int] | None:
        """(rows as the daemon would return them, the version they show), or None when pushes
        kept overlapping the read. A frozen table's version is the one it was served at."""
        layer = self.layer(layer_id)
        return consistent_gather(layer, self.seqlock, layer.check(row_ids), out, self.frozen_version)

    def layer(self, layer_id: int) -> _Layer:
        """One layer's reader, made on its first lookup; InvalidArgumentError for a layer the table lacks."""
        layer = self._layers.get(layer_id)
        if layer is None:  # two threads may both make one: either is as good
            layer = self._layers[layer_id] = _Layer(self.table, layer_id)
        return layer

    def close(self) -> None:
        self._layers = {}
        self.table.close()
        if self.seqlock is not None:
            self.seqlock.close()
        if self.row_cache is not None:
            self.row_cache.close()


def open_if_same_host(
    access: pb.SameHostAccess, fingerprint: str, version: int = 0, max_rows_per_request: int | None = None
) -> SameHostReader | None:
    """The daemon's table opened read-only in this process, or None when it is not the same table here
    (or it is trained and this CPU does not keep memory accesses in order). `max_rows_per_request` is the
    daemon's limit, kept with the reader for the client to apply."""
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
    cache = None
    if access.HasField("row_cache"):
        if not _ORDERED_MEMORY:  # the slots' sequence words need loads and stores kept in order
            table.close()
            if seqlock is not None:
                seqlock.close()
            return None
        file = access.row_cache
        try:
            cache = RowCacheReader(
                Path(file.path), file.device, file.inode, table.manifest.dtype.row_bytes(table.manifest.layout.dim)
            )
        except (OSError, TableFormatError):
            table.close()
            if seqlock is not None:
                seqlock.close()
            return None
    return SameHostReader(table, seqlock, version, cache, max_rows_per_request)
