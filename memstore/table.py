"""A table: its manifest plus one row store per Engram layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, TableFormatError, permission_message
from memstore.rowcache import RowCache
from memstore.rowgen import initial_rows_at
from memstore.storage import MmapRowStore, RowStore
from memstore.storage.base import check_row_ids
from memstore.storage.cached import CachedRowStore
from memstore.tabledir.manifest import Backend, Init, Manifest


class Table:
    """An open table directory. Use as a context manager, or call close()."""

    def __init__(self, path: Path, manifest: Manifest, stores: dict[int, RowStore], read_only: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.read_only = read_only
        self._stores = stores

    @classmethod
    def open(cls, path: str | Path, read_only: bool = True) -> Table:
        """Open a table created by `memstore create`; checks manifest and file sizes."""
        path = Path(path)
        manifest = read_manifest(path)
        layout = manifest.layout
        stores: dict[int, RowStore] = {}
        try:
            for layer_id in layout.layer_ids:
                stores[layer_id] = open_store(
                    manifest.backend,
                    path / manifest.layer_file(layer_id),
                    manifest.stored_rows(layer_id),
                    manifest.dtype.stored_width(layout.dim),
                    manifest.dtype,
                    read_only,
                    _initial_rows(manifest, layer_id) if manifest.init is Init.LAZY else None,
                    # Which pages hold data can be kept when no other process writes the file.
                    known_pages=not read_only or manifest.optimizer is None,
                )
        except BaseException:
            for store in stores.values():
                store.close()
            raise
        return cls(path, manifest, stores, read_only)

    def cache_rows(self, cache: RowCache) -> None:
        """Read every layer's rows through the daemon's row cache from now on (memstore.rowcache)."""
        self._stores = {layer: CachedRowStore(store, cache, layer) for layer, store in self._stores.items()}

    def store(self, layer_id: int) -> RowStore:
        """The row store of one layer; InvalidArgumentError for a layer the table does not have."""
        self.manifest.layout.num_rows(layer_id)  # rejects unknown layers with a clear message
        return self._stores[layer_id]

    def local_ids(self, layer_id: int, row_ids: np.ndarray) -> np.ndarray:
        """Checked row ids of one layer as indices into its store: the ids themselves, or (a shard)
        their places among the shard's rows. InvalidArgumentError for ids out of the layer's range,
        WrongShardError for rows of partitions this shard does not hold."""
        sharding = self.manifest.sharding
        if sharding is None:
            return self.store(layer_id).check_ids(row_ids)
        num_rows = self.manifest.layout.num_rows(layer_id)
        ids = check_row_ids(row_ids, num_rows)
        return sharding.to_local(ids, num_rows)

    def gather(self, layer_id: int, row_ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [len(row_ids), dim] of one layer, in request order (written into `out` if given)."""
        return self.store(layer_id).gather(self.local_ids(layer_id, row_ids), out)

    def gather_chunks(self, layer_id: int, row_ids: np.ndarray, chunk_rows: int) -> Iterator[np.ndarray]:
        """The rows of `gather`, as consecutive chunks of at most chunk_rows rows.

        Every id is checked before the first chunk, so a bad request yields nothing.
        """
        if chunk_rows < 1:
            raise InvalidArgumentError(f"chunk_rows is {chunk_rows}; it must be at least 1")
        store = self.store(layer_id)
        ids = self.local_ids(layer_id, row_ids)
        for start in range(0, len(ids), chunk_rows):
            yield store.gather(ids[start : start + chunk_rows])

    def update(self, layer_id: int, row_ids: np.ndarray, rows: np.ndarray) -> None:
        """Overwrite rows of one layer (unique ids, storage dtype)."""
        self.store(layer_id).update(self.local_ids(layer_id, row_ids), rows)

    def flush(self) -> None:
        for store in self._stores.values():
            store.flush()

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores = {}

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: Path) -> Manifest:
    """The manifest of the table at `path`; TableFormatError (not a traceback) when this user may not read it."""
    try:
        return Manifest.read(path)
    except PermissionError as exc:
        raise TableFormatError(permission_message(Path(exc.filename or path))) from None


def open_store(
    backend: Backend,
    path: Path,
    num_rows: int,
    width: int,
    dtype: DType,
    read_only: bool,
    initial_rows: Callable[[np.ndarray], np.ndarray] | None = None,
    known_pages: bool = False,
) -> RowStore:
    """The row store of `backend` at `path` (rows of a layer, or a slot of optimizer state)."""
    if backend is Backend.LMDB:
        # Imported only for an LMDB table: a same-host client maps mmap tables and never loads lmdb.
        from memstore.storage.lmdb_store import LmdbRowStore

        return LmdbRowStore(path, num_rows, width, dtype, read_only)
    return MmapRowStore(path, num_rows, width, dtype, read_only, initial_rows, known_pages)


def _initial_rows(manifest: Manifest, layer_id: int) -> Callable[[np.ndarray], np.ndarray]:
    """The generator of a lazy layer's never-written rows (what an eager create would have written)."""
    dim, seed, std, dtype = manifest.layout.dim, manifest.seed, manifest.init_std, manifest.dtype
    sharding, num_rows = manifest.sharding, manifest.layout.num_rows(layer_id)
    if sharding is None:
        return lambda ids: initial_rows_at(seed, layer_id, ids, dim, std, dtype)
    return lambda ids: initial_rows_at(seed, layer_id, sharding.to_global(ids, num_rows), dim, std, dtype)
