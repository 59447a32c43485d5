"""Every name inside a table directory, and beside it while one is built (docs/format.md shows the tree).

These names are the on-disk format: tables written by any memstore open by them, so none of them
may change. Code that needs a file of a table takes its name from here.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"  # memstore.tabledir.manifest
CHECKPOINT_NAME = "checkpoint.json"  # memstore.tabledir.checkpoint
SEQLOCK_NAME = "seqlock"  # memstore.tabledir.seqlock
WAL_DIR = "wal"  # the write-ahead log's segments (memstore.tabledir.walformat names the files inside)
WRITER_LOCK_NAME = "writer.lock"  # the writer's pid, for messages (memstore.tabledir.lock)
SUMS_SUFFIX = ".sums"  # a store's checksum sidecar: `<store file>.sums` (memstore.tabledir.sums)
SHARD_PREFIX = "shard-"  # a sharded table's shard directories: shard-0, shard-1, ...
TEMP_SUFFIX = ".tmp"  # a file being written beside its final name (memstore.tabledir.fsafe)


def layer_file(layer_id: int, lmdb: bool) -> str:
    """One layer's rows: a flat file (mmap backend) or an LMDB environment directory."""
    return f"layer_{layer_id}.lmdb" if lmdb else f"layer_{layer_id}.rows"


def state_file(layer_id: int, slot: str, lmdb: bool) -> str:
    """One optimizer state slot of one layer (float32 values)."""
    return f"layer_{layer_id}.{slot}.f32.lmdb" if lmdb else f"layer_{layer_id}.{slot}.f32"


def sums_path(store_path: Path) -> Path:
    """The checksum sidecar of the store at `store_path` (a row file, or an LMDB directory)."""
    return store_path.with_name(store_path.name + SUMS_SUFFIX)


def shard_name(shard: int) -> str:
    """The directory of one shard inside a sharded table."""
    return f"{SHARD_PREFIX}{shard}"


def shard_dirs(path: Path) -> list[Path]:
    """The shard directories of a sharded table at `path`, in shard order (empty if it is not one)."""
    found = sorted((p for p in Path(path).glob(f"{SHARD_PREFIX}*") if (p / MANIFEST_NAME).is_file()), key=_shard_number)
    return found if [_shard_number(p) for p in found] == list(range(len(found))) else []


def _shard_number(path: Path) -> int:
    suffix = path.name.removeprefix(SHARD_PREFIX)
    return int(suffix) if suffix.isdigit() else -1


def staging_name(target: str, purpose: str) -> str:
    """A hidden directory beside `target` where this process builds (or sets aside) a table:
    ``.<target>.<purpose>-<pid>``, e.g. ``.t.creating-4242`` (purposes: creating, importing,
    resharding, snapshot-<thread>, replaced)."""
    return f".{target}.{purpose}-{os.getpid()}"


def is_hidden(name: str) -> bool:
    """Whether a name in a table's parent directory is staging (or another hidden entry), not a table."""
    return name.startswith(".")


def temp_name(name: str, token: str) -> str:
    """A file being written beside `name` before it is renamed onto it: ``<name>.<token>.tmp``."""
    return f"{name}.{token}{TEMP_SUFFIX}"
