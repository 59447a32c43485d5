"""The row store contract, one suite for every backend.

To add a backend, write its three hooks and add one `Backend(...)` line to BACKENDS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import pytest

from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, ReadOnlyError, TableFormatError
from memstore.rowcache import RowCache, RowCacheConfig, slots_bytes
from memstore.storage import MmapRowStore, RowStore
from memstore.storage.cached import CachedRowStore
from memstore.storage.lmdb_store import LmdbRowStore
from tests.helpers import FLOAT_DTYPES, join_all, readline_within

NUM_ROWS, DIM = 37, 8


@dataclass(frozen=True)
class Backend:
    """How the suite lays down rows for a backend, opens them, and damages them."""

    name: str
    write: Callable[[Path, np.ndarray], None]  # initial rows [num_rows, dim] of the storage dtype into a directory
    open: Callable[[Path, int, int, DType, bool], RowStore]  # (directory, num_rows, dim, dtype, read_only)
    truncate: Callable[[Path], None]  # make the stored data the wrong size
    snapshot: Callable[[Path], bytes]  # everything the backend holds on disk


def _mmap_file(directory: Path) -> Path:
    return directory / "layer.rows"


def _mmap_write(directory: Path, rows: np.ndarray) -> None:
    _mmap_file(directory).write_bytes(np.ascontiguousarray(rows).tobytes())


def _mmap_open(directory: Path, num_rows: int, dim: int, dtype: DType, read_only: bool) -> RowStore:
    return MmapRowStore(_mmap_file(directory), num_rows, dim, dtype, read_only=read_only)


def _mmap_truncate(directory: Path) -> None:
    with open(_mmap_file(directory), "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)


def _mmap_snapshot(directory: Path) -> bytes:
    return _mmap_file(directory).read_bytes()


_LMDB_BLOCK_ROWS = 8  # NUM_ROWS = 37: four whole blocks and a short last one


def _lmdb_env(directory: Path) -> Path:
    return directory / "layer.lmdb"


def _storage_dtype(rows: np.ndarray) -> DType:
    return next(dtype for dtype in FLOAT_DTYPES if dtype.numpy == rows.dtype)


def _lmdb_write(directory: Path, rows: np.ndarray) -> None:
    num_rows, dim = rows.shape
    LmdbRowStore.create(_lmdb_env(directory), num_rows, dim, _storage_dtype(rows), [rows], _LMDB_BLOCK_ROWS)


def _lmdb_open(directory: Path, num_rows: int, dim: int, dtype: DType, read_only: bool) -> RowStore:
    return LmdbRowStore(_lmdb_env(directory), num_rows, dim, dtype, read_only=read_only)


def _lmdb_truncate(directory: Path) -> None:
    """Drop the last block, as a copy cut short would."""
    with lmdb.open(str(_lmdb_env(directory)), max_dbs=2) as env:
        rows_db = env.open_db(b"rows", create=False)
        with env.begin(write=True, db=rows_db) as txn:
            with txn.cursor() as cursor:
                assert cursor.last() and cursor.delete()


def _lmdb_snapshot(directory: Path) -> bytes:
    return (_lmdb_env(directory) / "data.mdb").read_bytes()


class _CachedStore(CachedRowStore):
    """A store behind a row cache of its own (the daemon shares one among its layers), small enough
    that the suite's rows evict each other (four sets of two)."""

    def __init__(self, inner: RowStore) -> None:
        row_bytes = inner.dim * inner.dtype.itemsize
        super().__init__(inner, RowCache(RowCacheConfig(bytes=slots_bytes(8, row_bytes), ways=2), row_bytes), 3)

    def close(self) -> None:
        super().close()
        self.cache.close()


def _cached(open_store: Callable[[Path, int, int, DType, bool], RowStore]) -> Callable[..., RowStore]:
    return lambda *args: _CachedStore(open_store(*args))


BACKENDS = [
    Backend("mmap", _mmap_write, _mmap_open, _mmap_truncate, _mmap_snapshot),
    Backend("lmdb", _lmdb_write, _lmdb_open, _lmdb_truncate, _lmdb_snapshot),
    Backend("mmap+rowcache", _mmap_write, _cached(_mmap_open), _mmap_truncate, _mmap_snapshot),
    Backend("lmdb+rowcache", _lmdb_write, _cached(_lmdb_open), _lmdb_truncate, _lmdb_snapshot),
]


@pytest.fixture(params=BACKENDS, ids=lambda backend: backend.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda dtype: dtype.value)
def dtype(request: pytest.FixtureRequest) -> DType:
    return request.param


def _rows(dtype: DType, num_rows: int = NUM_ROWS, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Distinct finite rows of the storage dtype."""
    values = np.random.default_rng(seed).standard_normal((num_rows, dim))
    return dtype.from_float64(values)


class Opened:
    """A store over known initial rows; closes whatever it opened."""

    def __init__(self, backend: Backend, directory: Path, dtype: DType) -> None:
        self.backend = backend
        self.directory = directory
        self.dtype = dtype
        self.initial = _rows(dtype)
        backend.write(directory, self.initial)
        self._open: list[RowStore] = []

    def open(self, read_only: bool = False) -> RowStore:
        store = self.backend.open(self.directory, NUM_ROWS, DIM, self.dtype, read_only)
        self._open.append(store)
        return store

    def close(self, store: RowStore) -> None:
        self._open.remove(store)
        store.close()

    def close_all(self) -> None:
        for store in self._open:
            store.close()
        self._open.clear()


@pytest.fixture
def opened(backend: Backend, dtype: DType, tmp_path: Path) -> Iterator[Opened]:
    holder = Opened(backend, tmp_path, dtype)
    yield holder
    holder.close_all()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (the raw storage words)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------- gather


def test_gather_returns_rows_in_request_order_with_duplicates(opened: Opened) -> None:
    store = opened.open(read_only=True)
    ids = np.array([5, 0, 36, 5, 5, 17, 0], dtype=np.int64)
    got = store.gather(ids)
    assert got.dtype == opened.dtype.numpy and got.shape == (len(ids), DIM)
    assert _same(got, opened.initial[ids])


def test_gather_everything(opened: Opened) -> None:
    store = opened.open(read_only=True)
    assert _same(store.gather(np.arange(NUM_ROWS)), opened.initial)
    assert _same(store.gather(np.arange(NUM_ROWS)[::-1]), opened.initial[::-1])


@pytest.mark.parametrize("id_dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64])
def test_gather_accepts_any_integer_dtype(opened: Opened, id_dtype: type) -> None:
    store = opened.open(read_only=True)
    ids = np.array([3, 1, 36], dtype=id_dtype)
    assert _same(store.gather(ids), opened.initial[[3, 1, 36]])


def test_gather_accepts_non_contiguous_ids(opened: Opened) -> None:
    store = opened.open(read_only=True)
    ids = np.arange(NUM_ROWS)[::3]
    assert _same(store.gather(ids), opened.initial[ids])


def test_empty_gather(opened: Opened) -> None:
    store = opened.open(read_only=True)
    got = store.gather(np.array([], dtype=np.int64))
    assert got.shape == (0, DIM) and got.dtype == opened.dtype.numpy


def test_gather_into_out_writes_the_rows_there(opened: Opened) -> None:
    store = opened.open(read_only=True)
    ids = np.array([5, 0, 5, NUM_ROWS - 1])
    out = np.full((len(ids), DIM), 7, dtype=opened.dtype.numpy)
    assert store.gather(ids, out) is out
    assert _same(out, opened.initial[ids])


@pytest.mark.parametrize(
    "make_out",
    [
        lambda dtype: np.empty((3, DIM), dtype=dtype),  # wrong row count
        lambda dtype: np.empty((2, DIM + 1), dtype=dtype),  # wrong width
        lambda dtype: np.empty((2, DIM), dtype=np.float64),  # wrong dtype
        lambda dtype: np.empty((DIM, 2), dtype=dtype).T,  # not contiguous
        lambda dtype: _read_only(np.empty((2, DIM), dtype=dtype)),
    ],
    ids=["rows", "width", "dtype", "strided", "read-only"],
)
def test_gather_rejects_an_unfit_out(opened: Opened, make_out) -> None:
    store = opened.open(read_only=True)
    with pytest.raises(InvalidArgumentError, match="out"):
        store.gather(np.array([0, 1]), make_out(opened.dtype.numpy))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def test_gather_returns_a_copy(opened: Opened) -> None:
    store = opened.open(read_only=False)
    got = store.gather(np.array([2, 3]))
    got[:] = 0
    assert _same(store.gather(np.array([2, 3])), opened.initial[[2, 3]])


@pytest.mark.parametrize(
    "bad_ids",
    [
        [NUM_ROWS],
        [0, 1, NUM_ROWS + 5],
        [-1],
        [3, -7, 2],
        [2**40],
        [-(2**63)],
    ],
    ids=repr,
)
def test_out_of_range_ids_are_rejected_before_any_read(
    opened: Opened, bad_ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = opened.open(read_only=True)

    def no_read(ids: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        raise AssertionError("a row was read for a bad request")

    monkeypatch.setattr(store, "_gather", no_read)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        store.gather(np.array(bad_ids, dtype=np.int64))


def test_out_of_range_message_names_the_id_and_the_range(opened: Opened) -> None:
    store = opened.open(read_only=True)
    with pytest.raises(InvalidArgumentError, match=rf"row id {NUM_ROWS + 2} .*0\.\.{NUM_ROWS - 1}"):
        store.gather(np.array([1, NUM_ROWS + 2]))
    with pytest.raises(InvalidArgumentError, match=r"row id -3 "):
        store.gather(np.array([-3, 1]))


@pytest.mark.parametrize(
    ("bad_ids", "message"),
    [
        (np.array([1.0, 2.0]), "integers"),
        (np.array([True, False]), "integers"),
        (np.array(["1", "2"]), "integers"),
        (np.array([[1, 2], [3, 4]]), "1-D"),
        (np.array(3), "1-D"),
        (np.zeros((0, 1), dtype=np.int64), "1-D"),
    ],
    ids=["float", "bool", "str", "2-D", "0-D", "empty 2-D"],
)
def test_malformed_ids_are_rejected(
    opened: Opened, bad_ids: np.ndarray, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = opened.open(read_only=True)

    def no_read(ids: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        raise AssertionError("a row was read for a bad request")

    monkeypatch.setattr(store, "_gather", no_read)
    with pytest.raises(InvalidArgumentError, match=message):
        store.gather(bad_ids)


# --------------------------------------------------------------------------- update


def test_update_then_gather(opened: Opened) -> None:
    store = opened.open(read_only=False)
    ids = np.array([9, 0, 36])
    new = _rows(opened.dtype, num_rows=3, seed=1)
    store.update(ids, new)
    expected = opened.initial.copy()
    expected[ids] = new
    assert _same(store.gather(np.arange(NUM_ROWS)), expected)


def test_update_of_rows_read_before_is_seen(opened: Opened) -> None:
    """Rows gathered (and so cached, behind a row cache) then updated read back updated."""
    store = opened.open(read_only=False)
    ids = np.array([9, 0, 36, 17])
    store.gather(ids)
    new = _rows(opened.dtype, num_rows=4, seed=2)
    store.update(ids, new)
    expected = opened.initial.copy()
    expected[ids] = new
    assert _same(store.gather(ids), new)
    assert _same(store.gather(np.arange(NUM_ROWS)), expected)


def test_update_with_no_rows_changes_nothing(opened: Opened) -> None:
    store = opened.open(read_only=False)
    store.update(np.array([], dtype=np.int64), np.zeros((0, DIM), dtype=opened.dtype.numpy))
    assert _same(store.gather(np.arange(NUM_ROWS)), opened.initial)


def test_update_persists_after_flush_close_reopen(opened: Opened) -> None:
    store = opened.open(read_only=False)
    ids = np.array([4, 30, 2])
    new = _rows(opened.dtype, num_rows=3, seed=2)
    store.update(ids, new)
    store.flush()
    opened.close(store)

    expected = opened.initial.copy()
    expected[ids] = new
    for read_only in (True, False):
        again = opened.open(read_only=read_only)
        assert _same(again.gather(np.arange(NUM_ROWS)), expected)
        opened.close(again)


def test_close_makes_updates_durable(opened: Opened) -> None:
    store = opened.open(read_only=False)
    new = _rows(opened.dtype, num_rows=1, seed=3)
    store.update(np.array([11]), new)
    opened.close(store)  # no explicit flush
    again = opened.open(read_only=True)
    assert _same(again.gather(np.array([11])), new)


def _bad_updates(dtype: DType) -> list[tuple[str, np.ndarray, np.ndarray, type[Exception], str]]:
    good = _rows(dtype, num_rows=3, seed=4)
    other_dtype = np.dtype("<f4") if dtype is not DType.FLOAT32 else np.dtype("<f2")
    same_size = {DType.FLOAT32: "<i4", DType.FLOAT16: "<u2", DType.BFLOAT16: "<f2"}[dtype]
    return [
        ("duplicate ids", np.array([1, 5, 1]), good, InvalidArgumentError, "unique"),
        ("too few rows", np.array([1, 2, 3]), good[:2], InvalidArgumentError, "must be"),
        ("too many rows", np.array([1, 2]), good, InvalidArgumentError, "must be"),
        ("wrong dim", np.array([1, 2, 3]), np.ascontiguousarray(good[:, :-1]), InvalidArgumentError, "must be"),
        ("1-D rows", np.array([1]), good[0], InvalidArgumentError, "must be"),
        ("wrong dtype", np.array([1, 2, 3]), good.astype(other_dtype), InvalidArgumentError, "must be"),
        ("float64 rows", np.array([1, 2, 3]), good.astype(np.float64), InvalidArgumentError, "must be"),
        ("same-size dtype", np.array([1, 2, 3]), good.view(same_size), InvalidArgumentError, "must be"),
        ("big-endian", np.array([1, 2, 3]), good.astype(good.dtype.newbyteorder(">")), InvalidArgumentError, "must be"),
        ("out of range id", np.array([1, 2, NUM_ROWS]), good, InvalidArgumentError, "out of range"),
        ("negative id", np.array([-1, 2, 3]), good, InvalidArgumentError, "out of range"),
        ("float ids", np.array([1.0, 2.0, 3.0]), good, InvalidArgumentError, "integers"),
        ("2-D ids", np.array([[1, 2, 3]]), good, InvalidArgumentError, "1-D"),
    ]


_BAD_UPDATE_NAMES = [case[0] for case in _bad_updates(DType.FLOAT16)]


@pytest.mark.parametrize("case", range(len(_BAD_UPDATE_NAMES)), ids=_BAD_UPDATE_NAMES)
def test_bad_update_raises_and_changes_nothing(opened: Opened, case: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _, ids, rows, error, message = _bad_updates(opened.dtype)[case]
    store = opened.open(read_only=False)
    before = opened.backend.snapshot(opened.directory)

    def no_write(ids: np.ndarray, rows: np.ndarray) -> None:
        raise AssertionError("rows were written for a bad request")

    monkeypatch.setattr(store, "_update", no_write)
    with pytest.raises(error, match=message):
        store.update(ids, rows)
    monkeypatch.undo()
    store.flush()
    assert opened.backend.snapshot(opened.directory) == before
    assert _same(store.gather(np.arange(NUM_ROWS)), opened.initial)


def test_read_only_store_refuses_updates(opened: Opened) -> None:
    store = opened.open(read_only=True)
    before = opened.backend.snapshot(opened.directory)
    with pytest.raises(ReadOnlyError, match="read-only"):
        store.update(np.array([1]), _rows(opened.dtype, num_rows=1))
    store.flush()  # a no-op when read-only
    assert opened.backend.snapshot(opened.directory) == before


def test_read_only_is_checked_before_the_request(opened: Opened) -> None:
    store = opened.open(read_only=True)
    with pytest.raises(ReadOnlyError):
        store.update(np.array([-1, -1]), np.zeros(1))


# --------------------------------------------------------------------------- opening


def test_store_reports_its_shape(opened: Opened) -> None:
    store = opened.open(read_only=True)
    assert (store.num_rows, store.dim, store.dtype, store.read_only) == (NUM_ROWS, DIM, opened.dtype, True)


def test_wrong_size_storage_is_a_format_error(opened: Opened) -> None:
    opened.backend.truncate(opened.directory)
    for read_only in (True, False):
        with pytest.raises(TableFormatError, match="damaged or incomplete"):
            opened.open(read_only=read_only)


def test_wrong_shape_is_a_format_error(opened: Opened) -> None:
    with pytest.raises(TableFormatError):
        opened.backend.open(opened.directory, NUM_ROWS + 1, DIM, opened.dtype, True)
    with pytest.raises(TableFormatError):
        opened.backend.open(opened.directory, NUM_ROWS, DIM * 2, opened.dtype, True)


def test_missing_storage_is_a_format_error(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(TableFormatError, match="missing"):
        backend.open(tmp_path, NUM_ROWS, DIM, DType.FLOAT16, True)


def test_close_twice_is_harmless(opened: Opened) -> None:
    for read_only in (True, False):
        store = opened.open(read_only=read_only)
        opened.close(store)
        store.close()


# --------------------------------------------------------------------------- LMDB only


def _lmdb_store(
    path: Path, rows: np.ndarray, dtype: DType, block_rows: int, read_only: bool = False, chunk: int = 10
) -> LmdbRowStore:
    """A new LMDB store at `path` holding `rows`, written in chunks of `chunk` rows (not block-aligned)."""
    num_rows, dim = rows.shape
    chunks = (rows[start : start + chunk] for start in range(0, num_rows, chunk))
    LmdbRowStore.create(path, num_rows, dim, dtype, chunks, block_rows=block_rows)
    return LmdbRowStore(path, num_rows, dim, dtype, read_only=read_only)


@pytest.mark.parametrize("num_rows", [37, 40])
@pytest.mark.parametrize("block_rows", [1, 5, 8, 40, 64])
def test_lmdb_block_boundaries(tmp_path: Path, num_rows: int, block_rows: int) -> None:
    """Ids at block edges and in the short last block read and update right, with and without the
    located-address cache, and after reopening."""
    dtype = DType.FLOAT16
    expected = _rows(dtype, num_rows=num_rows)
    store = _lmdb_store(tmp_path / "env", expected, dtype, block_rows)
    assert store.block_rows == block_rows
    last = num_rows - 1
    edges = sorted({0, block_rows - 1, block_rows, 2 * block_rows - 1, (last // block_rows) * block_rows, last} - {-1})
    edges = np.array([i for i in edges if i < num_rows])
    for use_cache in (True, False):
        store.use_address_cache = use_cache
        assert _same(store.gather(np.arange(num_rows)), expected)
        assert _same(store.gather(edges[::-1]), expected[edges[::-1]])
        assert _same(store.gather(np.array([last, 0, last])), expected[[last, 0, last]])
    new = _rows(dtype, num_rows=len(edges), seed=9)
    store.update(edges, new)
    expected[edges] = new
    for use_cache in (True, False):
        store.use_address_cache = use_cache
        assert _same(store.gather(np.arange(num_rows)), expected)
    store.close()
    again = LmdbRowStore(tmp_path / "env", num_rows, DIM, dtype)
    assert again.block_rows == block_rows  # taken from the store
    assert _same(again.gather(np.arange(num_rows)[::-1]), expected[::-1])
    again.close()


@pytest.mark.parametrize(
    ("dim", "dtype", "block_rows", "one_phase"),
    [(64, DType.FLOAT32, 32, True), (24, DType.FLOAT32, 64, False), (8, DType.FLOAT16, 4, None)],
    ids=["blocks-on-own-pages", "odd-row-size", "blocks-inside-leaves"],
)
def test_lmdb_updates_and_gathers_interleaved_match_numpy(
    tmp_path: Path, dim: int, dtype: DType, block_rows: int, one_phase: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small updates between gathers: the addresses kept across own commits stay right, both
    where blocks have their own pages (8 KiB blocks: only touched ones move) and where they share
    leaf pages (all may move); with rows all at one offset modulo the row size (a contiguous take)
    and not (96-byte rows do not divide a page: a take by byte address)."""
    num_rows = 200 * block_rows - 3
    expected = _rows(dtype, num_rows=num_rows, dim=dim)
    store = _lmdb_store(tmp_path / "env", expected, dtype, block_rows, chunk=1000)
    rng = np.random.default_rng(5)
    for step in range(40):
        ids = rng.choice(num_rows, size=int(rng.integers(1, 30)), replace=False)
        new = _rows(dtype, num_rows=len(ids), dim=dim, seed=100 + step)
        store.update(ids, new)
        expected[ids] = new
        probe = rng.integers(0, num_rows, 500)
        assert _same(store.gather(probe), expected[probe]), step
    assert _same(store.gather(np.arange(num_rows)), expected)
    if one_phase is not None:
        assert (store._cache_phase >= 0) == one_phase
    # Warm, the cache serves every block: a gather locates nothing.
    monkeypatch.setattr(store, "_locate", lambda txn, blocks: pytest.fail("a block was located again"))
    assert _same(store.gather(np.arange(num_rows)[::-1]), expected[::-1])
    monkeypatch.undo()
    store.close()


def test_lmdb_update_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = DType.FLOAT32
    initial = _rows(dtype)
    store = _lmdb_store(tmp_path / "env", initial, dtype, block_rows=4)
    store.gather(np.arange(NUM_ROWS))  # locate every block first
    puts = []
    real_put = store._put_block

    def failing_put(txn: lmdb.Transaction, block: int, rows: np.ndarray) -> None:
        puts.append(block)
        if len(puts) == 3:
            raise OSError("disk on fire")
        real_put(txn, block, rows)

    monkeypatch.setattr(store, "_put_block", failing_put)
    ids = np.array([0, 5, 9, 13, 17, 36])  # blocks 0, 1, 2, 3, 4, 9
    with pytest.raises(OSError, match="disk on fire"):
        store.update(ids, _rows(dtype, num_rows=len(ids), seed=7))
    assert puts == [0, 1, 2]  # two blocks were put inside the transaction before it failed
    monkeypatch.undo()
    assert _same(store.gather(np.arange(NUM_ROWS)), initial)
    store.close()
    again = LmdbRowStore(tmp_path / "env", NUM_ROWS, DIM, dtype)
    assert _same(again.gather(np.arange(NUM_ROWS)), initial)
    again.close()


def _versioned_writes(store: LmdbRowStore, rows: int, enough: Callable[[], object], timeout_s: float = 30.0) -> int:
    """Rows 0..rows-1 all set to v (every value), for v = 1, 2, ... one update each, until `enough()`
    (the readers saw what they need) or `timeout_s` has passed; returns the last version written."""
    import time

    ids = np.arange(rows)
    version = 0
    deadline = time.monotonic() + timeout_s
    while not enough() and time.monotonic() < deadline:
        version += 1
        store.update(ids, np.full((rows, store.dim), version, dtype=np.float32))
        time.sleep(0)  # let the readers run between updates
    return version


# Readers must see this many versions each, while the writer writes: one would prove nothing.
_VERSIONS_SEEN = 3


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "located"])
def test_lmdb_readers_in_threads_see_whole_updates(tmp_path: Path, use_cache: bool) -> None:
    """A gather is one snapshot: while a writer sets a multi-block span of rows to a version per
    update, every gather of the span sees one single version, never mixing two, never going back."""
    import threading

    span = 30
    store = _lmdb_store(tmp_path / "env", np.zeros((NUM_ROWS, DIM), np.float32), DType.FLOAT32, block_rows=4)
    store.use_address_cache = use_cache
    failures: list[str] = []
    seen: list[set[float]] = [set() for _ in range(3)]
    done = threading.Event()

    def read(versions_seen: set[float]) -> None:
        last = 0.0
        ids = np.arange(span)[::-1]
        while not done.is_set():
            rows = store.gather(ids)
            if not (rows == rows[0, 0]).all():
                failures.append(f"a gather mixed versions {sorted(set(rows.ravel().tolist()))}")
            if rows[0, 0] < last:
                failures.append(f"went back from version {last} to {rows[0, 0]}")
            last = float(rows[0, 0])
            versions_seen.add(last)

    readers = [threading.Thread(target=read, args=(s,)) for s in seen]
    for reader in readers:
        reader.start()
    try:
        versions = _versioned_writes(store, span, lambda: all(len(s) >= _VERSIONS_SEEN for s in seen) or failures)
    finally:
        done.set()
        join_all(readers)
    assert not failures, failures[:3]
    assert all(len(s) >= _VERSIONS_SEEN for s in seen), [sorted(s) for s in seen]  # they read while it wrote
    assert all(s <= set(range(versions + 1)) for s in seen)
    assert _same(store.gather(np.arange(span)), np.full((span, DIM), versions, np.float32))
    store.close()


_READER = """
import sys, numpy as np
from memstore.dtypes import DType
from memstore.storage.lmdb_store import LmdbRowStore
store = LmdbRowStore(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), DType.FLOAT32)
span, last, seen = int(sys.argv[4]), 0.0, set()
print("ready", flush=True)
while len(seen) < int(sys.argv[5]):
    rows = store.gather(np.arange(span))
    assert (rows == rows[0, 0]).all(), sorted(set(rows.ravel().tolist()))
    assert rows[0, 0] >= last, (last, rows[0, 0])
    last = float(rows[0, 0])
    seen.add(last)
print(len(seen))
"""


def test_lmdb_reader_process_sees_whole_updates(tmp_path: Path) -> None:
    """Another process reading while this one writes: each of its gathers sees one version, and it
    sees several versions (it exits once it has; the writer writes until then)."""
    import subprocess
    import sys

    span = 30
    store = _lmdb_store(tmp_path / "env", np.zeros((NUM_ROWS, DIM), np.float32), DType.FLOAT32, block_rows=4)
    repo = Path(__file__).resolve().parent.parent
    args = [str(tmp_path / "env"), str(NUM_ROWS), str(DIM), str(span), str(_VERSIONS_SEEN)]
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, *args], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert readline_within(reader.stdout).strip() == "ready"
        _versioned_writes(store, span, lambda: reader.poll() is not None)
        assert reader.poll() is not None, f"the reader saw fewer than {_VERSIONS_SEEN} versions while they were written"
        out, err = reader.communicate(timeout=60)
    finally:
        reader.kill()  # a no-op once it exited; a hung reader must not outlive the test
        reader.communicate()
        store.close()
    assert reader.returncode == 0, err
    assert int(out) >= _VERSIONS_SEEN


def test_lmdb_write_grows_a_full_map(tmp_path: Path) -> None:
    dtype = DType.FLOAT32
    rows = _rows(dtype, num_rows=4000, dim=64)  # 1 MiB
    LmdbRowStore.create(tmp_path / "env", 4000, 64, dtype, [rows], block_rows=32)
    store = LmdbRowStore(tmp_path / "env", 4000, 64, dtype, read_only=False, map_size=1 << 20)
    before = store._env.info()["map_size"]
    new = _rows(dtype, num_rows=4000, dim=64, seed=3)
    store.update(np.arange(4000), new)  # copies every block: does not fit the map as opened
    assert store._env.info()["map_size"] > before
    assert _same(store.gather(np.arange(4000)), new)
    store.close()


def test_lmdb_open_checks_the_metadata(tmp_path: Path) -> None:
    dtype = DType.FLOAT16
    path = tmp_path / "env"
    _lmdb_store(path, _rows(dtype), dtype, block_rows=8).close()
    with pytest.raises(TableFormatError, match="8 rows per block; expected 16"):
        LmdbRowStore(path, NUM_ROWS, DIM, dtype, block_rows=16)
    with pytest.raises(TableFormatError, match="float16; expected .* float32"):
        LmdbRowStore(path, NUM_ROWS, DIM, DType.FLOAT32)
    with lmdb.open(str(path), max_dbs=2) as env, env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"layout", b"{not json")
    with pytest.raises(TableFormatError, match="unreadable metadata"):
        LmdbRowStore(path, NUM_ROWS, DIM, dtype)
    with open(path / "data.mdb", "r+b") as f:
        f.truncate(100)
    with pytest.raises(TableFormatError, match="damaged"):
        LmdbRowStore(path, NUM_ROWS, DIM, dtype)


def test_lmdb_create_is_incomplete_until_its_last_transaction(tmp_path: Path) -> None:
    dtype = DType.FLOAT16
    rows = _rows(dtype)

    def chunks_then_crash() -> Iterator[np.ndarray]:
        yield rows[:20]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LmdbRowStore.create(tmp_path / "env", NUM_ROWS, DIM, dtype, chunks_then_crash(), block_rows=4)
    with pytest.raises(TableFormatError, match="damaged or incomplete"):
        LmdbRowStore(tmp_path / "env", NUM_ROWS, DIM, dtype)
    with pytest.raises(InvalidArgumentError, match="already holds"):
        LmdbRowStore.create(tmp_path / "env", NUM_ROWS, DIM, dtype, [rows])
    with pytest.raises(InvalidArgumentError, match="held 36 rows"):
        LmdbRowStore.create(tmp_path / "short", NUM_ROWS, DIM, dtype, [rows[:36]])
    with pytest.raises(InvalidArgumentError, match="more than"):
        LmdbRowStore.create(tmp_path / "long", NUM_ROWS, DIM, dtype, [rows, rows[:1]])
    with pytest.raises(InvalidArgumentError, match="chunks must be"):
        LmdbRowStore.create(tmp_path / "wide", NUM_ROWS, DIM, dtype, [rows.astype(np.float32)])


def test_lmdb_empty_store(tmp_path: Path) -> None:
    store = _lmdb_store(tmp_path / "env", np.zeros((0, DIM), np.float16), DType.FLOAT16, block_rows=8)
    assert store.gather(np.array([], dtype=np.int64)).shape == (0, DIM)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        store.gather(np.array([0]))
    store.close()
