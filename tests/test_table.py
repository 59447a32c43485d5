"""Opening tables made by create_table: gathers, chunked gathers, updates, and every way
a table directory can be damaged or tampered with."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, ReadOnlyError, TableFormatError
from memstore.layout import EngramLayout
from memstore.rowgen import initial_rows
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import MANIFEST_NAME
from tests.helpers import CREATABLE_DTYPES

LAYOUT = EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(50, 70), max_ngram=3, heads_per_ngram=2, dim=8)


def _make(path: Path, dtype: DType = DType.FLOAT16, layout: EngramLayout = LAYOUT, seed: int = 0) -> Path:
    return create_table(path, Manifest(layout=layout, dtype=dtype, seed=seed))


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    return _make(tmp_path / "table")


@pytest.fixture
def table(table_path: Path) -> Iterator[Table]:
    with Table.open(table_path) as opened:
        yield opened


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _expected(layer: int, dtype: DType = DType.FLOAT16, layout: EngramLayout = LAYOUT, seed: int = 0) -> np.ndarray:
    return initial_rows(seed, layer, 0, layout.num_rows(layer), layout.dim, 1.0, dtype)


# --------------------------------------------------------------------------- open and gather


def test_open_reads_the_manifest(table: Table, table_path: Path) -> None:
    assert table.path == table_path
    assert table.manifest == Manifest(layout=LAYOUT, dtype=DType.FLOAT16, seed=0)
    for layer in LAYOUT.layer_ids:
        store = table.store(layer)
        assert (store.num_rows, store.dim, store.dtype, store.read_only) == (
            LAYOUT.num_rows(layer),
            LAYOUT.dim,
            DType.FLOAT16,
            True,
        )


@pytest.mark.parametrize("dtype", CREATABLE_DTYPES, ids=lambda d: d.value)
def test_gather_returns_the_initial_rows(tmp_path: Path, dtype: DType) -> None:
    layout = EngramLayout(layer_ids=(3, 0, 9), vocab_size_per_ngram=(60,), max_ngram=2, heads_per_ngram=3, dim=4)
    path = _make(tmp_path / "t", dtype=dtype, layout=layout, seed=11)
    with Table.open(path) as table:
        for layer in layout.layer_ids:
            expected = _expected(layer, dtype, layout, seed=11)
            ids = np.array([0, layout.num_rows(layer) - 1, 5, 5, 100])
            assert _same(table.gather(layer, ids), expected[ids])
            assert _same(table.gather(layer, np.arange(layout.num_rows(layer))), expected)


def test_path_may_be_a_string(table_path: Path) -> None:
    with Table.open(str(table_path)) as table:
        assert table.gather(1, np.array([0])).shape == (1, LAYOUT.dim)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 7, 64, 10_000])
def test_gather_chunks_concatenate_to_gather(table: Table, chunk_rows: int) -> None:
    ids = np.random.default_rng(chunk_rows).integers(0, LAYOUT.num_rows(4), size=150)
    chunks = list(table.gather_chunks(4, ids, chunk_rows))
    assert [len(c) for c in chunks[:-1]] == [chunk_rows] * (len(chunks) - 1)
    assert 1 <= len(chunks[-1]) <= chunk_rows
    assert _same(np.concatenate(chunks), table.gather(4, ids))


def test_gather_chunks_of_no_ids_yield_nothing(table: Table) -> None:
    assert list(table.gather_chunks(1, np.array([], dtype=np.int64), 4)) == []


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [-1, 10**6])
def test_bad_id_anywhere_means_no_chunk(table: Table, position: str, bad: int, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = np.arange(40)
    ids[{"first": 0, "middle": 20, "last": 39}[position]] = bad
    reads: list[int] = []
    store = table.store(1)
    real_gather = store._gather
    monkeypatch.setattr(store, "_gather", lambda chunk, out: reads.append(len(chunk)) or real_gather(chunk, out))
    chunks = table.gather_chunks(1, ids, 4)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        next(chunks)
    assert reads == []


@pytest.mark.parametrize("chunk_rows", [0, -1])
def test_gather_chunks_rejects_non_positive_chunk_rows(table: Table, chunk_rows: int) -> None:
    with pytest.raises(InvalidArgumentError):
        list(table.gather_chunks(1, np.arange(5), chunk_rows))


@pytest.mark.parametrize("layer", [0, 2, 5, -1])
def test_unknown_layer_names_the_layers(table: Table, layer: int) -> None:
    with pytest.raises(InvalidArgumentError, match=rf"unknown Engram layer {layer}.*\[1, 4\]"):
        table.gather(layer, np.array([0]))
    with pytest.raises(InvalidArgumentError, match=r"\[1, 4\]"):
        table.store(layer)
    with pytest.raises(InvalidArgumentError, match=r"\[1, 4\]"):
        next(table.gather_chunks(layer, np.array([0]), 4))
    with pytest.raises(InvalidArgumentError, match=r"\[1, 4\]"):
        table.update(layer, np.array([0]), np.zeros((1, LAYOUT.dim), dtype=np.float16))


def test_layers_are_separate(table: Table) -> None:
    assert not np.array_equal(table.gather(1, np.arange(10)), table.gather(4, np.arange(10)))


# --------------------------------------------------------------------------- updates


def test_update_is_visible_and_durable(table_path: Path) -> None:
    new = np.full((2, LAYOUT.dim), 0.5, dtype=np.float16)
    with Table.open(table_path, read_only=False) as table:
        table.update(4, np.array([7, 3]), new)
        assert _same(table.gather(4, np.array([3, 7])), new)
        table.flush()
    with Table.open(table_path) as table:
        assert _same(table.gather(4, np.array([7, 3])), new)
        untouched = np.setdiff1d(np.arange(LAYOUT.num_rows(4)), [3, 7])
        assert _same(table.gather(4, untouched), _expected(4)[untouched])
        assert _same(table.gather(1, np.arange(LAYOUT.num_rows(1))), _expected(1))


def test_read_only_table_refuses_updates(table: Table) -> None:
    with pytest.raises(ReadOnlyError):
        table.update(1, np.array([0]), np.zeros((1, LAYOUT.dim), dtype=np.float16))


def test_close_twice_is_harmless(table_path: Path) -> None:
    table = Table.open(table_path)
    table.close()
    table.close()


# --------------------------------------------------------------------------- damage and tampering


def _edit_manifest(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    manifest_path = path / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    edit(data)
    manifest_path.write_text(json.dumps(data, indent=2))


def _drop_primes(layout: dict[str, Any], **changes: object) -> None:
    layout.update(changes)
    del layout["primes"]


TAMPERING: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("fingerprint edited", lambda d: d.update(fingerprint="0123456789abcdef"), "fingerprint 0123456789abcdef does not"),
    ("seed edited", lambda d: d.update(seed=1), "does not match its layout"),
    ("dim edited", lambda d: d["layout"].update(dim=16), "does not match its layout"),
    ("layer order edited", lambda d: d["layout"].update(layer_ids=[4, 1]), "prime rule"),
    ("vocab edited", lambda d: _drop_primes(d["layout"], vocab_size_per_ngram=[51, 70]), "does not match"),
    ("prime edited", lambda d: d["layout"]["primes"]["1"][0].__setitem__(0, 59), "prime rule"),
    ("unknown top-level key", lambda d: d.update(compression="zstd"), r"unknown keys \['compression'\]"),
    ("unknown layout key", lambda d: d["layout"].update(n_embed=64), r"unknown layout keys \['n_embed'\]"),
    ("newer format version", lambda d: d.update(format_version=2), "format version 2 is not supported"),
    ("version as string", lambda d: d.update(format_version="1"), "format version .*1.* is not supported"),
    ("missing format version", lambda d: d.pop("format_version"), "malformed.*format_version"),
    ("missing fingerprint", lambda d: d.pop("fingerprint"), "malformed.*fingerprint"),
    ("missing files", lambda d: d.pop("files"), "malformed.*files"),
    ("missing dtype", lambda d: d.pop("dtype"), "malformed.*dtype"),
    ("missing layout", lambda d: d.pop("layout"), "malformed.*layout"),
    ("unknown dtype", lambda d: d.update(dtype="float64"), "malformed.*float64"),
    ("unknown backend", lambda d: d.update(backend="rocksdb"), "malformed.*rocksdb"),
    ("seed not a number", lambda d: d.update(seed="zero"), "malformed"),
    ("layout not a dict", lambda d: d.update(layout=[1, 4]), "malformed"),
    ("invalid layout", lambda d: d["layout"].update(dim=0), "malformed.*dim is 0"),
    ("dtype of another size", lambda d: d.update(dtype="float32"), "edited after memstore wrote it: dtype"),
    ("other row generator", lambda d: d.update(init_generator="philox-v0"), "generator 'philox-v0'"),
    ("missing row generator", lambda d: d.pop("init_generator"), "malformed.*init_generator"),
]


@pytest.mark.parametrize(("edit", "message"), [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING])
def test_tampered_manifest_is_a_format_error(
    table_path: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    _edit_manifest(table_path, edit)
    with pytest.raises(TableFormatError, match=message):
        Table.open(table_path)


@pytest.mark.parametrize("text", ["", "{", '{"format_version": 1,', "not json", "[]", "[1, 2]"], ids=repr)
def test_unparsable_manifest_is_a_format_error(table_path: Path, text: str) -> None:
    (table_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(TableFormatError, match="malformed"):
        Table.open(table_path)


@pytest.mark.parametrize("text", ["null", "42", '"manifest"', "true"])
def test_non_object_manifest_is_a_format_error(table_path: Path, text: str) -> None:
    (table_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(TableFormatError, match="malformed"):
        Table.open(table_path)


def test_missing_manifest(table_path: Path) -> None:
    (table_path / MANIFEST_NAME).unlink()
    with pytest.raises(TableFormatError, match=r"not a memstore table: manifest\.json is missing"):
        Table.open(table_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TableFormatError, match="not a memstore table"):
        Table.open(tmp_path / "nowhere")


def test_missing_row_file(table_path: Path) -> None:
    (table_path / "layer_4.rows").unlink()
    with pytest.raises(TableFormatError, match=r"layer_4\.rows is missing"):
        Table.open(table_path)


@pytest.mark.parametrize("change", [-1, -LAYOUT.dim * 2, 1, 4096], ids=["-1 B", "-1 row", "+1 B", "+4 KiB"])
def test_row_file_of_wrong_size(table_path: Path, change: int) -> None:
    row_file = table_path / "layer_1.rows"
    size = row_file.stat().st_size
    with open(row_file, "r+b") as f:
        f.truncate(size + change)
    message = rf"layer_1\.rows holds {size + change} bytes; the manifest needs {size}"
    with pytest.raises(TableFormatError, match=message):
        Table.open(table_path)
    with pytest.raises(TableFormatError):
        Table.open(table_path, read_only=False)


def test_manifest_written_by_create_reads_back(table_path: Path) -> None:
    manifest = Manifest.read(table_path)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert (table_path / MANIFEST_NAME).read_text() == manifest.to_json()
