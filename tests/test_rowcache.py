"""The daemon's row cache (memstore.rowcache): exact rows under traffic and evictions for every store
and dtype, pushes written through, the admission race, snapshots, same-host clients through shared
memory, the positioned reads below it and their buffered fallback. (The store contract suite runs on
cached stores too: tests/test_store.py.)"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client import MemstoreClient
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveConfig, LiveTable
from memstore.metrics import DaemonMetrics, summarize
from memstore.rowcache import SHM_DIR, RowCache, RowCacheConfig, RowCacheReader, slots_bytes, slots_for
from memstore.service import create_server
from memstore.sharding import Sharding
from memstore.storage import direct
from memstore.storage.cached import CachedRowStore
from memstore.storage.direct import BLOCK, DirectReader
from memstore.table import Table
from memstore.tabledir.manifest import Backend, Init, Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from tests.helpers import CREATABLE_DTYPES, FAST_FAIL, FLOAT_DTYPES, SMALL_LAYOUT, join_all, make_table

# SMALL_LAYOUT: layers 1 and 4 of thousands of rows; the caches below hold a few hundred of them.
SMALL_ROWS = 300
SGD = OptimizerConfig(kind=OptimizerKind.SGD, lr=0.5)


def _config(rows: int, row_bytes: int, ways: int = 8) -> LiveConfig:
    return LiveConfig(row_cache=RowCacheConfig(bytes=slots_bytes(rows, row_bytes), ways=ways))


def _row_bytes(path: Path) -> int:
    manifest = Manifest.read(path)
    return manifest.dtype.row_bytes(manifest.layout.dim)


def _zipf_ids(rng: np.random.Generator, count: int, num_rows: int) -> np.ndarray:
    """Skewed ids over the whole layer (hot rows repeat; the tail forces evictions)."""
    return (rng.zipf(1.2, count) * 7919) % num_rows


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture
def no_cache_files() -> Iterator[None]:
    """Every cache file a test creates is gone when its cache closes (this process's files only:
    daemons of other processes on the machine come and go)."""
    pattern = f"memstore-rowcache-{os.getpid()}-*"
    before = set(SHM_DIR.glob(pattern))
    yield
    assert set(SHM_DIR.glob(pattern)) <= before


# --------------------------------------------------------------------------- exact rows


_CASES = [(dtype, Init.EAGER) for dtype in CREATABLE_DTYPES] + [(dtype, Init.LAZY) for dtype in FLOAT_DTYPES]


@pytest.mark.parametrize(("dtype", "init"), _CASES, ids=[f"{d.value}-{i.value}" for d, i in _CASES])
def test_rows_under_traffic_with_evictions_are_the_stores(
    tmp_path: Path, dtype: DType, init: Init, no_cache_files: None
) -> None:
    path = create_table(tmp_path / "t", Manifest(layout=SMALL_LAYOUT, dtype=dtype, seed=3, init=init))
    rng = np.random.default_rng(0)
    with Table.open(path) as plain, LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path))) as live:
        assert live.row_cache is not None
        for _ in range(40):
            for layer in SMALL_LAYOUT.layer_ids:
                ids = _zipf_ids(rng, 200, SMALL_LAYOUT.num_rows(layer))
                rows, _ = live.gather(layer, ids)
                assert _same(rows, plain.gather(layer, ids))
        stats = live.row_cache.snapshot()
        assert stats.hits > 0 and stats.evictions > 0  # both paths taken
        assert stats.hits + stats.misses == 40 * 2 * 200
        assert stats.resident_bytes <= slots_for(live.row_cache.config.bytes, _row_bytes(path), 8) * _row_bytes(path)


def test_lmdb_table_is_cached_through_its_own_gather(tmp_path: Path, no_cache_files: None) -> None:
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.BFLOAT16, seed=1, backend=Backend.LMDB)
    path = create_table(tmp_path / "t", manifest)
    rng = np.random.default_rng(1)
    with LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path))) as live:
        store = live.table.store(1)
        assert isinstance(store, CachedRowStore) and store.reader is None
        for _ in range(20):
            ids = _zipf_ids(rng, 300, SMALL_LAYOUT.num_rows(1))
            rows, _ = live.gather(1, ids)
            assert _same(rows, store.inner.gather(ids))
        assert live.row_cache.snapshot().hits > 0


def test_a_cache_larger_than_the_rows_read_misses_each_row_once(tmp_path: Path, no_cache_files: None) -> None:
    path = make_table(tmp_path / "t")
    ids = np.arange(0, 2000, 3)  # 667 distinct rows, read three times in batches
    with LiveTable.open(path, config=_config(4096, _row_bytes(path), ways=16)) as live:
        for _ in range(3):
            for batch in np.array_split(ids, 5):
                live.gather(4, batch)
        stats = live.row_cache.snapshot()
    # 4096 slots in 256 sets of 16: a set would need 17 of these rows to evict one (a few may).
    assert stats.misses == len(ids) + stats.evictions
    assert stats.hits == 2 * len(ids) - stats.evictions


def test_a_budget_below_one_set_is_refused(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t")
    with pytest.raises(InvalidArgumentError, match="row-cache-bytes at least"):
        LiveTable.open(path, config=LiveConfig(row_cache=RowCacheConfig(bytes=4096)))
    with pytest.raises(InvalidArgumentError, match="ways"):
        RowCacheConfig(bytes=1 << 20, ways=0)


def test_the_cache_file_is_removed_on_close(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t")
    live = LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path)))
    assert live.row_cache is not None
    cache_file = live.row_cache.path
    assert cache_file.exists() and cache_file.parent == SHM_DIR
    live.close()
    assert not cache_file.exists()


# --------------------------------------------------------------------------- pushes


def test_pushes_write_through_and_reads_never_see_a_stale_or_torn_row(tmp_path: Path, no_cache_files: None) -> None:
    """Readers gather through the cache while pushes go on: each (rows, version) read must be the table
    at that version, and at the end the cache must hold the files' rows."""
    path = make_table(tmp_path / "t", dtype=DType.FLOAT32, optimizer=SGD)
    num_rows = SMALL_LAYOUT.num_rows(1)
    hot = np.arange(0, num_rows, 40)  # 123 rows, read and pushed over and over
    states: dict[int, np.ndarray] = {}
    reads: list[tuple[np.ndarray, np.ndarray, int]] = []
    errors: list[BaseException] = []
    with LiveTable.open(path, config=_config(128, _row_bytes(path), ways=4)) as live, Table.open(path) as files:
        states[live.version] = files.gather(1, np.arange(num_rows))
        done = threading.Event()

        def read(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                while not done.is_set():
                    ids = rng.choice(hot, 64)
                    rows, version = live.gather(1, ids)
                    reads.append((ids, rows, version))
            except BaseException as exc:  # reported below
                errors.append(exc)

        readers = [threading.Thread(target=read, args=(seed,)) for seed in range(2)]
        for thread in readers:
            thread.start()
        rng = np.random.default_rng(9)
        try:
            for _ in range(60):
                ids = np.unique(rng.choice(hot, 50))
                grads = rng.standard_normal((len(ids), SMALL_LAYOUT.dim)).astype(np.float32)
                version = live.push(1, ids, grads).version
                states[version] = files.gather(1, np.arange(num_rows))  # pushes are serial: the table at `version`
        finally:
            done.set()
            join_all(readers)
        assert not errors, errors
        stats = live.row_cache.snapshot()
        assert stats.hits > 0
        for ids, rows, version in reads:
            assert _same(rows, states[version][ids]), f"a read of version {version} differs from the table"
        rows, _ = live.gather(1, hot)
        assert _same(rows, files.gather(1, hot))
    assert len({version for _, _, version in reads}) > 1  # reads really overlapped pushes


@pytest.mark.parametrize("updates", [1, 65], ids=["one update", "more updates than remembered"])
def test_a_miss_read_before_an_update_is_not_admitted(tmp_path: Path, updates: int, no_cache_files: None) -> None:
    """The admission race: pushes land between a miss's read and its admission. The read's (old) rows
    are returned to that caller, but the rows they wrote are never cached: the next read sees the push.
    The other rows read are admitted, unless more updates came than the cache remembers the rows of."""
    path = make_table(tmp_path / "t", dtype=DType.FLOAT32, optimizer=SGD)
    ids = np.array([5, 77, 901])
    with LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path))) as live:
        store = live.table.store(1)
        assert isinstance(store, CachedRowStore) and store.reader is not None
        old = store.inner.gather(ids)
        new = old + 1
        read = store.reader.read

        def read_then_update(wanted: np.ndarray) -> tuple[np.ndarray, int, int]:
            got = read(wanted)
            for _ in range(updates):  # what pushes apply while the miss is in flight
                store.update(ids[:1], new[:1])
            return got

        store.reader.read = read_then_update
        assert _same(store.gather(ids), old)
        store.reader.read = read
        stats = live.row_cache.snapshot()
        assert stats.stale_skipped == (1 if updates == 1 else 3)
        assert stats.admitted == (2 if updates == 1 else 0)
        expected = old.copy()
        expected[0] = new[0]
        assert _same(store.gather(ids), expected)


def test_a_snapshot_of_a_cached_table_is_the_table(tmp_path: Path, no_cache_files: None) -> None:
    path = make_table(tmp_path / "t", dtype=DType.FLOAT16, optimizer=SGD)
    rng = np.random.default_rng(4)
    with LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path))) as live:
        for _ in range(10):
            ids = np.unique(_zipf_ids(rng, 100, SMALL_LAYOUT.num_rows(4)))
            live.gather(4, ids)
            live.push(4, ids, rng.standard_normal((len(ids), SMALL_LAYOUT.dim)).astype(np.float32))
        version = live.snapshot(tmp_path / "snap")
        assert version == live.version
        cached = {layer: live.gather(layer, np.arange(SMALL_LAYOUT.num_rows(layer)))[0] for layer in (1, 4)}
    with Table.open(tmp_path / "snap") as snap:
        for layer in (1, 4):
            assert _same(snap.gather(layer, np.arange(SMALL_LAYOUT.num_rows(layer))), cached[layer])
    manifest = Manifest.read(path)
    for layer in (1, 4):
        name = manifest.layer_file(layer)
        assert (tmp_path / "snap" / name).read_bytes() == (path / name).read_bytes()


# --------------------------------------------------------------------------- same-host clients


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[LiveTable, str, DaemonMetrics]]:
    """A trainable table served on loopback with a row cache of SMALL_ROWS rows."""
    path = make_table(tmp_path / "t", dtype=DType.FLOAT32, optimizer=SGD)
    live = LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path)))
    metrics = DaemonMetrics()
    server, port = create_server(live, "127.0.0.1:0", metrics=metrics)
    server.start()
    try:
        yield live, f"127.0.0.1:{port}", metrics
    finally:
        server.stop(None)
        live.close()


def test_same_host_client_copies_hits_from_shared_memory_and_asks_for_misses(
    daemon: tuple[LiveTable, str, DaemonMetrics], tmp_path: Path
) -> None:
    live, address, metrics = daemon
    ids = np.array([3, 3, 50, 4000, 712, 50])  # 4 distinct
    with MemstoreClient(address, replace(FAST_FAIL, same_host=True)) as client, Table.open(live.path) as files:
        rows = client.lookup(1, ids).numpy()
        assert client.transport == "same-host"
        assert _same(rows, files.gather(1, ids))
        assert metrics.total("memstore_rows_served_total") == 4  # the distinct misses, over gRPC
        rows, version = client.lookup(1, ids, return_version=True)
        assert _same(rows.numpy(), files.gather(1, ids)) and version == live.version
        assert metrics.total("memstore_rows_served_total") == 4  # all hits, copied here
        assert client._local is not None and (client._local.cache_hits, client._local.cache_misses) == (6, 6)
        # A push writes through: the client sees the after-image in shared memory, with the new version.
        pushed = client.push(1, np.array([50, 712]), np.ones((2, SMALL_LAYOUT.dim), dtype=np.float32))
        rows, version = client.lookup(1, ids, return_version=True)
        assert version == pushed.version
        assert _same(rows.numpy(), files.gather(1, ids))
        assert metrics.total("memstore_rows_served_total") == 4


def test_same_host_reader_skips_slots_being_written(daemon: tuple[LiveTable, str, DaemonMetrics]) -> None:
    live, _, _ = daemon
    cache = live.row_cache
    assert cache is not None
    ids = np.array([10, 20, 30])
    live.gather(1, ids)
    reader = RowCacheReader(cache.path, cache.device, cache.inode, cache.row_bytes)
    try:
        out = np.zeros((3, cache.row_bytes), dtype=np.uint8)
        assert not reader.lookup(1, ids, out).any()
        assert _same(out, live.table.store(1).inner.gather(ids).view(np.uint8))
        assert reader.lookup(4, ids, out).all()  # another layer's rows: not there
        slots = cache._slots.find(np.array([(1 << 40) | 20]))
        cache._slots.seqs[slots] += 1  # as while the daemon writes the slot
        assert reader.lookup(1, ids, out).tolist() == [False, True, False]
        cache._slots.seqs[slots] += 1
        assert not reader.lookup(1, ids, out).any()
    finally:
        reader.close()


def test_the_cache_file_must_be_the_advertised_one(daemon: tuple[LiveTable, str, DaemonMetrics]) -> None:
    live, _, _ = daemon
    cache = live.row_cache
    assert cache is not None
    with pytest.raises(Exception, match="not the daemon's row cache"):
        RowCacheReader(cache.path, cache.device, cache.inode + 1, cache.row_bytes)
    with pytest.raises(Exception, match="caches rows of"):
        RowCacheReader(cache.path, cache.device, cache.inode, cache.row_bytes + 2)


def test_metrics_count_the_cache(daemon: tuple[LiveTable, str, DaemonMetrics]) -> None:
    live, address, metrics = daemon
    with MemstoreClient(address, replace(FAST_FAIL, same_host=False)) as client:
        ids = np.arange(100)
        client.lookup(1, ids)
        client.lookup(1, ids)
    assert metrics.total("memstore_row_cache_misses_total") == 100
    assert metrics.total("memstore_row_cache_hits_total") == 100
    assert metrics.total("memstore_row_cache_resident_bytes") == 100 * live.row_cache.row_bytes
    assert metrics.total("memstore_row_cache_disk_bytes_total") >= 100 * live.row_cache.row_bytes
    assert metrics.total("memstore_row_cache_direct_io") == 1  # tmp_path is not tmpfs here


# --------------------------------------------------------------------------- positioned reads


@pytest.mark.parametrize("row_bytes", [24, 264, 4096, 5000, 9000])
@pytest.mark.parametrize("compiled", [True, False], ids=["C", "python"])
def test_direct_reads_are_the_files_bytes(
    tmp_path: Path, row_bytes: int, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows inside a block, straddling two, longer than one; the last row ending mid-block."""
    if compiled and direct._compiled is None:
        pytest.skip("memstore._directio is not built")
    if not compiled:
        monkeypatch.setattr(direct, "_compiled", None)
    num_rows = 3 * BLOCK // row_bytes + 37
    data = np.random.default_rng(row_bytes).integers(0, 256, (num_rows, row_bytes), dtype=np.uint8)
    (tmp_path / "rows").write_bytes(data.tobytes())
    reader = DirectReader(tmp_path / "rows", row_bytes, threads=3)
    try:
        assert reader.direct
        ids = np.random.default_rng(0).integers(0, num_rows, 200)
        ids[:3] = [num_rows - 1, 0, num_rows - 1]
        rows, reads, nbytes = reader.read(ids)
        assert _same(rows, data[ids])
        assert nbytes % BLOCK == 0 and 0 < reads <= nbytes // BLOCK
    finally:
        reader.close()


def _refuse_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Open as a file system without O_DIRECT does (tmpfs before Linux 6.6: EINVAL)."""
    real_open = os.open

    def open_without_o_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct.os, "open", open_without_o_direct)


def test_where_o_direct_is_refused_misses_are_read_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cache_files: None
) -> None:
    path = make_table(tmp_path / "t")
    _refuse_o_direct(monkeypatch)
    with Table.open(path) as plain, LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path))) as live:
        store = live.table.store(1)
        assert isinstance(store, CachedRowStore) and store.reader is not None
        assert not store.direct and "refuses O_DIRECT" in store.reader.why_buffered
        assert "misses read buffered" in live.row_cache.describe()
        assert not live.row_cache.snapshot().direct_io
        ids = _zipf_ids(np.random.default_rng(2), 500, SMALL_LAYOUT.num_rows(1))
        assert _same(live.gather(1, ids)[0], plain.gather(1, ids))


def test_o_direct_reads_refused_after_open_fall_back_to_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = np.arange(64 * 100, dtype=np.uint8).reshape(100, 64)
    (tmp_path / "rows").write_bytes(data.tobytes())
    reader = DirectReader(tmp_path / "rows", 64)
    try:
        assert reader.direct
        preads = reader._preads
        refused = []

        def refuse_once(*args: object) -> None:
            if reader.direct:
                refused.append(True)
                raise OSError(errno.EINVAL, "Invalid argument")
            preads(*args)

        monkeypatch.setattr(reader, "_preads", refuse_once)
        ids = np.array([99, 3, 50])
        assert _same(reader.read(ids)[0], data[ids])
        assert refused and not reader.direct and "refuses O_DIRECT reads" in reader.why_buffered
    finally:
        reader.close()


def test_a_table_served_without_a_cache_has_none(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t")
    with LiveTable.open(path) as live:
        assert live.row_cache is None
        assert not isinstance(live.table.store(1), CachedRowStore)


def test_one_cache_serves_every_layer(tmp_path: Path, no_cache_files: None) -> None:
    """Layers share the slots (keys carry the layer): the same row id of two layers is two rows."""
    path = make_table(tmp_path / "t")
    with LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path))) as live, Table.open(path) as plain:
        ids = np.arange(20)
        for layer in (1, 4, 1, 4):
            assert _same(live.gather(layer, ids)[0], plain.gather(layer, ids))
        stats = live.row_cache.snapshot()
        assert (stats.misses, stats.hits) == (40, 40)
        assert isinstance(live.row_cache, RowCache)


def test_memstore_serve_row_cache_bytes_end_to_end(tmp_path: Path) -> None:
    """`memstore serve --row-cache-bytes 1MiB`: lookups through the cache, its counters in `memstore stats`,
    its file in /dev/shm removed when the daemon stops."""
    path = make_table(tmp_path / "t")
    process, address = start_daemon(
        path, ["--row-cache-bytes", "1MiB"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        with MemstoreClient(address, replace(FAST_FAIL, same_host=False)) as client, Table.open(path) as files:
            ids = np.arange(0, 3000, 7)
            for _ in range(2):
                assert _same(client.lookup(1, ids).numpy(), files.gather(1, ids))
            stats = summarize(client.stats()).values
        assert stats["memstore_row_cache_misses_total"] == len(ids)
        assert stats["memstore_row_cache_hits_total"] == len(ids)
        assert stats["memstore_row_cache_capacity_bytes"] <= 1 << 20
    finally:
        assert stop_daemon(process) == 0
    log = process.stderr.read()
    process.stderr.close()
    cache_file = re.search(r"row cache: [\d.,]+ MiB in (\S+):", log)
    assert cache_file is not None, log
    assert not Path(cache_file[1]).exists()


def test_a_budget_the_shared_memory_cannot_hold_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full /dev/shm is a clear error, with no file left behind."""

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(InvalidArgumentError, match="smaller --row-cache-bytes"):
        RowCache(RowCacheConfig(bytes=1 << 20), 32, directory=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_lazy_store_caches_an_all_zero_row_as_it_stores_it(tmp_path: Path, no_cache_files: None) -> None:
    """A lazy store writes an all-zero row with -0.0 first (so it reads as written): the cached copy
    must be those bytes too, or a hit would differ from a read of the file."""
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=2, init=Init.LAZY)
    path = create_table(tmp_path / "t", manifest)
    with Table.open(path, read_only=False) as table:
        cache = RowCache(RowCacheConfig(bytes=slots_bytes(64, _row_bytes(path))), _row_bytes(path))
        try:
            table.cache_rows(cache)
            store = table.store(1)
            ids = np.array([4, 8])
            store.gather(ids)  # resident now
            rows = np.zeros((2, SMALL_LAYOUT.dim), dtype=np.float32)
            rows[1, 3] = 1.5
            store.update(ids, rows)
            assert isinstance(store, CachedRowStore)
            stored = store.inner.gather(ids)
            assert np.signbit(stored[0, 0])  # -0.0: what the file holds
            assert _same(store.gather(ids), stored)
        finally:
            table.close()
            cache.close()


def test_a_stopped_daemons_cache_is_never_read(tmp_path: Path) -> None:
    """A same-host client keeps its map of the cache after the daemon stops; pushes applied by the
    daemon serving the table next never reach that cache, so its rows must not be served again."""
    path = make_table(tmp_path / "t", dtype=DType.FLOAT32, optimizer=SGD)
    ids = np.array([1, 2, 3])

    def serve(port: int = 0) -> tuple[LiveTable, object, int]:
        live = LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path)))
        server, bound = create_server(live, f"127.0.0.1:{port}")
        server.start()
        return live, server, bound

    live, server, port = serve()
    client = MemstoreClient(f"127.0.0.1:{port}", replace(FAST_FAIL, same_host=True))
    try:
        before = client.lookup(1, ids).numpy()
        client.lookup(1, ids)  # hits, from the shared memory
        old_cache = live.row_cache
        assert old_cache is not None
        server.stop(None)
        live.close()
        live, server, _ = serve(port)
        try:
            live.push(1, ids, np.ones((3, SMALL_LAYOUT.dim), dtype=np.float32))
            expected = live.table.store(1).inner.gather(ids)
            assert not _same(expected, before)
            assert _same(client.lookup(1, ids).numpy(), expected)  # not the stopped daemon's copies
            assert _same(client.lookup(1, ids).numpy(), expected)  # the new daemon's cache, described again
            assert client.transport == "same-host"
        finally:
            server.stop(None)
            live.close()
    finally:
        client.close()


def test_a_new_cache_removes_files_of_dead_daemons(tmp_path: Path) -> None:
    """A killed daemon cannot delete its file: the next cache in the directory removes it (unlocked and
    a minute old), never a running daemon's (locked) nor a file just created (maybe not locked yet)."""
    running = RowCache(RowCacheConfig(bytes=1 << 20), 32, directory=tmp_path)
    dead_pid = 2**22 + 1  # above Linux's largest pid: no such process
    orphan, fresh = tmp_path / f"memstore-rowcache-{dead_pid}-a", tmp_path / f"memstore-rowcache-{dead_pid}-b"
    live_pid = tmp_path / f"memstore-rowcache-{os.getpid()}-c"  # unlocked, but its pid runs
    for path in (orphan, fresh, live_pid):
        path.write_bytes(b"x")
    old = time.time() - 120
    for path in (orphan, running.path, live_pid):
        os.utime(path, (old, old))
    try:
        second = RowCache(RowCacheConfig(bytes=1 << 20), 32, directory=tmp_path)
        second.close()
        assert not orphan.exists()
        assert running.path.exists() and fresh.exists() and live_pid.exists()
    finally:
        running.close()


def test_a_shards_rows_are_cached_by_their_place_in_the_shard(tmp_path: Path, no_cache_files: None) -> None:
    """Keys are the store's own (local) row indices: a shard's rows read through the cache are its rows."""
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT16, seed=5, sharding=Sharding.spread(2, 1, 4))
    path = create_table(tmp_path / "shard1", manifest)
    with Table.open(path) as plain, LiveTable.open(path, config=_config(SMALL_ROWS, _row_bytes(path))) as live:
        ids = np.arange(SMALL_LAYOUT.num_rows(4))
        ids = ids[manifest.sharding.shard_of(ids) == 1][::7]
        for _ in range(2):
            assert _same(live.gather(4, ids)[0], plain.gather(4, ids))
        assert live.row_cache.snapshot().hits > 0
