"""Row storage backends: batch is the only primitive (gather, update), one contract for all.

The LMDB backend (memstore.storage.lmdb_store) is imported where it is used, not here: a client
mapping an mmap table on its own host loads neither it nor the lmdb library.
"""

from memstore.storage.base import RowStore
from memstore.storage.mmap_store import MmapRowStore

__all__ = ["RowStore", "MmapRowStore"]
