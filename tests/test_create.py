"""create_table: deterministic bytes, the initial rows, overwrite rules, and interrupted creates."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from memstore.create import create_sharded, create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, WrongShardError
from memstore.exchange import rows_digest
from memstore.layout import EngramLayout, fingerprint
from memstore.rowgen import initial_rows
from memstore.sharding import Sharding
from memstore.table import Table
from memstore.tabledir import staging
from memstore.tabledir.manifest import FORMAT_VERSION, Backend, Init, Manifest
from memstore.tabledir.names import MANIFEST_NAME, shard_dirs
from tests.helpers import CREATABLE_DTYPES, make_table

LAYOUT = EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(50, 70), max_ngram=3, heads_per_ngram=2, dim=8)


def _files(path: Path) -> dict[str, bytes]:
    """Every file of a table directory, by name."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _manifest(dtype: DType = DType.FLOAT16, seed: int = 0, init_std: float = 1.0) -> Manifest:
    return Manifest(layout=LAYOUT, dtype=dtype, seed=seed, init_std=init_std)


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- determinism and content


@pytest.mark.parametrize("dtype", CREATABLE_DTYPES, ids=lambda d: d.value)
def test_chunk_size_does_not_change_the_bytes(tmp_path: Path, dtype: DType) -> None:
    tables = [create_table(tmp_path / f"chunk{chunk}", _manifest(dtype), chunk_rows=chunk) for chunk in (1, 7, 16_384)]
    reference = _files(tables[0])
    assert sorted(reference) == [
        "layer_1.rows",
        "layer_1.rows.sums",
        "layer_4.rows",
        "layer_4.rows.sums",
        MANIFEST_NAME,
    ]
    for table in tables[1:]:
        assert _files(table) == reference


def test_two_creates_are_identical(tmp_path: Path) -> None:
    a = create_table(tmp_path / "a", _manifest(seed=3))
    b = create_table(tmp_path / "b", _manifest(seed=3))
    assert _files(a) == _files(b)
    c = create_table(tmp_path / "c", _manifest(seed=4))
    assert _files(c)["layer_1.rows"] != _files(a)["layer_1.rows"]


@pytest.mark.parametrize("init_std", [1.0, 0.02])
@pytest.mark.parametrize("dtype", CREATABLE_DTYPES, ids=lambda d: d.value)
def test_rows_are_the_initial_rows(tmp_path: Path, dtype: DType, init_std: float) -> None:
    manifest = _manifest(dtype, seed=5, init_std=init_std)
    path = create_table(tmp_path / "t", manifest, chunk_rows=13)
    for layer in LAYOUT.layer_ids:
        expected = initial_rows(5, layer, 0, LAYOUT.num_rows(layer), LAYOUT.dim, init_std, dtype)
        raw = (path / manifest.layer_file(layer)).read_bytes()
        assert raw == expected.astype(dtype.numpy, copy=False).tobytes()
        assert len(raw) == manifest.layer_bytes(layer)
    with Table.open(path) as table:
        rows = table.gather(4, np.arange(LAYOUT.num_rows(4)))
        expected = initial_rows(5, 4, 0, LAYOUT.num_rows(4), LAYOUT.dim, init_std, dtype)
        assert rows.tobytes() == expected.tobytes()


def test_files_are_little_endian(tmp_path: Path) -> None:
    path = create_table(tmp_path / "t", _manifest(DType.FLOAT32))
    raw = np.frombuffer((path / "layer_1.rows").read_bytes(), dtype="<f4")
    expected = initial_rows(0, 1, 0, LAYOUT.num_rows(1), LAYOUT.dim, 1.0, DType.FLOAT32).reshape(-1)
    assert np.array_equal(raw, expected)


def test_manifest_is_valid_json(tmp_path: Path) -> None:
    manifest = _manifest(DType.BFLOAT16, seed=9, init_std=0.5)
    path = create_table(tmp_path / "t", manifest)
    data = json.loads((path / MANIFEST_NAME).read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert data["fingerprint"] == fingerprint(LAYOUT, 9) == manifest.fingerprint
    assert data["layout"] == LAYOUT.to_dict()
    assert data["layout"]["primes"] == {str(layer): LAYOUT.primes(layer) for layer in LAYOUT.layer_ids}
    assert data["dtype"] == "bfloat16"
    assert data["seed"] == 9
    assert data["init_std"] == 0.5
    assert data["backend"] == "mmap"
    assert data["files"] == {"1": "layer_1.rows", "4": "layer_4.rows"}
    assert Manifest.read(path) == manifest


def test_progress_counts_every_row(tmp_path: Path) -> None:
    calls: list[int] = []
    create_table(tmp_path / "t", _manifest(), chunk_rows=50, progress=calls.append)
    assert sum(calls) == LAYOUT.total_rows
    assert all(1 <= c <= 50 for c in calls)
    per_layer = [LAYOUT.num_rows(layer) for layer in LAYOUT.layer_ids]
    assert len(calls) == sum(-(-rows // 50) for rows in per_layer)


def test_returns_the_path_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "table"
    assert create_table(str(target), _manifest()) == target
    assert (target / MANIFEST_NAME).is_file()


@pytest.mark.parametrize("chunk_rows", [0, -5])
def test_chunk_rows_must_be_positive(tmp_path: Path, chunk_rows: int) -> None:
    with pytest.raises(InvalidArgumentError, match="chunk_rows"):
        create_table(tmp_path / "t", _manifest(), chunk_rows=chunk_rows)
    assert _entries(tmp_path) == []


# --------------------------------------------------------------------------- existing paths


def test_existing_table_is_refused_without_overwrite(tmp_path: Path) -> None:
    path = create_table(tmp_path / "t", _manifest(seed=1))
    before = _files(path)
    with pytest.raises(InvalidArgumentError, match="already exists.*overwrite"):
        create_table(path, _manifest(seed=2))
    assert _files(path) == before
    assert _entries(tmp_path) == ["t"]


@pytest.mark.parametrize("existing", ["empty dir", "file"])
def test_any_existing_path_is_refused_without_overwrite(tmp_path: Path, existing: str) -> None:
    path = tmp_path / "t"
    if existing == "file":
        path.write_text("keep me")
    else:
        path.mkdir()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        create_table(path, _manifest())
    assert _entries(tmp_path) == ["t"]


def test_overwrite_replaces_the_table(tmp_path: Path) -> None:
    path = create_table(tmp_path / "t", _manifest(DType.FLOAT32, seed=1))
    (path / "stray.txt").write_text("from the old table")
    create_table(path, _manifest(DType.FLOAT16, seed=2), overwrite=True)
    fresh = create_table(tmp_path / "fresh", _manifest(DType.FLOAT16, seed=2))
    assert _files(path) == _files(fresh)
    assert Manifest.read(path).seed == 2
    assert _entries(tmp_path) == ["fresh", "t"]  # no temporary or replaced directory left behind


def test_overwrite_of_a_missing_path_creates_it(tmp_path: Path) -> None:
    path = create_table(tmp_path / "t", _manifest(), overwrite=True)
    assert Manifest.read(path) == _manifest()


def test_overwrite_keeps_open_readers_working(tmp_path: Path) -> None:
    path = create_table(tmp_path / "t", _manifest(seed=1))
    with Table.open(path) as old:
        before = old.gather(1, np.arange(20))
        create_table(path, _manifest(seed=2), overwrite=True)
        # The old files were moved aside, never rewritten in place: the open map still reads them.
        assert old.gather(1, np.arange(20)).tobytes() == before.tobytes()
    with Table.open(path) as new:
        assert new.gather(1, np.arange(20)).tobytes() != before.tobytes()


def test_overwrite_refuses_to_replace_something_that_is_not_a_table(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a table")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("keep me")
    for name in ("file", "dir"):
        with pytest.raises(InvalidArgumentError, match="not a memstore table"):
            create_table(tmp_path / name, _manifest(), overwrite=True)
    assert (tmp_path / "file").read_text() == "not a table"
    assert (tmp_path / "dir" / "notes.txt").read_text() == "keep me"
    assert _entries(tmp_path) == ["dir", "file"]


def _precious(directory: Path, *manifests: str) -> Path:
    """A directory that is not a table but holds files named like one's (`manifests`: relative paths)."""
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me")
    for name in manifests:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text('{"not": "a memstore manifest"}')
    return directory


@pytest.mark.parametrize("planted", ["manifest.json", "shard-0/manifest.json"])
def test_overwrite_refuses_a_directory_that_merely_holds_a_file_named_manifest_json(tmp_path, planted) -> None:
    """create --overwrite deleted any directory holding manifest.json (create_table) or
    shard-0/manifest.json (create_sharded), whatever they held."""
    precious = _precious(tmp_path / "precious", planted)
    for attempt in (
        lambda: create_table(precious, _manifest(), overwrite=True),
        lambda: create_sharded(precious, _manifest(), 2, 4, overwrite=True),
    ):
        with pytest.raises(InvalidArgumentError, match="not a memstore table.*(does not parse|holds 'notes.txt')"):
            attempt()
    assert (precious / "notes.txt").read_text() == "keep me"
    assert _entries(tmp_path) == ["precious"]


def test_overwrite_refuses_a_sharded_table_with_other_files_beside_its_shards(tmp_path: Path) -> None:
    path = tmp_path / "t"
    create_sharded(path, _manifest(), 2, 4)
    (path / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="holds 'notes.txt'"):
        create_sharded(path, _manifest(seed=2), 2, 4, overwrite=True)
    assert (path / "notes.txt").read_text() == "keep me"
    (path / "notes.txt").unlink()
    create_sharded(path, _manifest(seed=2), 2, 4, overwrite=True)  # a sharded table as memstore writes it
    assert Manifest.read(path / "shard-0").seed == 2


def test_a_path_created_by_someone_else_during_a_create_is_never_replaced(tmp_path: Path) -> None:
    """The destination was checked only when the create began: what appeared there during the
    copy was moved aside and deleted."""
    path = tmp_path / "t"

    def someone_creates_it(rows: int) -> None:
        if not path.exists():
            _precious(path)

    with pytest.raises(InvalidArgumentError, match="appeared while the new table was being written"):
        create_table(path, _manifest(), chunk_rows=16, progress=someone_creates_it)
    assert (path / "notes.txt").read_text() == "keep me"
    assert _entries(tmp_path) == ["t"]


def test_an_overwrite_rechecks_the_destination_when_it_replaces_it(tmp_path: Path) -> None:
    path = create_table(tmp_path / "t", _manifest())

    def someone_swaps_it(rows: int) -> None:
        if (path / MANIFEST_NAME).exists():
            path.rename(tmp_path / "moved")
            _precious(path)

    with pytest.raises(InvalidArgumentError, match="not a memstore table"):
        create_table(path, _manifest(seed=2), chunk_rows=16, overwrite=True, progress=someone_swaps_it)
    assert (path / "notes.txt").read_text() == "keep me"
    assert _entries(tmp_path) == ["moved", "t"]


# --------------------------------------------------------------------------- interrupted creates


class _Interrupt:
    """A progress callback that raises KeyboardInterrupt after `after` chunks."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.calls = 0

    def __call__(self, rows: int) -> None:
        self.calls += 1
        if self.calls >= self.after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("after", [1, 5])
def test_interrupted_create_leaves_nothing(tmp_path: Path, after: int) -> None:
    interrupt = _Interrupt(after)
    with pytest.raises(KeyboardInterrupt):
        create_table(tmp_path / "t", _manifest(), chunk_rows=16, progress=interrupt)
    assert interrupt.calls == after
    assert _entries(tmp_path) == []  # no table, no temporary directory


def test_interrupted_overwrite_keeps_the_old_table(tmp_path: Path) -> None:
    path = create_table(tmp_path / "t", _manifest(seed=1))
    before = _files(path)
    with pytest.raises(KeyboardInterrupt):
        create_table(path, _manifest(seed=2), chunk_rows=16, overwrite=True, progress=_Interrupt(3))
    assert _files(path) == before
    assert _entries(tmp_path) == ["t"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_failure_while_replacing_leaves_the_old_table_at_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    """The old table is swapped for the new in one atomic step (renameat2 RENAME_EXCHANGE); where that is
    not available, a failed second rename puts the old table back. PATH never ends up empty, with the old
    table hidden in a dot-directory and the new one deleted."""
    path = create_table(tmp_path / "t", _manifest(seed=1))
    before = _files(path)
    real_replace = os.replace
    calls = []

    def failing(*args: object) -> None:
        raise OSError(errno.EIO, "I/O error while replacing")

    def second_rename_fails(src: object, dst: object) -> None:
        if Path(dst) == path and not calls:  # the new table onto PATH, once the old one was moved aside
            calls.append(src)
            failing()
        real_replace(src, dst)

    if exchange:
        monkeypatch.setattr(staging, "_exchange", failing)
    else:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False, raising=False)
        monkeypatch.setattr(os, "replace", second_rename_fails)
    # (with renameat2, the only step that can fail is the exchange itself)
    with pytest.raises(OSError, match="while replacing"):
        create_table(path, _manifest(seed=2), overwrite=True)
    monkeypatch.undo()
    assert _files(path) == before
    assert _entries(tmp_path) == ["t"]
    create_table(path, _manifest(seed=2), overwrite=True)  # and without a failure, the new table
    assert Manifest.read(path) == _manifest(seed=2)


def test_failing_create_leaves_nothing(tmp_path: Path) -> None:
    def fail(rows: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        create_table(tmp_path / "t", _manifest(), progress=fail)
    assert _entries(tmp_path) == []


def test_create_after_an_interrupted_create(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        create_table(tmp_path / "t", _manifest(), chunk_rows=16, progress=_Interrupt(2))
    path = create_table(tmp_path / "t", _manifest())
    assert Manifest.read(path) == _manifest()
    assert _entries(tmp_path) == ["t"]


def test_create_records_the_sha256_of_its_rows(tmp_path) -> None:
    from memstore.exchange import rows_digest

    path = make_table(tmp_path / "t")
    recorded = Manifest.read(path).rows_sha256
    assert recorded is not None and recorded == rows_digest(path)


# --------------------------------------------------------------------------- sharded tables


def _sharded(path: Path, manifest: Manifest, shards: int = 3, partitions: int = 8) -> list[Path]:
    return create_sharded(path, manifest, shards, partitions, chunk_rows=7)


def test_shards_together_hold_the_plain_tables_rows(tmp_path: Path) -> None:
    plain = create_table(tmp_path / "plain", _manifest(DType.BFLOAT16, seed=2))
    shards = _sharded(tmp_path / "sharded", _manifest(DType.BFLOAT16, seed=2))
    assert shards == [tmp_path / "sharded" / f"shard-{k}" for k in range(3)] == shard_dirs(tmp_path / "sharded")
    for layer in LAYOUT.layer_ids:
        num_rows = LAYOUT.num_rows(layer)
        expected = np.frombuffer((plain / f"layer_{layer}.rows").read_bytes(), dtype="<u2").reshape(num_rows, -1)
        seen = np.zeros(num_rows, dtype=np.int64)
        for shard in shards:
            manifest = Manifest.read(shard)
            stored = np.frombuffer((shard / f"layer_{layer}.rows").read_bytes(), dtype="<u2").reshape(-1, LAYOUT.dim)
            assert len(stored) == manifest.stored_rows(layer)
            ids = manifest.sharding.to_global(np.arange(len(stored)), num_rows)
            assert stored.tobytes() == expected[ids].tobytes()
            seen[ids] += 1
        assert (seen == 1).all()  # every row in exactly one shard


def test_every_shard_records_the_same_table(tmp_path: Path) -> None:
    shards = _sharded(tmp_path / "t", _manifest(seed=4))
    manifests = [Manifest.read(shard) for shard in shards]
    assert {m.fingerprint for m in manifests} == {fingerprint(LAYOUT, 4)}
    assert {m.sharding.assignment for m in manifests} == {Sharding.spread(3, 0, 8).assignment}
    assert [m.sharding for m in manifests] == [Sharding.spread(3, k, 8) for k in range(3)]
    for shard, manifest in zip(shards, manifests, strict=True):
        assert manifest.rows_sha256 == rows_digest(shard)  # each shard's own rows, in its own order
    assert _entries(tmp_path) == ["t"]


def test_a_shard_refuses_rows_it_does_not_hold(tmp_path: Path) -> None:
    shards = _sharded(tmp_path / "t", _manifest())
    with Table.open(shards[0]) as table:  # partitions 0-2 of 8
        table.gather(1, np.array([0, 8, 2]))
        with pytest.raises(WrongShardError, match=r"row 13 is in partition 5, held by shard 1; this is shard 0 of 3"):
            table.gather(1, np.array([0, 13]))
        with pytest.raises(WrongShardError, match="held by shard 2"):
            table.gather(4, np.array([7]))
        with pytest.raises(InvalidArgumentError, match="out of range"):
            table.gather(1, np.array([LAYOUT.num_rows(1)]))


def test_lazy_shards_read_the_eager_rows(tmp_path: Path) -> None:
    eager = _sharded(tmp_path / "eager", _manifest(DType.FLOAT32, seed=6))
    lazy = _sharded(tmp_path / "lazy", replace(_manifest(DType.FLOAT32, seed=6), init=Init.LAZY))
    for eager_shard, lazy_shard in zip(eager, lazy, strict=True):
        assert (lazy_shard / "layer_1.rows").stat().st_blocks == 0  # nothing written
        with Table.open(eager_shard) as e, Table.open(lazy_shard) as z:
            for layer in LAYOUT.layer_ids:
                sharding = e.manifest.sharding
                ids = sharding.to_global(np.arange(e.manifest.stored_rows(layer)), LAYOUT.num_rows(layer))
                assert z.gather(layer, ids).tobytes() == e.gather(layer, ids).tobytes()


def test_lmdb_shards(tmp_path: Path) -> None:
    plain = create_table(tmp_path / "plain", _manifest(seed=1))
    shards = _sharded(tmp_path / "t", replace(_manifest(seed=1), backend=Backend.LMDB), shards=2, partitions=4)
    assert (shards[1] / "layer_4.lmdb" / "data.mdb").is_file()
    with Table.open(plain) as whole:
        for shard in shards:
            with Table.open(shard) as table:
                for layer in LAYOUT.layer_ids:
                    ids = np.flatnonzero(table.manifest.sharding.shard_of(np.arange(LAYOUT.num_rows(layer))) == 1)
                    if table.manifest.sharding.shard == 1:
                        assert table.gather(layer, ids[::-1]).tobytes() == whole.gather(layer, ids[::-1]).tobytes()
                    else:
                        with pytest.raises(WrongShardError):
                            table.gather(layer, ids[:1])


@pytest.mark.parametrize(
    ("shards", "partitions", "message"), [(9, 8, "9 shards need 1..8"), (2, 10**4, "fewer than 10000 partitions")]
)
def test_impossible_shardings_leave_nothing(tmp_path: Path, shards: int, partitions: int, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        create_sharded(tmp_path / "t", _manifest(), shards, partitions)
    assert _entries(tmp_path) == []
