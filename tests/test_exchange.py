"""Safetensors export/import: bit-exact round trips, interop with the safetensors library, errors leave nothing."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, TableFormatError
from memstore.exchange import export_safetensors, import_safetensors, load_into_embedding
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import MANIFEST_NAME
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from model.sources import LocalTable
from tests.helpers import CREATABLE_DTYPES, FLOAT_DTYPES, SMALL_LAYOUT, make_table

LAYERS = SMALL_LAYOUT.layer_ids
DTYPES = pytest.mark.parametrize("dtype", CREATABLE_DTYPES, ids=lambda d: d.value)
FLOAT_DTYPES_ONLY = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.value)


def _all_rows(table_dir: Path) -> dict[int, np.ndarray]:
    """Every layer's rows [num_rows, dim], raw storage dtype."""
    with Table.open(table_dir) as table:
        return {layer: table.gather(layer, np.arange(SMALL_LAYOUT.num_rows(layer))) for layer in LAYERS}


def _row_files(table_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(table_dir.iterdir()) if p.name != MANIFEST_NAME}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Compare bfloat16/float16 by bit pattern (NaN-safe, -0 != 0)."""
    return tensor.view(torch.int16) if tensor.element_size() == 2 else tensor.view(torch.int32)


def _leftovers(directory: Path) -> list[str]:
    """Hidden temp dirs, moved-aside tables and .tmp files an operation should not leave behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("chunk_rows", [65_536, 1000], ids=["one-chunk", "uneven-chunks"])
@DTYPES
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: DType, chunk_rows: int) -> None:
    assert all(SMALL_LAYOUT.num_rows(layer) % 1000 for layer in LAYERS)  # 1000 does not divide a layer
    source = make_table(tmp_path / "src", dtype, seed=3)
    exported, imported = [], []
    path = export_safetensors(source, tmp_path / "t.safetensors", chunk_rows=chunk_rows, progress=exported.append)
    assert path == tmp_path / "t.safetensors"
    dest = import_safetensors(path, tmp_path / "dst", chunk_rows=chunk_rows, progress=imported.append)
    assert dest == tmp_path / "dst"
    assert Manifest.read(dest) == Manifest.read(source)
    assert _row_files(dest) == _row_files(source)
    assert sum(exported) == sum(imported) == SMALL_LAYOUT.total_rows
    chunks_per_layer = [-(-SMALL_LAYOUT.num_rows(layer) // chunk_rows) for layer in LAYERS]  # ceil
    assert max(exported) <= chunk_rows and len(exported) == len(imported) == sum(chunks_per_layer)
    assert _leftovers(tmp_path) == []


@FLOAT_DTYPES_ONLY
def test_export_loads_with_the_safetensors_library(tmp_path: Path, dtype: DType) -> None:
    source = make_table(tmp_path / "src", dtype)
    path = export_safetensors(source, tmp_path / "t.safetensors")
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    assert header_size % 8 == 0  # data section 8-byte aligned
    rows = _all_rows(source)
    tensors = load_file(path)
    assert sorted(tensors) == [f"layer_{layer}" for layer in LAYERS]
    for layer in LAYERS:
        tensor = tensors[f"layer_{layer}"]
        assert tensor.dtype == dtype.torch and tuple(tensor.shape) == (SMALL_LAYOUT.num_rows(layer), SMALL_LAYOUT.dim)
        assert torch.equal(_bits(tensor), _bits(dtype.to_torch(rows[layer])))
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        assert metadata["memstore.format"] == "1"
        assert Manifest.from_json(metadata["memstore.manifest"]) == Manifest.read(source)
        part = f.get_slice("layer_4")[10:20]
        assert torch.equal(_bits(part), _bits(dtype.to_torch(rows[4][10:20])))


def test_export_float32_from_float16_widens_exactly_and_imports_back(tmp_path: Path) -> None:
    source = make_table(tmp_path / "src", DType.FLOAT16)
    path = export_safetensors(source, tmp_path / "wide.safetensors", dtype=DType.FLOAT32, chunk_rows=777)
    rows = _all_rows(source)
    tensors = load_file(path)
    for layer in LAYERS:
        assert tensors[f"layer_{layer}"].dtype == torch.float32
        assert np.array_equal(tensors[f"layer_{layer}"].numpy(), rows[layer].astype(np.float32))
    # The metadata keeps the table's manifest (float16): importing converts back to the original bytes.
    back = import_safetensors(path, tmp_path / "back", chunk_rows=777)
    assert Manifest.read(back).dtype is DType.FLOAT16
    assert _row_files(back) == _row_files(source)
    explicit = import_safetensors(path, tmp_path / "explicit", manifest=Manifest.read(source))
    assert _row_files(explicit) == _row_files(source)
    # ... and a float32 manifest keeps the widened values.
    wide = import_safetensors(path, tmp_path / "wide", manifest=replace(Manifest.read(source), dtype=DType.FLOAT32))
    assert all(np.array_equal(r, rows[layer].astype(np.float32)) for layer, r in _all_rows(wide).items())


@FLOAT_DTYPES_ONLY
def test_bfloat16_and_float16_cross_conversion_matches_torch(tmp_path: Path, dtype: DType) -> None:
    source = make_table(tmp_path / "src", DType.BFLOAT16 if dtype is DType.FLOAT16 else DType.FLOAT16)
    other = Manifest.read(source).dtype
    path = export_safetensors(source, tmp_path / "t.safetensors", dtype=dtype)
    for layer, tensor in load_file(path).items():
        expected = other.to_torch(_all_rows(source)[int(layer.removeprefix("layer_"))]).to(dtype.torch)
        assert torch.equal(_bits(tensor), _bits(expected))


# --------------------------------------------------------------------------- files made elsewhere


def _special_values() -> torch.Tensor:
    """float32 values whose float16/bfloat16 rounding is easy to get wrong: ties, NaNs, overflow, subnormals."""
    bits = [
        0x3F808000,  # 1.00390625: bf16 tie -> even (0x3F80)
        0x3F818000,  # bf16 tie -> even (0x3F82), rounds up
        0x3F808001,  # just above a tie -> up
        0x7FFFFFFF,  # NaN with a full mantissa: a naive rounding add carries it into the sign
        0xFFC00000,  # negative quiet NaN
        0x7F800001,  # signalling NaN with only low mantissa bits: truncating to bf16 would make it inf
        0x7F7FFFFF,  # float32 max: bf16 rounds to inf, float16 overflows to inf
        0x80000001,  # smallest negative subnormal -> -0
        0x3A801000,  # float16 tie region near 1/1024
        0x477FF000,  # 65520: float16 tie between 65504 and inf -> inf
        0x33800000,  # 2**-24: smallest float16 subnormal
    ]
    return torch.tensor(np.array(bits, dtype=np.uint32).view(np.float32))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 65520 -> float16 inf
@FLOAT_DTYPES_ONLY
def test_import_a_file_written_by_save_file(tmp_path: Path, dtype: DType) -> None:
    # A table trained in process: LocalTable embeddings (float32), perturbed so they are not the init.
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for layer in LAYERS:
        weight = LocalTable(SMALL_LAYOUT, layer, seed=0).embedding.weight.detach().clone()
        weight += 0.01 * torch.randn(weight.shape, generator=generator)
        weight.view(-1)[: len(_special_values())] = _special_values()
        weights[f"layer_{layer}"] = weight
    save_file({**weights, "step": torch.tensor([7])}, tmp_path / "trained.safetensors")  # non-layer tensors ignored
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=dtype)
    dest = import_safetensors(tmp_path / "trained.safetensors", tmp_path / "t", manifest=manifest, chunk_rows=1000)
    assert Manifest.read(dest) == manifest
    for layer, rows in _all_rows(dest).items():
        expected = weights[f"layer_{layer}"].to(dtype.torch)  # torch rounds to nearest even too
        got = dtype.to_torch(rows)
        nan = expected.isnan()
        assert torch.equal(got.isnan(), nan)  # NaNs stay NaN (torch's bfloat16 NaN bits differ: any NaN will do)
        assert torch.equal(_bits(got)[~nan], _bits(expected)[~nan])
    # And the table round-trips back into the embedding it came from (exactly, for float32).
    if dtype is DType.FLOAT32:
        local = LocalTable(SMALL_LAYOUT, 4, seed=1)
        load_into_embedding(export_safetensors(dest, tmp_path / "out.safetensors"), 4, local.embedding)
        assert torch.equal(_bits(local.embedding.weight.detach()), _bits(weights["layer_4"]))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_load_into_embedding(tmp_path: Path, weight_dtype: torch.dtype) -> None:
    source = make_table(tmp_path / "src", DType.FLOAT16, seed=2)
    path = export_safetensors(source, tmp_path / "t.safetensors")
    rows = _all_rows(source)
    for layer in LAYERS:
        embedding = torch.nn.Embedding(SMALL_LAYOUT.num_rows(layer), SMALL_LAYOUT.dim, dtype=weight_dtype)
        load_into_embedding(path, layer, embedding)
        expected = torch.from_numpy(rows[layer]).to(weight_dtype)
        assert torch.equal(_bits(embedding.weight.detach()), _bits(expected))
    with pytest.raises(InvalidArgumentError, match=r"\[4912, 16\].*\[10, 16\]"):
        load_into_embedding(path, 1, torch.nn.Embedding(10, SMALL_LAYOUT.dim))
    with pytest.raises(InvalidArgumentError, match="no tensor 'layer_2'.*layer_1"):
        load_into_embedding(path, 2, torch.nn.Embedding(10, SMALL_LAYOUT.dim))


# --------------------------------------------------------------------------- errors leave nothing behind


def _tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {
        f"layer_{layer}": torch.zeros(SMALL_LAYOUT.num_rows(layer), SMALL_LAYOUT.dim, dtype=dtype) for layer in LAYERS
    }


def _bad_files() -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    missing = _tensors()
    del missing["layer_4"]
    wrong_shape = _tensors()
    wrong_shape["layer_4"] = wrong_shape["layer_4"][:-1]
    integer = _tensors()
    integer["layer_1"] = integer["layer_1"].int()
    extra = {**_tensors(), "layer_7": torch.zeros(3, SMALL_LAYOUT.dim)}
    return {
        "missing-layer": (missing, r"no tensor 'layer_4'"),
        "wrong-shape": (wrong_shape, r"\[5173, 16\].*needs \[5174, 16\]"),
        "unsupported-dtype": (integer, r"dtype I32"),
        "extra-layer": (extra, r"\['layer_7'\].*does not have"),
    }


@pytest.mark.parametrize("case", list(_bad_files()))
def test_bad_file_is_rejected_and_creates_nothing(tmp_path: Path, case: str) -> None:
    tensors, message = _bad_files()[case]
    src = tmp_path / "files" / "bad.safetensors"
    src.parent.mkdir()
    save_file(tensors, src)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidArgumentError, match=message):
        import_safetensors(src, out / "t", manifest=Manifest(layout=SMALL_LAYOUT))
    assert list(out.iterdir()) == []


def test_file_without_manifest_needs_one(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "plain.safetensors")
    with pytest.raises(InvalidArgumentError, match="no 'memstore.manifest' metadata.*pass the table's manifest"):
        import_safetensors(tmp_path / "plain.safetensors", tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors"]


@pytest.mark.parametrize(
    "content",
    [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{", struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 1 << 40) + b"{}"],
    ids=["empty", "bad-json", "not-an-object", "huge-header"],
)
def test_not_a_safetensors_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(TableFormatError, match="not a valid safetensors file"):
        import_safetensors(tmp_path / "bad.safetensors", tmp_path / "t", manifest=Manifest(layout=SMALL_LAYOUT))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_truncated_data_is_rejected(tmp_path: Path) -> None:
    path = export_safetensors(make_table(tmp_path / "src"), tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(TableFormatError, match="'layer_4'.*outside"):
        import_safetensors(path, tmp_path / "t")
    assert not (tmp_path / "t").exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- overwrite


def test_existing_dest_needs_overwrite_and_overwrite_replaces_a_table(tmp_path: Path) -> None:
    path = export_safetensors(make_table(tmp_path / "src", seed=0), tmp_path / "t.safetensors")
    existing = make_table(tmp_path / "dst", seed=1)
    before = _row_files(existing)
    with pytest.raises(InvalidArgumentError, match="already exists.*overwrite=True"):
        import_safetensors(path, existing)
    assert _row_files(existing) == before and _leftovers(tmp_path) == []
    import_safetensors(path, existing, overwrite=True)
    assert _row_files(existing) == _row_files(tmp_path / "src")
    assert Manifest.read(existing) == Manifest.read(tmp_path / "src")
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_directory_that_merely_holds_a_file_named_manifest_json(tmp_path: Path) -> None:
    """import --overwrite deleted any directory holding a file named manifest.json."""
    path = export_safetensors(make_table(tmp_path / "src"), tmp_path / "t.safetensors")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    (precious / MANIFEST_NAME).write_text("{}")
    with pytest.raises(InvalidArgumentError, match="not a memstore table: its manifest.json does not parse"):
        import_safetensors(path, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_a_destination_created_during_an_import_is_never_replaced(tmp_path: Path) -> None:
    path = export_safetensors(make_table(tmp_path / "src"), tmp_path / "t.safetensors")
    dest = tmp_path / "dst"

    def someone_creates_it(rows: int) -> None:
        if not dest.exists():
            dest.mkdir()
            (dest / "notes.txt").write_text("keep me")

    with pytest.raises(InvalidArgumentError, match="appeared while the new table was being written"):
        import_safetensors(path, dest, chunk_rows=64, progress=someone_creates_it)
    assert (dest / "notes.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []


def test_an_export_never_writes_through_a_planted_tmp_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    dest = tmp_path / "t.safetensors"
    (tmp_path / "t.safetensors.tmp").symlink_to(victim)
    export_safetensors(make_table(tmp_path / "src"), dest)
    assert victim.read_bytes() == b"keep me" and not dest.is_symlink()
    assert load_file(str(dest)).keys()


def test_overwrite_refuses_a_directory_that_is_not_a_table(tmp_path: Path) -> None:
    path = export_safetensors(make_table(tmp_path / "src"), tmp_path / "t.safetensors")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="not a memstore table"):
        import_safetensors(path, precious, overwrite=True)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and _leftovers(tmp_path) == []


def test_export_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    dest = tmp_path / "t.safetensors"
    dest.write_bytes(b"old")
    export_safetensors(make_table(tmp_path / "src", DType.BFLOAT16), dest)
    assert sorted(load_file(dest)) == ["layer_1", "layer_4"] and _leftovers(tmp_path) == []
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        export_safetensors(tmp_path / "src", tmp_path)
    with pytest.raises(InvalidArgumentError, match="chunk_rows"):
        export_safetensors(tmp_path / "src", dest, chunk_rows=0)


def test_export_header_is_what_the_docstring_says(tmp_path: Path) -> None:
    path = export_safetensors(make_table(tmp_path / "src", DType.BFLOAT16), tmp_path / "t.safetensors")
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert list(header) == ["__metadata__", "layer_1", "layer_4"]
    rows1 = SMALL_LAYOUT.num_rows(1) * SMALL_LAYOUT.dim * 2
    assert header["layer_1"] == {"dtype": "BF16", "shape": [SMALL_LAYOUT.num_rows(1), 16], "data_offsets": [0, rows1]}
    assert header["layer_4"]["data_offsets"] == [rows1, len(raw) - 8 - size]


def test_interrupted_import_and_export_leave_the_old_table_and_file(tmp_path: Path) -> None:
    source = make_table(tmp_path / "src", seed=0)
    path = export_safetensors(source, tmp_path / "t.safetensors")
    existing = make_table(tmp_path / "dst", seed=1)
    before, old_file = _row_files(existing), path.read_bytes()

    def fail(rows: int) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C after the first chunk

    with pytest.raises(KeyboardInterrupt):
        import_safetensors(path, existing, overwrite=True, chunk_rows=1000, progress=fail)
    assert _row_files(existing) == before and _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        export_safetensors(existing, path, chunk_rows=1000, progress=fail)
    assert path.read_bytes() == old_file and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "optimizer",
    [
        OptimizerConfig(OptimizerKind.ADAM),
        OptimizerConfig(OptimizerKind.ROWWISE_ADAGRAD, initial_accumulator_value=0.1),
    ],
    ids=["adam", "rowwise-adagrad"],
)
def test_trainable_table_imports_with_fresh_optimizer_state(tmp_path: Path, optimizer: OptimizerConfig) -> None:
    # A freshly created trainable table holds the initial state: the import must reproduce every file.
    manifest = Manifest(layout=SMALL_LAYOUT, optimizer=optimizer)
    source = create_table(tmp_path / "src", manifest)
    dest = import_safetensors(export_safetensors(source, tmp_path / "t.safetensors"), tmp_path / "dst", chunk_rows=999)
    assert Manifest.read(dest) == manifest
    files = _row_files(source)
    assert len(files) > len(LAYERS) and _row_files(dest) == files


def test_opaque_byte_rows_are_imported_and_served_as_they_are(tmp_path: Path, daemon_factory) -> None:
    # A production checkpoint's layout: each row 256 fp8 bytes + 8 bytes of scale (264 bytes),
    # orders 2..4 x 8 heads, head sizes of its own. The memstore serves the bytes untouched.
    from client import MemstoreClient
    from memstore.layout import EngramLayout

    sizes = tuple(tuple(tuple(101 + 2 * (8 * order + head) for head in range(8)) for order in range(3)) for _ in (0,))
    layout = EngramLayout(
        layer_ids=(2,),
        vocab_size_per_ngram=(100, 100, 100),
        max_ngram=4,
        heads_per_ngram=8,
        dim=264,
        head_sizes_override=sizes,
    )
    num_rows = layout.num_rows(2)
    rows = np.random.default_rng(0).integers(0, 256, (num_rows, 264), dtype=np.uint8)
    save_file({"layer_2": torch.from_numpy(rows)}, str(tmp_path / "ckpt.safetensors"))
    manifest = Manifest(layout=layout, dtype=DType.BYTES)
    path = import_safetensors(tmp_path / "ckpt.safetensors", tmp_path / "t", manifest)
    ids = np.random.default_rng(1).integers(0, num_rows, (4, 9))
    with Table.open(path) as table, MemstoreClient(daemon_factory(table).address) as client:
        got = client.lookup(2, ids)
        assert got.dtype == torch.uint8 and got.shape == (4, 9, 264)
        np.testing.assert_array_equal(got.numpy(), rows[ids])
        with pytest.raises(InvalidArgumentError, match="decode them in the model"):
            DType.BYTES.dequantize(got)
    with pytest.raises(InvalidArgumentError, match="imported as they are"):
        create_table(tmp_path / "new", manifest)
