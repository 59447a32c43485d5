"""Row storage backends: batch is the only primitive (gather, update), one contract for all."""

from memstore.storage.base import RowStore
from memstore.storage.lmdb_store import LmdbRowStore
from memstore.storage.mmap_store import MmapRowStore

__all__ = ["RowStore", "MmapRowStore", "LmdbRowStore"]
