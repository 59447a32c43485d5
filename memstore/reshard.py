"""Reshard a table offline: move its rows and optimizer state from N shards to M.

The source is a plain table directory or a sharded one (`shard-0` ... `shard-{N-1}`, see
memstore.sharding); the destination is a plain table when M is 1, else `dest/shard-0` ...
`dest/shard-{M-1}` spread over `num_partitions` partitions (`Sharding.spread`). Rows follow
their global id: row r lands in partition r % num_partitions and in the shard holding it.

Offline: every source shard is held for reading from the first read to the end
(memstore.offline: a shared lock on its directory), so no daemon can train it meanwhile (a running
writable daemon makes reshard fail), and a source whose files may lack acknowledged pushes (its
log holds pushes past its checkpoint, or its writer acknowledged more than checkpoint and log
hold) is refused: they would be lost.

Every destination file is written once, streaming in chunks in its own row order, into a
staging directory beside `dest`; nothing appears at `dest` until the written files, read back
from disk, give the same `table_checksum` as the source. That checksum does not depend on how
partitions are spread over shards: SHA-256 over, for each layer in order and each partition in
order, the rows of that partition in global-id order (and, as a second digest, each row's
optimizer state, its slots side by side). The partition order depends on the partition count,
so a reshard that changes it reads the source in the destination's partition order.

What the destination does not inherit, on purpose:
- the version: it counts pushes applied to one shard's files, and a destination shard holds
  rows trained through several source shards, so no source version describes it. It starts
  at 0 with the optimizer's per-layer steps (which must agree across the source shards, as a
  trainer pushing every layer to every shard each step keeps them);
- the write-ahead log (nothing is past the new checkpoint) and the table of each client's
  last step (acknowledgements carry source versions; the trainer is stopped while resharding).
  Followers that replicate a shard by version must be re-seeded from the new shards.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from memstore.create import DEFAULT_CHUNK_ROWS, write_store
from memstore.dtypes import DType
from memstore.errors import DataLossError, InvalidArgumentError, TableFormatError
from memstore.integrity import write_table_sums
from memstore.offline import reading_offline
from memstore.sharding import DEFAULT_PARTITIONS, Sharding
from memstore.storage import RowStore
from memstore.table import Table, open_store
from memstore.tabledir.checkpoint import Checkpoint
from memstore.tabledir.fsafe import make_dir
from memstore.tabledir.manifest import Init, Manifest
from memstore.tabledir.names import MANIFEST_NAME, shard_dirs, shard_name
from memstore.tabledir.staging import replace_table_dir, staged


@dataclass(frozen=True)
class TableChecksum:
    """The sharding-independent checksum of a table's contents (see the module docstring)."""

    rows: str  # SHA-256 hex of every row
    state: str | None  # SHA-256 hex of every row's optimizer state; None: the table keeps none


@dataclass(frozen=True)
class ReshardReport:
    """What a reshard did."""

    dest: Path
    source_shards: int
    num_partitions: int
    source_checksum: TableChecksum
    dest_checksum: TableChecksum  # of the files written, read back from disk: equal to the source's
    rows_moved: int  # rows of every layer (each row once, whatever the number of shards)
    shard_rows: tuple[int, ...]  # rows each destination shard stores, all layers together
    layer_steps: dict[int, int]  # the optimizer steps carried over (empty for a frozen table)
    elapsed_s: float


def reshard(
    source: str | Path,
    dest: str | Path,
    num_shards: int,
    num_partitions: int | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ReshardReport:
    """Copy the table at `source` (plain or sharded) to `dest` (new) as `num_shards` shards.

    `num_partitions` defaults to the source's (DEFAULT_PARTITIONS for a plain source). Three
    passes read every row: the source checksum, the copy, the read-back of the copy;
    `progress(rows)` is called after each chunk of each, 3x the table's rows in all.
    """
    started = time.monotonic()
    source, dest = Path(source), Path(dest)
    if chunk_rows < 1:
        raise InvalidArgumentError(f"chunk_rows is {chunk_rows}; it must be at least 1")
    if dest.exists():
        raise InvalidArgumentError(f"{dest} already exists; reshard writes a new table: pick a new path or remove it")
    if dest.resolve().is_relative_to(source.resolve()):
        raise InvalidArgumentError(f"{dest} lies inside the source {source}; write the new table beside it")
    dirs = table_dirs(source)
    manifests = [Manifest.read(d) for d in dirs]
    whole = _whole_manifest(dirs, manifests)
    if whole.init is Init.LAZY:
        raise InvalidArgumentError(
            f"{source} is a lazy table: resharding would generate and write every row never written, "
            "which a lazy table is made to avoid (it may be larger than the disk); create the table with "
            "the shards it needs instead (memstore create --lazy --shards N)"
        )
    partitions = num_partitions if num_partitions is not None else _source_partitions(manifests[0])
    shardings = _dest_shardings(whole, num_shards, partitions)
    with ExitStack() as stack:
        for d in dirs:
            stack.enter_context(reading_offline(d, "reshard"))
        steps = _layer_steps(dirs, whole)
        with _Reader.open(dirs, manifests) as reader:
            source_sum = reader.checksum(partitions, chunk_rows, progress)
            with staged(dest, "resharding") as tmp:
                shard_paths = [tmp] if shardings == [None] else [tmp / shard_name(s) for s in range(num_shards)]
                for path, sharding in zip(shard_paths, shardings, strict=True):
                    _write_shard(reader, path, replace(whole, sharding=sharding), steps, chunk_rows, progress)
                with _Reader.open(shard_paths, [Manifest.read(p) for p in shard_paths]) as written:
                    dest_sum = written.checksum(partitions, chunk_rows, progress)
                if dest_sum != source_sum:
                    rows = dest_sum.rows != source_sum.rows
                    written, read = (dest_sum.rows, source_sum.rows) if rows else (dest_sum.state, source_sum.state)
                    raise DataLossError(
                        f"the {'rows' if rows else 'optimizer state'} read back from the new files have checksum "
                        f"{written}, the source's {read}: a write was lost or damaged; nothing was written at "
                        f"{dest}. Check the disk and run reshard again"
                    )
                replace_table_dir(tmp, dest)
    stored = [sum(replace(whole, sharding=s).stored_rows(layer) for layer in whole.layout.layer_ids) for s in shardings]
    return ReshardReport(
        dest=dest,
        source_shards=len(dirs),
        num_partitions=partitions,
        source_checksum=source_sum,
        dest_checksum=dest_sum,
        rows_moved=whole.layout.total_rows,
        shard_rows=tuple(stored),
        layer_steps=steps,
        elapsed_s=time.monotonic() - started,
    )


def table_checksum(
    path: str | Path, num_partitions: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> TableChecksum:
    """The checksum of a table, plain or sharded, that does not depend on its shards.

    Partitions are taken in the order of `num_partitions` partitions (default: the table's own,
    DEFAULT_PARTITIONS for a plain table): two tables with equal rows and state have equal
    checksums when computed with the same partition count. Read offline (memstore.offline): refused
    while a daemon trains the table; checksum a snapshot of it instead.
    """
    dirs = table_dirs(Path(path))
    manifests = [Manifest.read(d) for d in dirs]
    _whole_manifest(dirs, manifests)
    partitions = num_partitions if num_partitions is not None else _source_partitions(manifests[0])
    with ExitStack() as stack:
        for d in dirs:
            stack.enter_context(reading_offline(d, "the checksum"))
        with _Reader.open(dirs, manifests) as reader:
            return reader.checksum(partitions, chunk_rows)


# --- the source ----------------------------------------------------------------------------------


def table_dirs(source: str | Path) -> list[Path]:
    """The table directories of a table: its shards in order, or the directory itself (plain or one shard)."""
    source = Path(source)
    dirs = shard_dirs(source)
    if dirs:
        return dirs
    if (source / MANIFEST_NAME).is_file():
        return [source]
    raise TableFormatError(
        f"{source} is not a memstore table: it has neither {MANIFEST_NAME} nor shard directories "
        "shard-0 ... shard-{N-1} holding one each"
    )


def _whole_manifest(dirs: list[Path], manifests: list[Manifest]) -> Manifest:
    """The manifest of the whole table the directories make up (no sharding), after checking that
    they are exactly the shards of one table."""
    whole = replace(manifests[0], sharding=None, rows_sha256=None)
    first = manifests[0].sharding
    if len(dirs) == 1 and first is not None and first.num_shards > 1:
        raise InvalidArgumentError(
            f"{dirs[0]} is shard {first.shard} of {first.num_shards}; give the directory holding all "
            f"{first.num_shards} shards (shard-0 ... shard-{first.num_shards - 1})"
        )
    for index, (path, manifest) in enumerate(zip(dirs, manifests, strict=True)):
        sharding = manifest.sharding
        if replace(manifest, sharding=None) != whole:
            raise TableFormatError(
                f"{path} and {dirs[0]} are not shards of one table: their manifests differ beyond the sharding"
            )
        if len(dirs) > 1 and (
            sharding is None
            or first is None
            or sharding.assignment != first.assignment
            or sharding.shard != index
            or sharding.num_shards != len(dirs)
        ):
            raise TableFormatError(
                f"{path} is not shard {index} of the {len(dirs)} shards of {dirs[0].parent}: its manifest says "
                f"{'no sharding' if sharding is None else f'shard {sharding.shard} of {sharding.num_shards}'}, "
                "or assigns partitions differently from shard-0's"
            )
    return whole


def _source_partitions(manifest: Manifest) -> int:
    return DEFAULT_PARTITIONS if manifest.sharding is None else manifest.sharding.num_partitions


def _layer_steps(dirs: list[Path], whole: Manifest) -> dict[int, int]:
    """The optimizer steps of every layer, which every source shard must agree on (empty for a frozen
    table). The shards were checked recovered when they were locked (`reading_offline`)."""
    if whole.optimizer is None:
        return {}
    checkpoints = [Checkpoint.read(d) for d in dirs]
    steps = {layer: checkpoints[0].layer_steps.get(layer, 0) for layer in whole.layout.layer_ids}
    for path, checkpoint in zip(dirs, checkpoints, strict=True):
        for layer, step in steps.items():
            other = checkpoint.layer_steps.get(layer, 0)
            if other != step:
                raise InvalidArgumentError(
                    f"the shards disagree on layer {layer}'s optimizer step: {dirs[0]} is at step {step}, "
                    f"{path} at step {other}. A resharded table has one step per layer (the optimizer's "
                    "bias correction depends on it): train until every shard has had the same pushes per layer, "
                    "or reshard a snapshot taken when they agreed"
                )
    return steps


class _Reader:
    """The rows and optimizer state of a table's shard directories, read by global row id."""

    def __init__(self, tables: list[Table], states: list[dict[int, dict[str, RowStore]]]) -> None:
        self.tables = tables  # one per shard directory, in shard order
        self.states = states  # per shard: layer -> slot -> store
        self.manifest = tables[0].manifest
        self.sharding = self.manifest.sharding

    @classmethod
    def open(cls, dirs: list[Path], manifests: list[Manifest]) -> _Reader:
        """Open every shard directory read-only: its rows and its optimizer state stores."""
        tables: list[Table] = []
        states: list[dict[int, dict[str, RowStore]]] = []
        try:
            for path, manifest in zip(dirs, manifests, strict=True):
                tables.append(Table.open(path))
                states.append({layer: {} for layer in manifest.layout.layer_ids})
                for layer in manifest.layout.layer_ids:
                    for slot, (name, width) in manifest.state_files(layer).items():
                        states[-1][layer][slot] = open_store(
                            manifest.backend, path / name, manifest.stored_rows(layer), width, DType.FLOAT32, True
                        )
        except BaseException:
            _close(tables, states)
            raise
        return cls(tables, states)

    @property
    def slots(self) -> list[str]:
        """The optimizer state slots, in the fixed order every state digest and copy uses."""
        layer = self.manifest.layout.layer_ids[0]
        return sorted(self.manifest.state_files(layer))

    def gather(self, layer: int, ids: np.ndarray, slot: str | None = None) -> np.ndarray:
        """Rows (slot None) or one optimizer state slot of global row ids, whichever shards hold them."""
        owners = np.zeros(len(ids), dtype=np.int64) if self.sharding is None else self.sharding.shard_of(ids)
        first = int(owners[0])
        if (owners == first).all():  # a partition of the same partition count: one shard holds it all
            return self._gather_from(first, layer, ids, slot)
        parts = {int(s): owners == s for s in np.unique(owners)}
        chunks = {s: self._gather_from(s, layer, ids[mask], slot) for s, mask in parts.items()}
        out = np.empty((len(ids), *chunks[first].shape[1:]), dtype=chunks[first].dtype)
        for s, mask in parts.items():
            out[mask] = chunks[s]
        return out

    def _gather_from(self, shard: int, layer: int, ids: np.ndarray, slot: str | None) -> np.ndarray:
        table = self.tables[shard]
        local = table.local_ids(layer, ids)
        store = table.store(layer) if slot is None else self.states[shard][layer][slot]
        return store.gather(local)

    def checksum(
        self, num_partitions: int, chunk_rows: int, progress: Callable[[int], None] | None = None
    ) -> TableChecksum:
        """The table's checksum, partitions taken in the order of `num_partitions` partitions."""
        rows, state = hashlib.sha256(), hashlib.sha256()
        slots = self.slots
        layout = self.manifest.layout
        for layer in layout.layer_ids:
            for ids in _partition_chunks(layout.num_rows(layer), range(num_partitions), num_partitions, chunk_rows):
                rows.update(self.gather(layer, ids).tobytes())
                if slots:  # a row's slots side by side: the digest does not depend on the chunking
                    state.update(np.concatenate([self.gather(layer, ids, s) for s in slots], axis=1).tobytes())
                if progress is not None:
                    progress(len(ids))
        return TableChecksum(rows.hexdigest(), state.hexdigest() if slots else None)

    def close(self) -> None:
        _close(self.tables, self.states)

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(tables: list[Table], states: list[dict[int, dict[str, RowStore]]]) -> None:
    for per_layer in states:
        for stores in per_layer.values():
            for store in stores.values():
                store.close()
    for table in tables:
        table.close()
    states.clear()
    tables.clear()


# --- the destination -----------------------------------------------------------------------------


def _dest_shardings(whole: Manifest, num_shards: int, num_partitions: int) -> list[Sharding | None]:
    """The sharding of each destination directory: [None] for a plain table (one shard)."""
    if num_partitions < 1:
        raise InvalidArgumentError(f"num_partitions is {num_partitions}; it must be at least 1")
    if num_shards < 1:
        raise InvalidArgumentError(f"num_shards is {num_shards}; it must be at least 1")
    if num_shards == 1:
        return [None]
    for layer in whole.layout.layer_ids:
        if whole.layout.num_rows(layer) < num_partitions:
            raise InvalidArgumentError(
                f"layer {layer} has {whole.layout.num_rows(layer)} rows, fewer than {num_partitions} "
                "partitions; ask for fewer partitions (--partitions)"
            )
    return [Sharding.spread(num_shards, shard, num_partitions) for shard in range(num_shards)]


def _write_shard(
    reader: _Reader,
    path: Path,
    manifest: Manifest,
    layer_steps: dict[int, int],
    chunk_rows: int,
    progress: Callable[[int], None] | None,
) -> None:
    """One destination table directory: each layer's rows then its state slots, each file written once in
    the shard's local order (its partitions ascending, each in global-id order)."""
    if not path.is_dir():
        make_dir(path)
    layout = manifest.layout
    digest = hashlib.sha256()
    for layer in layout.layer_ids:
        chunks = _copied_chunks(reader, manifest, layer, None, chunk_rows)
        rows = _digested(_counted(chunks, progress), digest)
        width = manifest.dtype.stored_width(layout.dim)
        num_rows = manifest.stored_rows(layer)
        write_store(manifest.backend, path / manifest.layer_file(layer), num_rows, width, manifest.dtype, rows)
        for slot, (name, slot_width) in manifest.state_files(layer).items():
            chunks = _copied_chunks(reader, manifest, layer, slot, chunk_rows)
            write_store(manifest.backend, path / name, num_rows, slot_width, DType.FLOAT32, chunks)
    # Like create: the SHA-256 of this directory's own rows in its own order, for `memstore verify`.
    replace(manifest, rows_sha256=digest.hexdigest()).write(path)
    write_table_sums(path, manifest)  # the rows' checksums (memstore.integrity), as create writes them
    if manifest.optimizer is not None:
        Checkpoint(version=0, layer_steps=dict(layer_steps)).write(path)


def _copied_chunks(
    reader: _Reader, manifest: Manifest, layer: int, slot: str | None, chunk_rows: int
) -> Iterator[np.ndarray]:
    """The rows (or one state slot) a destination directory stores of one layer, in its local order."""
    num_rows = manifest.layout.num_rows(layer)
    sharding = manifest.sharding
    if sharding is None:  # a plain table: global-id order
        for start in range(0, num_rows, chunk_rows):
            yield reader.gather(layer, np.arange(start, min(start + chunk_rows, num_rows), dtype=np.int64), slot)
        return
    for ids in _partition_chunks(num_rows, sharding.partitions, sharding.num_partitions, chunk_rows):
        yield reader.gather(layer, ids, slot)


def _partition_chunks(
    num_rows: int, partitions: Iterable[int], num_partitions: int, chunk_rows: int
) -> Iterator[np.ndarray]:
    """Global ids of the given partitions, partition after partition, each in id order, in chunks."""
    for partition in partitions:
        count = (num_rows - partition + num_partitions - 1) // num_partitions
        for start in range(0, count, chunk_rows):
            ks = np.arange(start, min(start + chunk_rows, count), dtype=np.int64)
            yield ks * num_partitions + partition


def _digested(chunks: Iterator[np.ndarray], digest: Any) -> Iterator[np.ndarray]:
    for chunk in chunks:
        digest.update(chunk.tobytes())
        yield chunk


def _counted(chunks: Iterator[np.ndarray], progress: Callable[[int], None] | None) -> Iterator[np.ndarray]:
    for chunk in chunks:
        yield chunk
        if progress is not None:
            progress(len(chunk))
