"""Export a table's rows to safetensors, and import a table from safetensors.

So a table trained in the memstore can be used without the service (`load_into_embedding`, or
any safetensors reader), and a table trained in process, or elsewhere, can be served.

File layout (the standard safetensors format, https://github.com/huggingface/safetensors):

- one tensor per Engram layer, named ``layer_{id}`` (e.g. ``layer_1``), shape ``[num_rows, dim]``,
  dtype ``F16``, ``BF16`` or ``F32``, in the manifest's layer order;
- metadata ``{"memstore.manifest": <manifest.json text>, "memstore.format": "1"}``. The manifest
  is the source table's, whatever dtype the tensors were exported in, so importing the file
  without a manifest recreates the same table (rows converted back to its dtype).

Both directions stream: rows move in chunks of `chunk_rows`, never a whole layer in memory. The
writer writes the format itself (8-byte little-endian header size, JSON header padded with
spaces to a multiple of 8, then the raw little-endian data), the reader parses the header and
reads each chunk at its offset.

Files written by the `safetensors` library import fine when a manifest is given, e.g.
``safetensors.torch.save_file({"layer_1": t1, "layer_4": t4})`` then
``import_safetensors(path, dest, manifest=Manifest(layout=..., dtype=DType.FLOAT16))``; tensors
whose names do not start with ``layer_`` are ignored. To import an exported file as another
dtype, pass its manifest with the dtype replaced: read it with
``safe_open(path, "np").metadata()["memstore.manifest"]`` and `Manifest.from_json`.

Conversions: widening (float16/bfloat16 -> float32) is exact; narrowing rounds to nearest even,
as the memstore does everywhere (`DType.from_float64`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from memstore.create import write_initial_state
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, TableFormatError
from memstore.integrity import write_table_sums
from memstore.offline import reading_offline
from memstore.table import Table
from memstore.tabledir.fsafe import writing_durably
from memstore.tabledir.manifest import Backend, Init, Manifest
from memstore.tabledir.names import MANIFEST_NAME, shard_dirs
from memstore.tabledir.staging import check_replaceable, check_table_root, replace_table_dir, staged

FORMAT = "1"
MANIFEST_KEY = "memstore.manifest"
FORMAT_KEY = "memstore.format"
DEFAULT_CHUNK_ROWS = 65_536

_ST_DTYPES = {DType.FLOAT32: "F32", DType.FLOAT16: "F16", DType.BFLOAT16: "BF16"}
_FROM_ST = {name: dtype for dtype, name in _ST_DTYPES.items()}
_RAW = "U8"  # quantized rows travel raw ([rows, dim + 4] bytes); the manifest says which format
# The safetensors library refuses headers above 100 MB; so do we, before reading one into memory.
_MAX_HEADER_BYTES = 100_000_000


def tensor_name(layer_id: int) -> str:
    """The name of one layer's tensor in an exported file."""
    return f"layer_{layer_id}"


def export_safetensors(
    table_dir: str | Path,
    dest: str | Path,
    dtype: DType | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write every layer's rows to a safetensors file at `dest` (in `dtype`, default the table's); returns dest.

    `progress(rows)` is called after each chunk. The file is written to a temp file beside it, fsynced
    and renamed, so `dest` is either the old file or the complete new one. The table is read offline
    (memstore.offline): refused while a daemon trains it (export a snapshot of it instead) and
    while its files may lack pushes its log holds. Optimizer state is not exported.
    """
    dest = Path(dest)
    _check_chunk_rows(chunk_rows)
    if dest.is_dir():
        raise InvalidArgumentError(f"{dest} is a directory; give the path of the .safetensors file to write")
    _check_whole(Path(table_dir))
    with reading_offline(table_dir, "export"), Table.open(table_dir) as table:
        manifest = table.manifest
        out_dtype = manifest.dtype if dtype is None else dtype
        if not isinstance(out_dtype, DType):
            raise InvalidArgumentError(f"dtype must be a DType (one of {[d.value for d in DType]}); got {dtype!r}")
        layout = manifest.layout
        header = _header(manifest, out_dtype)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with writing_durably(dest) as f:  # a private temp file: never through a planted DEST.tmp link
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for layer_id in layout.layer_ids:  # the header's data order
                for start, count in _chunks(layout.num_rows(layer_id), chunk_rows):
                    rows = table.gather(layer_id, np.arange(start, start + count, dtype=np.int64))
                    f.write(_convert(rows, manifest.dtype, out_dtype))
                    if progress is not None:
                        progress(count)
    return dest


def import_safetensors(
    src: str | Path,
    dest_table_dir: str | Path,
    manifest: Manifest | None = None,
    overwrite: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Create a table at `dest_table_dir` from a safetensors file; returns the table's path.

    The manifest comes from the file's metadata unless given (a file made elsewhere: the caller
    gives the layout and dtype). Every layer must be present as ``layer_{id}``, shape
    [num_rows, dim], dtype F32/F16/BF16 (converted to the manifest's dtype). The file is checked
    completely before anything is written; the table is built in a hidden directory beside the
    target and renamed into place. With `overwrite`, an existing memstore table (only) is moved
    aside, never rewritten in place, and removed once the new one is in place. A manifest with an
    optimizer gets fresh optimizer state, as `create_table` writes it.
    """
    src = Path(src)
    dest = Path(dest_table_dir)
    _check_chunk_rows(chunk_rows)
    with open(_check_src(src), "rb") as f:
        st = _read_header(f, src)
        if manifest is None:
            manifest = _manifest_from_metadata(st, src)
        if manifest.backend is not Backend.MMAP:
            raise InvalidArgumentError("import writes mmap tables; give a manifest with backend 'mmap'")
        if manifest.sharding is not None:  # the file holds every row: a shard's table would not match it
            raise InvalidArgumentError(
                f"the manifest describes shard {manifest.sharding.shard} of {manifest.sharding.num_shards} (it has a "
                '"sharding" section) but import writes whole tables: set "sharding" to null, import, then '
                "`memstore reshard` the table into shards"
            )
        entries = _check_entries(st, manifest, src)
        _check_dest(dest, overwrite)
        with staged(dest, "importing") as tmp:
            layout = manifest.layout
            digest = hashlib.sha256()
            for layer_id in layout.layer_ids:
                entry = entries[layer_id]
                with open(tmp / manifest.layer_file(layer_id), "wb") as out:
                    for start, count in _chunks(layout.num_rows(layer_id), chunk_rows):
                        rows = _read_rows(f, st, entry, start, count, src)
                        data = _convert(rows, entry.dtype, manifest.dtype)
                        digest.update(data)
                        out.write(data)
                        if progress is not None:
                            progress(count)
                    out.flush()
                    os.fsync(out.fileno())
                write_initial_state(tmp, manifest, layer_id)  # the file holds rows: the optimizer starts afresh
            manifest = replace(manifest, init=Init.EAGER, rows_sha256=digest.hexdigest())
            manifest.write(tmp)  # also fsyncs tmp, making the row files' entries durable
            write_table_sums(tmp, manifest)  # the rows' checksums, kept current by every push
            replace_table_dir(tmp, dest, overwrite)
    return dest


def load_into_embedding(src: str | Path, layer_id: int, embedding: torch.nn.Embedding) -> None:
    """Copy layer `layer_id`'s rows from an exported file into `embedding` (same shape; converted to its dtype).

    How a model uses a memstore-trained table without the service, e.g. into
    `model.sources.LocalTable(...).embedding`. Streams in chunks; the weight may be on any device.
    """
    src = Path(src)
    weight = embedding.weight
    with open(_check_src(src), "rb") as f:
        st = _read_header(f, src)
        name = tensor_name(layer_id)
        if name not in st.entries:
            layers = sorted(n for n in st.entries if n.startswith("layer_"))
            raise InvalidArgumentError(f"{src} has no tensor {name!r}; its layer tensors are {layers}")
        entry = _supported(st.entries[name], src)
        if entry.shape != tuple(weight.shape):
            raise InvalidArgumentError(
                f"tensor {name!r} of {src} is {list(entry.shape)} but the embedding is {list(weight.shape)}; "
                "build the embedding as nn.Embedding(num_rows, dim) of the table's layout"
            )
        with torch.no_grad():
            for start, count in _chunks(entry.shape[0], DEFAULT_CHUNK_ROWS):
                rows = _read_rows(f, st, entry, start, count, src)
                weight[start : start + count].copy_(entry.dtype.to_torch(rows))  # copy_ converts dtype/device


# --- writing -------------------------------------------------------------------------------------


def _header(manifest: Manifest, dtype: DType) -> bytes:
    """The JSON header, space-padded to a multiple of 8 (so the data section is 8-byte aligned)."""
    layout = manifest.layout
    header: dict[str, Any] = {"__metadata__": {MANIFEST_KEY: manifest.to_json(), FORMAT_KEY: FORMAT}}
    offset = 0
    for layer_id in layout.layer_ids:
        shape = [layout.num_rows(layer_id), dtype.stored_width(layout.dim)]
        size = shape[0] * dtype.row_bytes(layout.dim)
        header[tensor_name(layer_id)] = {
            "dtype": _RAW if dtype.quantized or dtype.opaque else _ST_DTYPES[dtype],
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors header; `dtype` is None for dtypes the memstore does not store."""

    name: str
    st_dtype: str
    dtype: DType | None
    shape: tuple[int, ...]
    begin: int  # byte offsets within the data section
    end: int


@dataclass(frozen=True)
class _SafeTensors:
    metadata: dict[str, str]
    entries: dict[str, _Entry]
    data_start: int  # file offset of the data section


def _read_header(f: BinaryIO, src: Path) -> _SafeTensors:
    """Parse and check the header; TableFormatError if `src` is not a well-formed safetensors file."""
    file_size = os.fstat(f.fileno()).st_size

    def bad(why: str) -> TableFormatError:
        return TableFormatError(f"{src} is not a valid safetensors file: {why}")

    prefix = f.read(8)
    if len(prefix) < 8:
        raise bad(f"it holds {file_size} bytes, less than the 8-byte header size")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > min(_MAX_HEADER_BYTES, file_size - 8):
        raise bad(f"header size {header_size} exceeds the file ({file_size} bytes) or the 100 MB limit")
    try:
        header = json.loads(f.read(header_size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    data_start = 8 + header_size
    data_size = file_size - data_start
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        try:
            st_dtype = info["dtype"]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not isinstance(st_dtype, str) or not all(_is_count(n) for n in (*shape, begin, end)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} needs dtype (string), shape and data_offsets (non-negative ints)") from None
        if not begin <= end <= data_size:
            raise bad(f"tensor {name!r} has data_offsets [{begin}, {end}] outside the {data_size}-byte data section")
        dtype = _FROM_ST.get(st_dtype)
        if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} is {list(shape)} of {st_dtype} but holds {end - begin} bytes")
        entries[name] = _Entry(name, st_dtype, dtype, shape, begin, end)
    return _SafeTensors(metadata, entries, data_start)


def _manifest_from_metadata(st: _SafeTensors, src: Path) -> Manifest:
    text = st.metadata.get(MANIFEST_KEY)
    if text is None:
        raise InvalidArgumentError(
            f"{src} has no {MANIFEST_KEY!r} metadata (it was not exported by the memstore); "
            "pass the table's manifest, e.g. manifest=Manifest(layout=..., dtype=...)"
        )
    version = st.metadata.get(FORMAT_KEY)
    if version != FORMAT:
        raise TableFormatError(f"{src} is memstore export format {version!r}; this memstore reads format {FORMAT!r}")
    return Manifest.from_json(text)


def _check_entries(st: _SafeTensors, manifest: Manifest, src: Path) -> dict[int, _Entry]:
    """Each manifest layer's tensor; InvalidArgumentError for a missing, misshapen, extra or unstorable one."""
    layout = manifest.layout
    expected = {tensor_name(layer_id): layer_id for layer_id in layout.layer_ids}
    extra = sorted(name for name in st.entries if name.startswith("layer_") and name not in expected)
    if extra:
        raise InvalidArgumentError(
            f"{src} has tensors {extra} for layers the manifest does not have (layers {list(layout.layer_ids)}); "
            "remove them or give a manifest whose layout includes those layers"
        )
    entries = {}
    for name, layer_id in expected.items():
        entry = st.entries.get(name)
        if entry is None:
            raise InvalidArgumentError(
                f"{src} has no tensor {name!r}: the manifest's layout has layers {list(layout.layer_ids)}, "
                f"the file has {sorted(n for n in st.entries if n.startswith('layer_'))}"
            )
        if entry.st_dtype == _RAW and (manifest.dtype.quantized or manifest.dtype.opaque):  # raw rows
            entry = replace(entry, dtype=manifest.dtype)
        shape = (layout.num_rows(layer_id), layout.dim)
        if entry.dtype is not None:
            shape = (shape[0], entry.dtype.stored_width(layout.dim))
        if entry.shape != shape:
            raise InvalidArgumentError(
                f"tensor {name!r} of {src} is {list(entry.shape)}; layer {layer_id} of the layout needs "
                f"{list(shape)} (num_rows, dim): check the layout, or the table the file came from"
            )
        entries[layer_id] = _supported(entry, src)
    return entries


def _supported(entry: _Entry, src: Path) -> _Entry:
    if entry.dtype is None:
        raise InvalidArgumentError(
            f"tensor {entry.name!r} of {src} has dtype {entry.st_dtype}; the memstore reads "
            f"{sorted(_FROM_ST)}: convert it first (e.g. tensor.float())"
        )
    return entry


def _read_rows(f: BinaryIO, st: _SafeTensors, entry: _Entry, start: int, count: int, src: Path) -> np.ndarray:
    """Rows start..start+count of a 2-D entry, as the raw storage array [count, dim] of its dtype."""
    assert entry.dtype is not None
    dim = entry.shape[1]
    rows = np.empty((count, dim), dtype=entry.dtype.numpy)
    f.seek(st.data_start + entry.begin + start * dim * entry.dtype.itemsize)  # dim: stored units per row
    buf = rows.reshape(-1).view(np.uint8)
    if f.readinto(buf) != buf.nbytes:  # sizes were checked: only a file truncated under us gets here
        raise TableFormatError(f"{src} ended inside tensor {entry.name!r}; was it changed while being read?")
    return rows


# --- shared --------------------------------------------------------------------------------------


def _convert(rows: np.ndarray, src: DType, dst: DType) -> np.ndarray:
    """Raw rows of `src` as raw rows of `dst`: widening is exact, narrowing rounds to nearest even."""
    if src is dst:
        return rows
    if src.quantized or dst.quantized:  # decode to float32 (exact for the float types), then encode
        return dst.from_float64(src.to_float32(rows).astype(np.float64))
    if src is DType.BFLOAT16:
        # bfloat16 is the top half of a float32: widening is a shift.
        wide = (rows.astype("<u4") << np.uint32(16)).view("<f4")
    else:
        wide = rows.astype("<f4")  # float16 -> float32 is exact; float32 is a copy
    if dst is DType.FLOAT32:
        return wide
    # Every float16/bfloat16/float32 value is exact in float32, so one rounding from it is the rounding
    # from the true value (what from_float64 of float64 values would give).
    narrow = dst.from_float64(wide)
    if dst is DType.BFLOAT16:
        # from_float64's rounding add can carry a NaN's mantissa into the exponent or sign; keep NaNs NaN.
        nan = np.isnan(wide)
        if nan.any():
            narrow[nan] = (wide.view("<u4")[nan] >> np.uint32(16)).astype("<u2") | np.uint16(0x0040)
    return narrow


def _chunks(num_rows: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, num_rows, chunk_rows):
        yield start, min(chunk_rows, num_rows - start)


def _check_whole(table_dir: Path) -> None:
    """InvalidArgumentError for a sharded table or one of its shards: a file holds a whole table."""
    sharding = Manifest.read(table_dir).sharding if (table_dir / MANIFEST_NAME).is_file() else None
    if shard_dirs(table_dir) or sharding is not None:
        what = "a sharded table" if sharding is None else f"shard {sharding.shard} of {sharding.num_shards}"
        raise InvalidArgumentError(
            f"{table_dir} is {what}; export writes whole tables: reshard it to one shard first "
            "(memstore reshard SOURCE DEST --shards 1) and export DEST"
        )


def _check_chunk_rows(chunk_rows: int) -> None:
    if chunk_rows < 1:
        raise InvalidArgumentError(f"chunk_rows is {chunk_rows}; it must be at least 1")


def _check_src(src: Path) -> Path:
    if not src.is_file():
        raise InvalidArgumentError(f"{src} does not exist or is not a file; give the path of a .safetensors file")
    return src


def _check_dest(dest: Path, overwrite: bool) -> None:
    """create_table's rules: an existing path is replaced only with overwrite, and only if it is a table."""
    if dest.exists() and not overwrite:
        raise InvalidArgumentError(f"{dest} already exists; remove it or pass overwrite=True (--overwrite)")
    if os.path.lexists(dest):
        check_table_root(dest)
        check_replaceable(dest)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def rows_digest(
    table_dir: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: Callable[[int], None] | None = None
) -> str:
    """SHA-256 of every row a table directory stores (layers in order, raw bytes; a shard's rows in its
    own order): what create, import and reshard record."""
    digest = hashlib.sha256()
    with reading_offline(table_dir, "verify"), Table.open(table_dir) as table:
        manifest = table.manifest
        for layer_id in manifest.layout.layer_ids:
            store = table.store(layer_id)  # rows in the directory's own order: global ids for a whole table
            for start, count in _chunks(manifest.stored_rows(layer_id), chunk_rows):
                digest.update(store.gather(np.arange(start, start + count)).tobytes())
                if progress is not None:
                    progress(count)
    return digest.hexdigest()
