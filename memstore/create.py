"""Create a table: stream deterministic initial rows to disk, then rename into place.

Rows are generated chunk by chunk (never the whole table in RAM) into a hidden temporary
directory beside the target; files and directory are fsynced and the directory renamed
only when complete, so an interrupted create leaves no half table that looks valid.

Replacing a table (``--overwrite``, here and in import) is refused while any daemon serves it
or an offline reader reads it (memstore.tabledir.lock): a trainable daemon would go on
acknowledging pushes into the deleted files, a read-only one serving the old rows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError
from memstore.integrity import write_table_sums
from memstore.rowgen import initial_rows, initial_rows_at
from memstore.sharding import DEFAULT_PARTITIONS, Sharding
from memstore.space import check_free, disk_full_error, is_disk_full
from memstore.storage.lmdb_store import LmdbRowStore
from memstore.tabledir.manifest import Backend, Init, Manifest
from memstore.tabledir.names import shard_name
from memstore.tabledir.staging import check_replaceable, check_table_root, replace_table_dir, staged

DEFAULT_CHUNK_ROWS = 16_384


def create_table(
    path: str | Path,
    manifest: Manifest,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a new table at `path`; `progress(rows)` is called after each chunk. Returns the path.

    A lazy table (`manifest.init` LAZY) writes no rows: its files are sparse (no disk until a
    row is written) and never-written rows are generated when read, identical to an eager table's.
    """
    path = Path(path)
    if chunk_rows < 1:
        raise InvalidArgumentError(f"chunk_rows is {chunk_rows}; it must be at least 1")
    if path.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} already exists; remove it or pass overwrite=True (--overwrite)")
    if path.exists():
        check_table_root(path)
    check_replaceable(path)  # before writing any row; checked again, and held, while replacing
    check_disk_for(path, manifest)
    try:
        with staged(path, "creating") as tmp:
            layout = manifest.layout
            digest = hashlib.sha256()
            for layer_id in layout.layer_ids:
                num_rows = manifest.stored_rows(layer_id)
                target = tmp / manifest.layer_file(layer_id)
                if manifest.init is Init.LAZY:  # sparse: no disk until rows are written
                    with open(target, "wb") as f:
                        f.truncate(manifest.layer_bytes(layer_id))
                        os.fsync(f.fileno())
                    if progress is not None:
                        progress(num_rows)
                else:
                    chunks = _initial_chunks(manifest, layer_id, chunk_rows, digest, progress)
                    width = manifest.dtype.stored_width(layout.dim)
                    write_store(manifest.backend, target, num_rows, width, manifest.dtype, chunks)
                write_initial_state(tmp, manifest, layer_id)
            # A lazy table's rows are never all generated: it records no digest.
            manifest = replace(manifest, rows_sha256=None if manifest.init is Init.LAZY else digest.hexdigest())
            manifest.write(tmp)
            write_table_sums(tmp, manifest)  # the rows' checksums, kept current by every push
            replace_table_dir(tmp, path, overwrite)
    except OSError as exc:
        if is_disk_full(exc):  # another writer took the space meanwhile: no debris, a clear error
            raise disk_full_error(path.parent, f"creating {path}", exc) from None
        raise
    return path


def disk_bytes(manifest: Manifest) -> int:
    """Bytes a new table of `manifest` takes on disk: rows (none for a lazy table) and the optimizer
    state that is not zero in an mmap file (zeros are sparse); LMDB with its page overhead."""
    total = 0
    for layer_id in manifest.layout.layer_ids:
        if manifest.init is not Init.LAZY:
            total += manifest.layer_bytes(layer_id)
        if manifest.optimizer is not None:
            first_row = manifest.optimizer.initial_state(1, manifest.layout.dim)
            for slot, (_name, width) in manifest.state_files(layer_id).items():
                if manifest.backend is Backend.LMDB or float(first_row[slot][0, 0]) != 0.0:
                    total += manifest.stored_rows(layer_id) * width * 4
    if manifest.backend is Backend.LMDB:
        total += total // 16  # headers and tree pages: a few percent (docs/benchmarks.md)
    return total


def check_disk_for(path: Path, manifest: Manifest) -> None:
    """DiskFullError, before anything is written, when the disk cannot hold the new table."""
    lazy = (
        " or create it with --lazy (rows then take disk only as they are trained)"
        if manifest.init is Init.EAGER
        else ""
    )
    check_free(
        path.parent if path.parent.exists() else path,
        disk_bytes(manifest),
        f"creating the table {path}",
        f"free space there, create it on another file system{lazy}",
    )


def create_sharded(
    path: str | Path,
    manifest: Manifest,
    num_shards: int,
    num_partitions: int = DEFAULT_PARTITIONS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write a table split over `num_shards` shards: `path/shard-0` ... each a table directory
    holding its partitions' rows. Nothing appears at `path` until every shard is complete."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} already exists; remove it or pass overwrite=True (--overwrite)")
    if path.exists():
        check_table_root(path)
    if manifest.sharding is not None:
        raise InvalidArgumentError("give create_sharded the manifest of the whole table (no sharding)")
    check_replaceable(path)
    for layer_id in manifest.layout.layer_ids:
        if manifest.layout.num_rows(layer_id) < num_partitions:
            raise InvalidArgumentError(
                f"layer {layer_id} has {manifest.layout.num_rows(layer_id)} rows, fewer than {num_partitions} "
                "partitions; ask for fewer partitions (--partitions)"
            )
    check_free(
        path.parent if path.parent.exists() else path,
        disk_bytes(manifest),
        f"creating the sharded table {path}",
        "free space there, or create it on another file system",
    )
    with staged(path, "creating") as tmp:
        for shard in range(num_shards):
            sharding = Sharding.spread(num_shards, shard, num_partitions)
            create_table(tmp / shard_name(shard), replace(manifest, sharding=sharding), chunk_rows, progress=progress)
        replace_table_dir(tmp, path, overwrite)
    return [path / shard_name(shard) for shard in range(num_shards)]


def write_initial_state(table_dir: Path, manifest: Manifest, layer_id: int) -> None:
    """The optimizer state stores of one layer; zeros in an mmap table are a sparse file (no disk until written)."""
    if manifest.optimizer is None:
        return
    num_rows = manifest.stored_rows(layer_id)
    first_row = manifest.optimizer.initial_state(1, manifest.layout.dim)  # slot -> [1, width]: every row's start
    for slot, (name, width) in manifest.state_files(layer_id).items():
        value = float(first_row[slot][0, 0])
        if manifest.backend is Backend.MMAP and value == 0.0:
            with open(table_dir / name, "wb") as f:
                f.truncate(num_rows * width * 4)
                os.fsync(f.fileno())
            continue
        chunks = (
            np.full((min(DEFAULT_CHUNK_ROWS, num_rows - start), width), value, dtype="<f4")
            for start in range(0, num_rows, DEFAULT_CHUNK_ROWS)
        )
        write_store(manifest.backend, table_dir / name, num_rows, width, DType.FLOAT32, chunks)


def _initial_chunks(
    manifest: Manifest,
    layer_id: int,
    chunk_rows: int,
    digest: Any,
    progress: Callable[[int], None] | None,
) -> Iterator[np.ndarray]:
    """A layer's initial rows in chunks, each also fed to `digest` and counted by `progress`."""
    layout, sharding = manifest.layout, manifest.sharding
    num_rows = manifest.stored_rows(layer_id)
    for start in range(0, num_rows, chunk_rows):
        count = min(chunk_rows, num_rows - start)
        if sharding is None:
            rows = initial_rows(manifest.seed, layer_id, start, count, layout.dim, manifest.init_std, manifest.dtype)
        else:  # a shard's rows are the initial rows of the global ids it holds, in its own order
            ids = sharding.to_global(np.arange(start, start + count), layout.num_rows(layer_id))
            rows = initial_rows_at(manifest.seed, layer_id, ids, layout.dim, manifest.init_std, manifest.dtype)
        digest.update(rows)
        yield rows
        if progress is not None:
            progress(count)


def write_store(
    backend: Backend, path: Path, num_rows: int, width: int, dtype: DType, chunks: Iterable[np.ndarray]
) -> None:
    """A new store of `backend` at `path` from row chunks, synced to disk."""
    if backend is Backend.LMDB:
        LmdbRowStore.create(path, num_rows, width, dtype, chunks, block_rows=_lmdb_block_rows(width * dtype.itemsize))
        return
    with open(path, "wb") as f:
        for rows in chunks:
            f.write(rows.tobytes())
        f.flush()
        os.fsync(f.fileno())


def _lmdb_block_rows(row_bytes: int, target: int = 64, page: int = 4096, header: int = 16) -> int:
    """About `target` rows per LMDB value, as many as fit the same whole pages: a value takes whole
    overflow pages after a 16-byte header, so 64 rows of 128 bytes need 3 pages and 63 need 2
    (measured: same gather speed, 249 instead of 367 MiB for 2M rows; docs/benchmarks.md)."""
    pages = -(-(target * row_bytes) // page)  # the pages `target` rows would fill without the header
    return max(1, min(target, (pages * page - header) // row_bytes))
