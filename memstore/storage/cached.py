"""A row store behind the daemon's row cache (memstore.rowcache): hits from DRAM, misses from the store.

`CachedRowStore` wraps a layer's store and keeps the store the source of truth: an update writes the
store, then the resident copies (write-through), so a cached row is never older than the file, and
snapshots, checksums and flushes go to the store unchanged. Misses of an eager mmap store are read
with batched positioned reads kept out of the page cache (memstore.storage.direct); any other store
(lazy rows, LMDB) reads its misses through its own gather. A miss read while an update of the layer
was applied is not admitted (it may show the row before the update).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memstore.rowcache import RowCache
from memstore.storage.base import RowStore
from memstore.storage.direct import DirectReader
from memstore.storage.mmap_store import MmapRowStore


class CachedRowStore(RowStore):
    """`inner`'s rows for layer `layer_id`, read through `cache` (shared with the table's other layers)."""

    def __init__(self, inner: RowStore, cache: RowCache, layer_id: int) -> None:
        super().__init__(inner.num_rows, inner.dim, inner.dtype, inner.read_only)
        self.inner = inner
        self.cache = cache
        self.layer_id = layer_id
        self._row_bytes = inner.dim * inner.dtype.itemsize
        self.reader: DirectReader | None = None
        # Flat files without generated rows are read by block; a lazy store knows which rows were never written.
        if isinstance(inner, MmapRowStore) and inner.initial_rows is None and inner.num_rows:
            config = cache.config
            self.reader = DirectReader(inner.path, self._row_bytes, config.read_threads, config.direct_io)
        cache.add_reader(self.reader)

    def _gather(self, ids: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        rows = np.empty((len(ids), self.dim), dtype=self.dtype.numpy) if out is None else out
        if not len(ids):
            return rows
        raw = rows.view(np.uint8).reshape(len(ids), self._row_bytes)
        missed, writes = self.cache.lookup(self.layer_id, ids, raw)
        if not missed.any():
            return rows
        wanted, back = np.unique(ids[missed], return_inverse=True)
        if self.reader is not None:
            fetched, reads, nbytes = self.reader.read(wanted)
            self.cache.count_disk(reads, nbytes)
        else:
            fetched = self.inner.gather(wanted).view(np.uint8).reshape(len(wanted), self._row_bytes)
            self.cache.count_disk(1, fetched.nbytes)
        raw[missed] = fetched[back]
        self.cache.admit(self.layer_id, wanted, fetched, writes)
        return rows

    def _update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        self.inner.update(ids, rows)
        raw = np.ascontiguousarray(rows).view(np.uint8).reshape(len(ids), self._row_bytes)
        if getattr(self.inner, "initial_rows", None) is not None and not raw.any(axis=1).all():
            # A lazy store writes an all-zero row as -0.0 (memstore.storage.mmap_store): cache what it stored.
            raw = self.inner.gather(ids).view(np.uint8).reshape(len(ids), self._row_bytes)
        self.cache.write_through(self.layer_id, ids, raw)

    def reserve(self, row_ids: np.ndarray) -> None:
        self.inner.reserve(row_ids)

    def _flush(self) -> None:
        self.inner.flush()

    def copy_to(self, dest: Path) -> None:
        self.inner.copy_to(dest)

    @property
    def bytes_on_disk(self) -> int:
        return self.inner.bytes_on_disk

    @property
    def direct(self) -> bool:
        """Whether misses are read with O_DIRECT (out of the page cache)."""
        return self.reader is not None and self.reader.direct

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.inner.close()
