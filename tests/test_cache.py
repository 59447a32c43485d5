"""The device cache: each policy against a brute force of the batch semantics, exact rows, bounds, refusal."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from client import MemstoreClient, PrefetchConfig, Prefetcher, TableFetcher
from client.cache import (
    _SKETCH_DEPTH,
    _SKETCH_MULTIPLIERS,
    CacheConfig,
    CachedReader,
    CachePolicy,
    CacheStats,
    DeviceCache,
    _LayerCache,
)
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError
from memstore.live import LiveConfig, LiveTable
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from model import cache_sim
from tests.helpers import FAST_FAIL, SMALL_LAYOUT, make_table

LAYERS = SMALL_LAYOUT.layer_ids  # (1, 4)
ROWS = SMALL_LAYOUT.num_rows(1)


class RecordingReader:
    """An in-process reader of a real table that records the ids each lookup asked for."""

    def __init__(self, table: Table) -> None:
        self.inner = TableFetcher(table)
        self.asked: list[np.ndarray] = []

    def describe(self, timeout=None) -> Manifest:
        return self.inner.describe(timeout)

    def lookup(self, layer_id, row_ids, *, timeout=None, out=None) -> torch.Tensor:
        self.asked.append(np.asarray(row_ids).copy())
        return self.inner.lookup(layer_id, row_ids, timeout=timeout, out=out)


@pytest.fixture
def table(tmp_path: Path):
    with Table.open(make_table(tmp_path / "t", DType.FLOAT16)) as opened:
        yield opened


def _stream(seed: int, steps: int, universe: int = 60) -> list[np.ndarray]:
    """Zipf-like steps of varying sizes (1 to 24 ids, repeats within a step included)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, universe + 1)
    ids = rng.permutation(universe) * 7 + 3  # spread over the layer, not 0..universe
    return [rng.choice(ids, size=rng.integers(1, 25), p=weights / weights.sum()) for _ in range(steps)]


class BruteForce:
    """The module docstring's batch semantics, one row at a time in plain Python."""

    def __init__(self, policy: CachePolicy, capacity: int, hot=None, width_factor: int = 4, reset: int = 10) -> None:
        self.policy, self.capacity = policy, capacity
        self.hot = None if hot is None else set(int(i) for i in hot)
        if self.hot is not None:
            self.capacity = max(1, len(self.hot))
        self.res: dict[int, list[int]] = {}  # id -> [stamp, count]
        self.clock = 0
        bits = max(4, int(np.ceil(np.log2(capacity * width_factor))))
        self.shift, self.sketch = 64 - bits, [[0] * (1 << bits) for _ in range(_SKETCH_DEPTH)]
        self.added, self.period = 0, reset * capacity

    def _cols(self, i: int) -> list[int]:
        return [((i * (m & 0x7FFF_FFFF_FFFF_FFFF)) % 2**64) >> self.shift for m in _SKETCH_MULTIPLIERS]

    def _est(self, i: int) -> int:
        return min(self.sketch[d][c] for d, c in enumerate(self._cols(i)))

    def step(self, ids: np.ndarray) -> int:
        start = self.clock
        counts = Counter(int(i) for i in ids)
        last = {int(i): start + t for t, i in enumerate(ids)}
        self.clock += len(ids)
        hits = sum(counts[i] for i in counts if i in self.res)
        for i in counts:
            if i in self.res:
                self.res[i] = [last[i], self.res[i][1] + counts[i]]
        if self.policy is CachePolicy.TINYLFU:
            for i, c in counts.items():
                for d, col in enumerate(self._cols(i)):
                    self.sketch[d][col] += c
            self.added += len(ids)
            if self.added >= self.period:
                self.sketch = [[v >> 1 for v in row] for row in self.sketch]
                self.added //= 2
        misses = sorted(i for i in counts if i not in self.res)
        if self.policy is CachePolicy.STATIC:
            for i in misses:
                if i in self.hot:
                    self.res[i] = [last[i], counts[i]]
            return hits
        key = {CachePolicy.LRU: lambda i: (last[i],), CachePolicy.LFU: lambda i: (counts[i], last[i])}.get(
            self.policy, lambda i: (self._est(i), last[i])
        )
        cands = sorted(misses, key=key, reverse=True)
        free = self.capacity - len(self.res)
        chosen, rest = cands[:free], cands[free:]
        untouched = [i for i in self.res if self.res[i][0] < start]
        vkey = (
            (lambda i: (self.res[i][1], self.res[i][0]))
            if self.policy is CachePolicy.LFU
            else (lambda i: self.res[i][0])
        )
        victims = sorted(untouched, key=vkey)[: len(rest)]
        rest = rest[: len(victims)]
        for c, v in zip(rest, victims, strict=True):
            if self.policy is not CachePolicy.TINYLFU or self._est(c) > self._est(v):
                del self.res[v]
                chosen.append(c)
        for i in chosen:
            self.res[i] = [last[i], counts[i]]
        return hits


def _hot_rows(stream: list[np.ndarray], k: int) -> np.ndarray:
    counts = Counter(int(i) for step in stream for i in step)
    return np.array([i for i, _ in counts.most_common(k)], dtype=np.int64)


@pytest.mark.parametrize("policy", list(CachePolicy), ids=lambda p: p.value)
@pytest.mark.parametrize("capacity", [1, 5, 16])
def test_each_policy_matches_the_brute_force_and_returns_the_tables_rows(table: Table, policy, capacity) -> None:
    stream = _stream(seed=capacity, steps=120)
    hot = _hot_rows(stream[:30], capacity) if policy is CachePolicy.STATIC else None
    config = CacheConfig(policy=policy, max_rows=capacity, hot_rows=None if hot is None else {1: hot}, sketch_reset=2)
    reader = RecordingReader(table)
    cached = CachedReader(reader, config)
    brute = BruteForce(policy, capacity, hot, reset=2)
    layer = cached.cache.layers[1]
    total_hits = 0
    for ids in stream:
        before = cached.stats.hits
        rows = cached.lookup(1, ids.reshape(-1, 1))
        np.testing.assert_array_equal(rows.numpy(), table.gather(1, ids).reshape(len(ids), 1, -1))
        expected_hits = brute.step(ids)
        assert cached.stats.hits - before == expected_hits
        assert set(layer.resident().tolist()) == set(brute.res)
        assert len(layer.resident()) <= layer.capacity == len(layer.data)
        assert torch.equal(layer.resident(), torch.sort(layer.resident()).values)  # the index stays sorted
        occupied = layer.slot_key >= 0
        assert sorted(layer.slot_key[occupied].tolist()) == layer.resident().tolist()
        total_hits += expected_hits
    accesses = sum(len(s) for s in stream)
    assert cached.stats.hits == total_hits and cached.stats.hits + cached.stats.misses == accesses
    fetched = np.concatenate(reader.asked)
    assert cached.stats.rows_fetched == len(fetched)
    assert cached.stats.rows_saved == sum(len(np.unique(s)) for s in stream) - len(fetched)
    assert cached.stats.bytes_saved == cached.stats.rows_saved * DType.FLOAT16.row_bytes(SMALL_LAYOUT.dim)
    assert total_hits > 0  # the stream repeats rows: a cache that never hits would pass the rest vacuously


def test_lru_with_one_access_per_step_hits_as_model_cache_sim(table: Table, tmp_path: Path) -> None:
    stream = np.concatenate(_stream(seed=7, steps=200))
    path = tmp_path / "layer.u32"
    stream.astype("<u4").tofile(path)
    sizes = np.array([1, 3, 8, 20, len(stream)])  # the largest size: cache_sim never compacts its markers
    reference = cache_sim.lru_pass(path, len(stream), cache_sim.StreamShape(ROWS, 1, 1), sizes, compiled=False)
    for size, expected in zip(sizes[:-1], reference.hits[0], strict=False):
        cached = CachedReader(TableFetcher(table), CacheConfig(policy=CachePolicy.LRU, max_rows=int(size)))
        recency: OrderedDict[int, None] = OrderedDict()  # per-access LRU, the definition
        lru_hits = 0
        for row in stream:
            cached.lookup(1, np.array([row]))
            lru_hits += int(row) in recency
            recency[int(row)] = None
            recency.move_to_end(int(row))
            if len(recency) > size:
                recency.popitem(last=False)
        assert cached.stats.hits == expected == lru_hits


def test_bytes_bound_the_rows_per_layer(table: Table) -> None:
    row_bytes = DType.FLOAT16.row_bytes(SMALL_LAYOUT.dim)
    cache = DeviceCache(table.manifest, CacheConfig(max_rows=100, max_bytes=7 * row_bytes + row_bytes // 2))
    assert {layer.capacity for layer in cache.layers.values()} == {7}
    assert cache.memory_bytes() == 2 * 7 * row_bytes
    with pytest.raises(InvalidArgumentError, match="holds no row"):
        DeviceCache(table.manifest, CacheConfig(max_rows=None, max_bytes=row_bytes - 1))
    with pytest.raises(InvalidArgumentError, match="bounded"):
        CacheConfig(max_rows=None, max_bytes=None)
    with pytest.raises(InvalidArgumentError, match="hot set"):
        DeviceCache(table.manifest, CacheConfig(policy=CachePolicy.STATIC, max_rows=2, hot_rows={1: [1, 2, 3]}))


def test_a_step_with_more_distinct_misses_than_the_cache_still_returns_every_row(table: Table) -> None:
    reader = RecordingReader(table)
    cached = CachedReader(reader, CacheConfig(max_rows=4))
    ids = np.arange(50) * 3
    np.testing.assert_array_equal(cached.lookup(4, ids).numpy(), table.gather(4, ids))
    assert len(cached.cache.layers[4].resident()) == 4 and cached.stats.rejected == 46


def _trainable_manifest() -> Manifest:
    return Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=0, optimizer=OptimizerConfig(kind=OptimizerKind.SGD))


def test_a_trainable_table_is_followed_unless_the_process_only_generates(tmp_path: Path, daemon_factory) -> None:
    path = make_table(tmp_path / "trained", DType.FLOAT32, optimizer=OptimizerConfig(kind=OptimizerKind.SGD))
    live = LiveTable.open(path, config=LiveConfig())
    try:
        with MemstoreClient(daemon_factory(live).address, FAST_FAIL) as client:
            assert client.trainable
            with CachedReader(client, CacheConfig()) as followed:  # coherent: tests/test_coherence.py
                assert followed.stats.coherent and followed.cache.coherence is not None
            with Prefetcher(client, lambda x: x, LAYERS, PrefetchConfig(cache=CacheConfig())) as prefetcher:
                assert prefetcher.cache is not None and prefetcher.cache.coherence is not None
            # The row a push changed would be served stale from the cache: the opt-in takes that on.
            cached = CachedReader(client, CacheConfig(generation_only=True))
            assert cached.cache.coherence is None
            np.testing.assert_array_equal(cached.lookup(1, [5, 6]).numpy(), client.lookup(1, [5, 6]).numpy())
    finally:
        live.close()
    with Table.open(path) as table, pytest.raises(InvalidArgumentError, match="generation_only"):
        CachedReader(TableFetcher(table), CacheConfig())  # in process: an optimizer means trainable, not followed


@pytest.mark.parametrize("dtype", [DType.FLOAT16, DType.FLOAT8_E4M3_ROWSCALE], ids=lambda d: d.value)
def test_rows_through_a_daemon_are_the_stored_bytes(tmp_path: Path, daemon_factory, dtype: DType) -> None:
    with Table.open(make_table(tmp_path / "t", dtype)) as table:
        with MemstoreClient(daemon_factory(table).address, FAST_FAIL) as client:
            assert not client.trainable
            cached = CachedReader(client, CacheConfig(policy=CachePolicy.TINYLFU, max_rows=8))
            for ids in _stream(seed=3, steps=40):
                rows = cached.lookup(4, ids.reshape(-1, 2) if len(ids) % 2 == 0 else ids)
                assert rows.dtype == dtype.torch
                expected = dtype.raw_view(rows).reshape(len(ids), -1)
                np.testing.assert_array_equal(expected, table.gather(4, ids))
            assert cached.stats.hits > 0


def _ids(step: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(step % 3)  # steps repeat: a cache hits from the fourth step on
    return {layer: rng.integers(0, 200, size=(2, 8, 4)) * 5 + layer for layer in LAYERS}


@pytest.mark.parametrize("overlap", [True, False])
def test_prefetcher_with_a_cache_returns_the_rows_without_one(table: Table, overlap: bool) -> None:
    plain, cached_reader = RecordingReader(table), RecordingReader(table)
    config = PrefetchConfig(overlap=overlap, cache=CacheConfig(policy=CachePolicy.LFU, max_rows=1000))
    with (
        Prefetcher(plain, _ids, LAYERS, PrefetchConfig(overlap=overlap)) as a,
        Prefetcher(cached_reader, _ids, LAYERS, config) as b,
    ):
        assert a.stats.cache is None and a.cache is None
        for step in range(6):
            with a.submit(step) as ha, b.submit(step) as hb:
                for layer in LAYERS:
                    assert torch.equal(ha.rows(layer), hb.rows(layer))
        asked_plain = sum(x.size for x in plain.asked)
        asked_cached = sum(x.size for x in cached_reader.asked)
        stats = b.stats.cache
        assert stats is not None and stats.hits + stats.misses == b.stats.rows == a.stats.rows
        assert asked_cached == stats.rows_fetched < asked_plain  # steps 3-5 repeat steps 0-2: all hits
        assert stats.rows_fetched == sum(len(np.unique([_ids(s)[layer] for s in range(3)])) for layer in LAYERS)
        assert "device cache: hit rate" in b.stats.summary()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_returns_the_cpu_caches_rows(table: Table) -> None:
    on_cpu = CachedReader(TableFetcher(table), CacheConfig(policy=CachePolicy.TINYLFU, max_rows=16))
    on_gpu = CachedReader(TableFetcher(table), CacheConfig(policy=CachePolicy.TINYLFU, max_rows=16), device="cuda")
    for ids in _stream(seed=5, steps=50):
        assert torch.equal(on_cpu.lookup(1, ids), on_gpu.lookup(1, ids))
    assert on_gpu.cache.layers[1].data.is_cuda and on_gpu.stats.hits == on_cpu.stats.hits
    config = PrefetchConfig(device="cuda", cache=CacheConfig(max_rows=1000))
    with Prefetcher(TableFetcher(table), _ids, LAYERS, config) as prefetcher:
        for step in range(4):
            with prefetcher.submit(step) as handle:
                rows = handle.rows(1)
                assert rows.is_cuda
                np.testing.assert_array_equal(
                    (rows * 1).cpu().numpy(), table.gather(1, _ids(step)[1].reshape(-1)).reshape(2, 8, 4, -1)
                )


def test_cache_hits_and_bytes_saved_are_client_metrics(table: Table) -> None:
    from prometheus_client import REGISTRY  # imported: the client's metrics register at the next observation

    def sample(name: str) -> float:
        # The process-wide registry: other tests count too, so only this test's increase is checked.
        return REGISTRY.get_sample_value(name, {"layer": "4", "tier": "device"}) or 0

    before = {name: sample(f"memstore_client_cache_{name}_total") for name in ("hits", "misses", "bytes_saved")}
    cached = CachedReader(TableFetcher(table), CacheConfig(max_rows=10))
    cached.lookup(4, [1, 2, 2, 3])  # 4 misses (3 rows fetched)
    cached.lookup(4, [2, 3, 9])  # 2 hits, 1 miss
    row_bytes = DType.FLOAT16.row_bytes(SMALL_LAYOUT.dim)
    assert sample("memstore_client_cache_hits_total") == before["hits"] + 2
    assert sample("memstore_client_cache_misses_total") == before["misses"] + 5
    assert sample("memstore_client_cache_bytes_saved_total") == before["bytes_saved"] + 2 * row_bytes


def test_a_static_cache_without_hot_rows_for_a_layer_serves_it_uncached(table: Table) -> None:
    cached = CachedReader(TableFetcher(table), CacheConfig(policy=CachePolicy.STATIC, hot_rows={1: [5, 6]}))
    for _ in range(2):
        np.testing.assert_array_equal(cached.lookup(4, [5, 6]).numpy(), table.gather(4, np.array([5, 6])))
        cached.lookup(1, [5, 6, 7])
    assert cached.stats.hits_per_layer == {4: 0, 1: 2} and cached.stats.rejected == 4 + 2


@pytest.mark.parametrize("policy", [p for p in CachePolicy if p is not CachePolicy.STATIC], ids=lambda p: p.value)
@pytest.mark.parametrize("capacity", [3, 40])
def test_long_churn_matches_the_brute_force_through_index_rebuilds_and_queue_compactions(policy, capacity) -> None:
    """Many steps over a wide universe: deletion marks force index rebuilds, stale victim-queue entries force
    compactions (and LFU's rows read 16 times or more need the scan over all slots); nothing may drift."""
    width = 3  # one layer's cache alone, its rows made from their ids
    config = CacheConfig(policy=policy, max_rows=capacity, sketch_reset=3)
    cache = _LayerCache(capacity, width, torch.int64, torch.device("cpu"), config, None)
    brute = BruteForce(policy, capacity, reset=3)
    stats, lock = CacheStats(), threading.Lock()
    universe = np.arange(400) * 11 + 5
    for step, ids in enumerate(_stream(seed=capacity, steps=700, universe=400)):
        ids = universe[np.searchsorted(np.arange(400) * 7 + 3, ids)]  # the stream's ids, spread wider
        expected_hits = brute.step(ids)
        before = stats.hits
        rows = cache.step(torch.as_tensor(ids), _rows_of, stats, lock, 1, width * 8)
        assert torch.equal(rows, _rows_of(torch.as_tensor(ids)))
        assert stats.hits - before == expected_hits, step
        assert set(cache.resident().tolist()) == set(brute.res), step
        # find: every resident at its slot, every other id of the universe (and repeats) absent.
        probe = torch.as_tensor(np.concatenate([universe, universe[:50]]))
        slots = cache.find(probe)
        held = slots >= 0
        assert torch.equal(cache.slot_key[slots[held]], probe[held])
        assert set(probe[held].tolist()) == set(brute.res)
    assert cache.index_rebuilds > 0 and any(q.compactions > 0 for q in cache.queues)
    if policy is CachePolicy.LFU and capacity == 3:
        assert cache.overflow_scans > 0


def _rows_of(ids: torch.Tensor) -> torch.Tensor:
    """Rows made from their ids: [len(ids), 3] int64."""
    return ids.unsqueeze(1) * torch.tensor([1, 3, -7]) + 1
