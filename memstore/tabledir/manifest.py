"""The table manifest: `manifest.json` in a table directory, the one description of a table.

Schema (format version 1; docs/format.md has the whole table directory). A JSON object, written
indented, with these keys (optimizer, init, sharding and rows_sha256 may be absent: read as null,
"eager", null, null; every other key is required):

    format_version  int     FORMAT_VERSION (1)
    fingerprint     str     16 hex digits: SHA-256 of the canonical layout + seed (memstore.layout.fingerprint)
    layout          object  the Engram layout (EngramLayout.to_dict: layer_ids, vocab_size_per_ngram,
                            max_ngram, heads_per_ngram, dim, primes, optional explicit_head_sizes)
    dtype           str     a DType value: float32, float16, bfloat16, float8_e4m3_rowscale, int8_rowscale, bytes
    seed            int     seed of the initial rows
    init_std        float   standard deviation of the initial rows
    init_generator  str     the initial-row generator (memstore.rowgen.GENERATOR)
    backend         str     "mmap" or "lmdb"
    optimizer       object|null  OptimizerConfig.to_dict (kind, lr, betas, eps, initial_accumulator_value);
                            null: a frozen table
    init            str     "eager" or "lazy" (read as "eager" when absent)
    sharding        object|null  Sharding.to_dict (num_partitions, num_shards, shard, assignment); null: whole
    rows_sha256     str|null     SHA-256 of every row as created, imported or resharded; null: lazy table
    files           object  layer id (string) -> its rows' file name; written for readers in other
                            languages, ignored when read (the names follow from backend: tabledir.names)
    checksums       object  key -> first 16 hex digits of SHA-256 of that key's canonical JSON value,
                            for every other key; optional (a hand-written manifest has none)

Readers refuse (TableFormatError) a format version other than theirs, an unknown key (here, in the
layout, the optimizer or the sharding), an initial-row generator other than theirs, a fingerprint that
does not match the layout and seed, and a field whose checksum does not match: a manifest is never
half understood. A new format adds a version; it does not add keys silently.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, TableFormatError
from memstore.layout import EngramLayout, fingerprint
from memstore.rowgen import GENERATOR
from memstore.sharding import Sharding
from memstore.tabledir.fsafe import write_durably
from memstore.tabledir.names import MANIFEST_NAME, layer_file, state_file
from memstore.tabledir.optimizer import OptimizerConfig

FORMAT_VERSION = 1
# Key of the per-field checksums a written manifest carries: an edited field is named when read.
CHECKSUMS_KEY = "checksums"


class Init(enum.Enum):
    """When a table's initial rows are written."""

    EAGER = "eager"  # every row written at create
    LAZY = "lazy"  # none: a row never written reads as its initial value, generated on the fly


class Backend(enum.Enum):
    """Where a table's rows live."""

    MMAP = "mmap"  # one flat little-endian file per layer, memory-mapped
    LMDB = "lmdb"  # one LMDB environment per layer, rows packed in fixed-size blocks


@dataclass(frozen=True)
class Manifest:
    """Everything needed to open, serve and check a table."""

    layout: EngramLayout
    dtype: DType = DType.FLOAT16
    seed: int = 0
    init_std: float = 1.0
    backend: Backend = Backend.MMAP
    # How pushed gradients update the rows; None: the table is frozen (lookups only).
    optimizer: OptimizerConfig | None = None
    init: Init = Init.EAGER
    # None: the table holds every row; else the partitions of one shard (memstore.sharding).
    sharding: Sharding | None = None
    # SHA-256 of every row as created or imported (layers in order, raw bytes); `memstore verify`.
    rows_sha256: str | None = field(default=None, compare=False)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        std = self.init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
            raise InvalidArgumentError(
                f"init_std is {std!r}; it must be a finite number >= 0 (the standard deviation of the initial rows)"
            )
        if self.init is Init.LAZY and self.backend is not Backend.MMAP:
            raise InvalidArgumentError("lazy tables need the mmap backend (their files are sparse)")
        if self.init is Init.LAZY and (self.dtype.quantized or self.dtype.opaque):
            raise InvalidArgumentError("lazy tables store float rows (float32, float16, bfloat16), not quantized ones")
        if self.dtype.opaque and self.optimizer is not None:
            raise InvalidArgumentError("opaque byte rows cannot be trained here: give the table no optimizer")

    @property
    def fingerprint(self) -> str:
        """Hash of layout + seed: what a model checks before trusting the table."""
        return fingerprint(self.layout, self.seed)

    def layer_file(self, layer_id: int) -> str:
        """File name, inside the table directory, of one layer's rows."""
        self.layout.num_rows(layer_id)  # rejects unknown layers
        return layer_file(layer_id, lmdb=self.backend is Backend.LMDB)

    def state_files(self, layer_id: int) -> dict[str, tuple[str, int]]:
        """Optimizer state of one layer: slot -> (file name, float32 values per row); empty if frozen."""
        self.layout.num_rows(layer_id)
        if self.optimizer is None:
            return {}
        slots = self.optimizer.state_slots(self.layout.dim)
        lmdb = self.backend is Backend.LMDB
        return {slot: (state_file(layer_id, slot, lmdb), width) for slot, width in slots.items()}

    def stored_rows(self, layer_id: int) -> int:
        """Rows of one layer this table directory stores: all of them, or its shard's partitions'."""
        num_rows = self.layout.num_rows(layer_id)
        return num_rows if self.sharding is None else self.sharding.local_rows(num_rows)

    def layer_bytes(self, layer_id: int) -> int:
        return self.stored_rows(layer_id) * self.dtype.row_bytes(self.layout.dim)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes(layer_id) for layer_id in self.layout.layer_ids)

    def to_json(self) -> str:
        data = {
            "format_version": self.format_version,
            "fingerprint": self.fingerprint,
            "layout": self.layout.to_dict(),
            "dtype": self.dtype.value,
            "seed": self.seed,
            "init_std": self.init_std,
            "init_generator": GENERATOR,
            "backend": self.backend.value,
            "optimizer": None if self.optimizer is None else self.optimizer.to_dict(),
            "init": self.init.value,
            "sharding": None if self.sharding is None else self.sharding.to_dict(),
            "rows_sha256": self.rows_sha256,
            "files": {str(layer_id): self.layer_file(layer_id) for layer_id in self.layout.layer_ids},
        }
        data[CHECKSUMS_KEY] = {key: _field_checksum(value) for key, value in data.items()}
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and check a manifest; unknown keys, unknown versions and stale fingerprints are errors."""
        try:
            data: dict[str, Any] = json.loads(text)
            if not isinstance(data, dict):
                raise TableFormatError(f"manifest is malformed: it must be a JSON object; got {type(data).__name__}")
            recorded = data.pop(CHECKSUMS_KEY, None)
            written = dict(data)  # the fields as read, for the checksums (checked last: the checks above say more)
            version = data.pop("format_version")
            if version != FORMAT_VERSION:
                raise TableFormatError(
                    f"table format version {version!r} is not supported; this memstore reads version {FORMAT_VERSION}"
                )
            recorded_fingerprint = data.pop("fingerprint")
            generator = data.pop("init_generator")
            if generator != GENERATOR:
                raise TableFormatError(
                    f"the table's rows were initialised by generator {generator!r}; this memstore has {GENERATOR!r}"
                )
            data.pop("files")
            known = {"layout", "dtype", "seed", "init_std", "backend", "optimizer", "init", "sharding", "rows_sha256"}
            unknown = set(data) - known
            if unknown:
                raise TableFormatError(f"manifest has unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
            manifest = cls(
                layout=EngramLayout.from_dict(data["layout"]),
                dtype=DType(data["dtype"]),
                seed=int(data["seed"]),
                init_std=float(data["init_std"]),
                backend=Backend(data["backend"]),
                optimizer=None if data.get("optimizer") is None else OptimizerConfig.from_dict(data["optimizer"]),
                init=Init(data.get("init", Init.EAGER.value)),
                sharding=None if data.get("sharding") is None else Sharding.from_dict(data["sharding"]),
                rows_sha256=data.get("rows_sha256"),
            )
        # AttributeError: a section of the wrong JSON type (a list where an object belongs);
        # RecursionError: JSON nested deeper than the parser goes (a hostile follower's manifest).
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise TableFormatError(f"manifest is malformed: {type(exc).__name__}: {str(exc)[:200]}") from None
        if manifest.fingerprint != recorded_fingerprint:
            raise TableFormatError(
                f"manifest fingerprint {recorded_fingerprint} does not match its layout ({manifest.fingerprint}); "
                "the manifest was edited by hand: recreate the table"
            )
        if recorded is not None:
            _check_fields(written, recorded)
        return manifest

    def write(self, table_dir: Path) -> None:
        """Write manifest.json durably (temp file, fsync, rename)."""
        write_durably(table_dir / MANIFEST_NAME, self.to_json().encode())

    @classmethod
    def read(cls, table_dir: Path) -> Manifest:
        path = Path(table_dir) / MANIFEST_NAME
        if not path.is_file():
            raise TableFormatError(f"{table_dir} is not a memstore table: {MANIFEST_NAME} is missing")
        return cls.from_json(path.read_text())


def _field_checksum(value: Any) -> str:
    """A short checksum of one manifest field's JSON value (key order and spacing do not matter)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_fields(data: dict[str, Any], recorded: Any) -> None:
    """TableFormatError naming the fields edited since memstore wrote the manifest (`recorded`: its
    `checksums` section). A manifest without one (written by hand for `import --manifest`, or by an
    older memstore) is taken as it is."""
    if not isinstance(recorded, dict):
        raise TableFormatError(f"manifest is malformed: {CHECKSUMS_KEY!r} must be an object")
    edited = sorted(key for key in set(data) | set(recorded) if recorded.get(key) != _field_checksum(data.get(key)))
    if edited:
        raise TableFormatError(
            f"manifest.json was edited after memstore wrote it: {', '.join(edited)} no longer match the checksums "
            f"recorded in its {CHECKSUMS_KEY!r} section. A table's description must not change under its rows: "
            "restore the original manifest (from a snapshot or backup) or recreate the table (a manifest written "
            f"for `import --manifest` needs no {CHECKSUMS_KEY!r} section)"
        )


def parse_dtype(name: str) -> DType:
    """DType from its name, with an error that lists the choices."""
    try:
        return DType(name)
    except ValueError:
        raise InvalidArgumentError(f"unknown dtype {name!r}; choose one of {[d.value for d in DType]}") from None
