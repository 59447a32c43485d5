"""Coherence of the device cache under training: the row watch (memstore.rowwatch, WatchRows) and the
client that follows it (client.coherence), through real daemons on loopback."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from client import MemstoreClient, PrefetchConfig, Prefetcher, PushConfig, Pusher
from client.cache import CacheConfig, CachedReader, DeviceCache
from memstore.create import create_table
from memstore.daemon_config import ServerConfig
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, ResourceExhaustedError, UnauthenticatedError
from memstore.live import LiveConfig, LiveTable
from memstore.replica import FollowConfig, Follower
from memstore.rowwatch import RowBatch, RowWatchGapError, check_watch_layers, row_watch_slots, rows_after
from memstore.service import create_server
from memstore.sharding import Sharding
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from model.train import TableSource, build_model, train
from tests.helpers import FAST_FAIL, SMALL_ENGRAM, SMALL_LAYOUT, InProcessDaemon, join_all, small_lm_config, wait_until
from tests.test_train import OPTIMIZERS, _assert_same_training, _config, _train_in_process

SGD_ONE = OptimizerConfig(OptimizerKind.SGD, lr=1.0)
FAST = LiveConfig(durability=Durability.OS, checkpoint_every=0)
DIM = SMALL_LAYOUT.dim


def _zero_table(path: Path) -> Path:
    """A trainable SGD (lr 1) table of zeros: after integer gradients every row is exact minus their sum."""
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=0, optimizer=SGD_ONE, init_std=0.0)
    return create_table(path, manifest)


def _grads(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-3, 4, size=(n, DIM)).astype(np.float32)


# -- the server side, without gRPC -----------------------------------------------------------


def test_rows_after_hands_each_push_s_rows_in_version_order(tmp_path: Path) -> None:
    with LiveTable.open(_zero_table(tmp_path / "t"), config=FAST) as live:
        rng = np.random.default_rng(0)
        pushed = []
        for layer, ids in ((1, [3, 9]), (4, [0, 5, 7]), (1, [9, 20])):
            result = live.push(layer, np.array(ids), _grads(rng, len(ids)))
            pushed.append((result.version, layer, ids, live.gather(layer, np.array(ids))[0].copy()))
        batch = rows_after(live, 0, None, 1 << 20, 0.01)
        assert batch.through == 3
        got = [(c.version, c.layer_id, c.ids.tolist(), c.rows) for c in batch.changes]
        assert [g[:3] for g in got] == [p[:3] for p in pushed]
        for (_, _, _, rows), (_, _, _, expected) in zip(got, pushed, strict=True):
            np.testing.assert_array_equal(rows, expected)  # after-images, in the stored dtype
        # Layers not asked for send nothing, but the batch still covers their pushes.
        only4 = rows_after(live, 0, check_watch_layers(live.manifest, [4]), 1 << 20, 0.01)
        assert [c.layer_id for c in only4.changes] == [4] and only4.through == 3
        # Up to date: a heartbeat after the timeout, with no changes.
        idle = rows_after(live, 3, None, 1 << 20, 0.01)
        assert idle.changes == [] and idle.through == 3
        # A watch no longer wanted (its stream cancelled) gives its thread back without waiting out its heartbeat.
        returned: list[RowBatch] = []
        waiting = threading.Thread(
            target=lambda: returned.append(rows_after(live, 3, None, 1 << 20, 3600, lambda: False))
        )
        waiting.start()
        join_all([waiting])
        assert returned[0].changes == [] and returned[0].through == 3
        # Batches stop near max_bytes, and the next call goes on from there.
        first = rows_after(live, 0, None, 1, 0.01)
        assert first.through == 1 and rows_after(live, first.through, None, 1, 0.01).through == 2


def test_a_shard_s_changes_name_the_layer_s_row_ids(tmp_path: Path) -> None:
    """A shard logs its own row indices; the watch names the rows as lookups do."""
    sharding = Sharding.spread(2, 1, num_partitions=4)
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=0, optimizer=SGD_ONE, sharding=sharding)
    with LiveTable.open(create_table(tmp_path / "shard1", manifest), config=FAST) as live:
        ids = np.array([2, 3, 7, 11])  # partitions 2 and 3: shard 1's
        live.push(1, ids, np.ones((4, DIM), np.float32))
        (change,) = rows_after(live, 0, None, 1 << 20, 0.01).changes
        assert change.ids.tolist() == ids.tolist()
        np.testing.assert_array_equal(change.rows, live.gather(1, ids)[0])


def test_rows_after_reports_a_gap_when_the_pushes_are_gone(tmp_path: Path) -> None:
    with LiveTable.open(_zero_table(tmp_path / "t"), config=replace(FAST, feed_bytes=1)) as live:
        for step in range(4):
            live.push(1, np.array([step]), np.ones((1, DIM), np.float32))
        live.checkpoint()  # the log drops versions 1..4; the feed keeps the newest only
        with pytest.raises(RowWatchGapError, match="drops its cached rows") as caught:
            rows_after(live, 1, None, 1 << 20, 0.01)
        assert caught.value.code.name == "FAILED_PRECONDITION"
        assert rows_after(live, 3, None, 1 << 20, 0.01).through == 4  # the newest is still held
        with pytest.raises(RowWatchGapError):
            rows_after(live, 9, None, 1 << 20, 0.01)  # past the table: it was restored from an older copy


def test_watch_layers_and_slots_are_checked() -> None:
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=0)
    assert check_watch_layers(manifest, []) is None
    with pytest.raises(InvalidArgumentError, match=r"layers \[2\]"):
        check_watch_layers(manifest, [1, 2])
    slots = row_watch_slots(1)
    slots.acquire("a")
    with pytest.raises(ResourceExhaustedError, match="--max-row-watchers"):
        slots.acquire("b")
    slots.release()
    slots.acquire("b")
    assert slots.active == 1


# -- training through the cache ----------------------------------------------------------------


def _train_cached(lm_data, path: Path, daemon_factory, initial: dict, cache: CacheConfig | None):
    """(result, trained rows of the layer, cache stats) of training through a daemon, prefetching through `cache`."""
    optimizer = OPTIMIZERS["adam"]
    config = _config(optimizer)
    manifest = Manifest(layout=SMALL_ENGRAM.layout(), dtype=DType.FLOAT32, seed=SMALL_ENGRAM.seed, optimizer=optimizer)
    layer = SMALL_ENGRAM.layer_ids[0]
    with (
        LiveTable.open(create_table(path, manifest), config=LiveConfig(durability=Durability.OS)) as live,
        MemstoreClient(daemon_factory(live).address) as client,
    ):
        remote = build_model(
            small_lm_config(lm_data.vocab_size), lm_data, TableSource.MEMSTORE, client, track_gradients=False
        )
        remote.load_state_dict(initial, strict=False)
        layers = SMALL_ENGRAM.layer_ids
        with (
            Prefetcher(client, remote.row_ids, layers, PrefetchConfig(cache=cache)) as prefetcher,
            Pusher(client, layers, PushConfig(max_in_flight_steps=0)) as pusher,
        ):
            result = train(remote, lm_data, config, progress=False, prefetcher=prefetcher, pusher=pusher)
            stats = prefetcher.stats.cache
        rows = live.gather(layer, np.arange(SMALL_ENGRAM.layout().num_rows(layer)))[0]
    return result, rows, stats


def test_training_through_a_coherent_cache_is_bit_identical(lm_data, tmp_path: Path, daemon_factory, monkeypatch):
    """Lag 0 and synchronous pushes: every step reads the rows the table holds after the last push, so the
    run equals in-process training bit for bit (tests/test_train.py says why the tolerance is zero)."""
    initial, reference, reference_rows = _train_in_process(lm_data, OPTIMIZERS["adam"], monkeypatch)
    start_rows = initial[f"blocks.{SMALL_ENGRAM.layer_ids[0]}.engram.table.embedding.weight"].numpy()
    cache = CacheConfig(max_rows=4096, cache_max_lag=0)
    result, rows, stats = _train_cached(lm_data, tmp_path / "cached", daemon_factory, initial, cache)
    _assert_same_training(result, rows, reference, reference_rows, start_rows)
    assert stats.coherent and stats.hits > 0 and stats.rows_refreshed > 0 and stats.resyncs == 0
    # The same run with the pushes' rows never written into the cache: the comparison catches it.
    monkeypatch.setattr(DeviceCache, "apply_change", lambda *args: 0)
    stale, stale_rows, _ = _train_cached(lm_data, tmp_path / "stale", daemon_factory, initial, cache)
    assert not np.array_equal(np.array(stale.train_loss), np.array(reference.train_loss))


# -- several replicas training through one daemon ------------------------------------------------


class History:
    """Every push of the test (integer gradients on a zero SGD table, lr 1): a row at any version is exact."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pushes: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # version -> (layer, ids, grads)

    def add(self, version: int, layer: int, ids: np.ndarray, grads: np.ndarray) -> None:
        with self.lock:
            self.pushes[version] = (layer, ids, grads)

    def check(self, layer: int, ids: np.ndarray, got: np.ndarray, lowest: int, highest: int) -> None:
        """Each row of `got` equals the table's row at some version in [lowest, highest]."""
        for i, row_id in enumerate(ids):
            value = np.zeros(DIM, np.float32)
            candidates = []
            for version in range(1, highest + 1):
                pushed_layer, pushed_ids, grads = self.pushes[version]
                if pushed_layer == layer and row_id in pushed_ids:
                    value = value - grads[list(pushed_ids).index(row_id)]
                    if version > lowest:
                        candidates.append(value.copy())
                if version == lowest:
                    candidates.append(value.copy())
            if lowest <= 0:
                candidates.append(np.zeros(DIM, np.float32))
            assert any(np.array_equal(got[i], c) for c in candidates), (
                f"row {row_id} of layer {layer} is {got[i]}, the table's at no version in [{lowest}, {highest}]"
            )


@pytest.mark.parametrize("lag", [0, 3])
def test_replicas_training_through_one_daemon_read_rows_within_the_bound(tmp_path: Path, lag: int) -> None:
    live = LiveTable.open(_zero_table(tmp_path / "t"), config=FAST)
    daemon = InProcessDaemon(live, ServerConfig())
    history = History()
    caches: list[CachedReader] = []
    errors: list[BaseException] = []

    def replica(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with (
                MemstoreClient(daemon.address, FAST_FAIL) as client,
                CachedReader(client, CacheConfig(max_rows=48, cache_max_lag=lag)) as cached,
            ):
                caches.append(cached)
                for _ in range(25):
                    layer = int(rng.choice(SMALL_LAYOUT.layer_ids))
                    ids = np.unique(rng.integers(0, 40, size=12))
                    known = client.seen_version
                    got = cached.lookup(layer, ids).numpy()
                    checks.append((layer, ids, got, known - lag, live.version))
                    grads = _grads(rng, len(ids))
                    ack = client.push(layer, ids, grads)
                    history.add(ack.version, layer, ids, grads)
        except BaseException as exc:
            errors.append(exc)

    checks: list[tuple] = []
    try:
        threads = [threading.Thread(target=replica, args=(seed,)) for seed in range(3)]
        for thread in threads:
            thread.start()
        join_all(threads)
        assert not errors, errors
        for layer, ids, got, lowest, highest in checks:
            history.check(layer, ids, got, lowest, highest)
        assert sum(c.stats.hits for c in caches) > 0 and sum(c.stats.rows_refreshed for c in caches) > 0
        assert sum(c.stats.served_from_store for c in caches) == 0
        wait_until(lambda: daemon.calls("WatchRows") == 3, "each replica's watch ended and was counted")
    finally:
        daemon.server.stop(None).wait(10)
        live.close()


def test_the_bound_check_catches_a_cache_that_ignores_pushes(tmp_path: Path, monkeypatch) -> None:
    """The history check above fails when the cache never takes in other replicas' pushes."""
    monkeypatch.setattr(DeviceCache, "apply_change", lambda *args: 0)
    with pytest.raises(AssertionError, match="at no version"):
        test_replicas_training_through_one_daemon_read_rows_within_the_bound(tmp_path, 0)


# -- gaps, frozen tables, permissions --------------------------------------------------------------


def test_a_gap_in_the_pushes_drops_the_cache_and_it_starts_over(tmp_path: Path, daemon_factory) -> None:
    live = LiveTable.open(_zero_table(tmp_path / "t"), config=replace(FAST, feed_bytes=1))
    try:
        daemon = daemon_factory(live)
        ids = np.arange(10)
        with (
            MemstoreClient(daemon.address, FAST_FAIL) as client,
            CachedReader(client, CacheConfig(max_rows=64, coherence_heartbeat_s=0.05)) as cached,
        ):
            cached.lookup(1, ids)  # resident now
            daemon.stop()  # the watch breaks; meanwhile pushes land that no daemon streams
            for step in range(3):
                live.push(1, ids[step : step + 4], np.ones((4, DIM), np.float32))
            live.checkpoint()  # and neither the feed (one record) nor the log holds them
            daemon = daemon_factory(live, port=daemon.port)
            wait_until(lambda: cached.stats.resyncs >= 1, "the cache resynced")
            client.version()  # the client learns of the pushes: the cache may not serve older rows now
            np.testing.assert_array_equal(cached.lookup(1, ids).numpy(), live.gather(1, ids)[0])
            hits = cached.stats.hits
            np.testing.assert_array_equal(cached.lookup(1, ids).numpy(), live.gather(1, ids)[0])
            assert cached.stats.hits == hits + len(ids)  # cached again after the resync
    finally:
        live.close()


def test_a_frozen_table_is_cached_without_a_watch(tmp_path: Path) -> None:
    live = LiveTable.open(_zero_table(tmp_path / "t"), read_only=True, config=FAST)
    daemon = InProcessDaemon(live, ServerConfig())
    try:
        with MemstoreClient(daemon.address, FAST_FAIL) as client, CachedReader(client, CacheConfig()) as cached:
            cached.lookup(1, [1, 2])
            assert not cached.stats.coherent and cached.cache.coherence is None
        assert daemon.calls("WatchRows") == 0
    finally:
        daemon.server.stop(None).wait(10)
        live.close()


def test_a_read_token_watches_rows_and_watchers_have_their_own_allowance(tmp_path: Path, daemon_factory) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("read reader-token-0123456789\nwrite writer-token-0123456789\n")
    tokens.chmod(0o600)
    live = LiveTable.open(_zero_table(tmp_path / "t"), config=FAST)
    config = ServerConfig(same_host=False, token_file=tokens, max_row_watchers=1, max_followers=0)
    try:
        address = daemon_factory(live, config).address
        reader_config = replace(FAST_FAIL, token="reader-token-0123456789")
        with (
            MemstoreClient(address, reader_config) as reader,
            MemstoreClient(address, replace(FAST_FAIL, token="writer-token-0123456789")) as writer,
            CachedReader(reader, CacheConfig(max_rows=64)) as cached,
        ):
            ids = np.arange(5)
            cached.lookup(4, ids)
            before = {name: _sample(name) for name in ("rows_refreshed", "coherence_bytes")}
            writer.push(4, ids, np.ones((5, DIM), np.float32))
            reader.version()
            np.testing.assert_array_equal(cached.lookup(4, ids).numpy(), -np.ones((5, DIM), np.float32))
            assert cached.stats.rows_refreshed == 5 and cached.stats.served_from_store == 0
            assert cached.stats.coherence_bytes == 5 * (8 + 4 * DIM)  # ids and float32 rows
            # The same counts in the client's Prometheus metrics (the process-wide registry: the increase).
            assert _sample("rows_refreshed") == before["rows_refreshed"] + 5
            assert _sample("coherence_bytes") == before["coherence_bytes"] + 5 * (8 + 4 * DIM)
            with pytest.raises(ResourceExhaustedError, match="--max-row-watchers"):
                next(iter(writer.watch_rows(0)))  # one watcher at most, though no follower slot exists
        with MemstoreClient(address, FAST_FAIL) as anonymous, pytest.raises(UnauthenticatedError):
            next(iter(anonymous.watch_rows(0)))
    finally:
        live.close()


def _sample(name: str) -> float:
    from prometheus_client import REGISTRY  # imported: the client's metrics register at the next observation

    return REGISTRY.get_sample_value(f"memstore_client_cache_{name}_total") or 0


def test_a_trainable_table_read_in_process_is_still_refused(tmp_path: Path) -> None:
    from client import TableFetcher
    from memstore.table import Table

    with Table.open(_zero_table(tmp_path / "t")) as table, pytest.raises(InvalidArgumentError, match="cannot follow"):
        CachedReader(TableFetcher(table), CacheConfig())


def test_lag_config_is_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="cache_max_lag"):
        CacheConfig(cache_max_lag=-1)
    with pytest.raises(InvalidArgumentError, match="coherence_heartbeat_s"):
        CacheConfig(coherence_heartbeat_s=20.0)


def test_a_push_older_than_a_fetched_row_never_overwrites_it(tmp_path: Path) -> None:
    """Each slot remembers the version its row shows: a change of an older version leaves it alone (a row
    never goes back in time), one of a newer version replaces it."""
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=0)
    cache = DeviceCache(manifest, CacheConfig(max_rows=8))
    ids = np.array([2, 7])
    fetched = np.full((2, DIM), 5.0, np.float32)
    cache.lookup(1, ids, lambda miss: (torch.from_numpy(fetched[: len(miss)].copy()), 5))
    older = np.full((2, DIM), 3.0, np.float32)
    assert cache.apply_change(1, 3, ids, older) == 0
    np.testing.assert_array_equal(cache.lookup(1, ids, _no_fetch).numpy(), fetched)
    newer = np.stack([np.full(DIM, 6.0), np.full(DIM, 6.5)]).astype(np.float32)
    assert cache.apply_change(1, 6, np.array([7, 30]), newer) == 1  # row 30 is not resident: nothing to do
    np.testing.assert_array_equal(cache.lookup(1, ids, _no_fetch).numpy(), np.stack([fetched[0], newer[0]]))


def _no_fetch(miss: np.ndarray):
    raise AssertionError(f"rows {miss} were fetched; they are resident")


def test_steps_are_served_from_the_store_while_the_cache_cannot_follow(tmp_path: Path, daemon_factory) -> None:
    """No watcher slot: the cache never hears of the pushes, so once the client knows of one, its steps
    come from the store (counted), never from stale cached rows."""
    live = LiveTable.open(_zero_table(tmp_path / "t"), config=FAST)
    try:
        address = daemon_factory(live, ServerConfig(max_row_watchers=0)).address
        ids = np.arange(6)
        with MemstoreClient(address, FAST_FAIL) as client, CachedReader(client, CacheConfig(max_rows=64)) as cached:
            cached.lookup(1, ids)  # version 0: the cache is within the bound, and the rows are resident
            for step in range(1, 4):
                client.push(1, ids, np.full((6, DIM), step, np.float32))
                np.testing.assert_array_equal(cached.lookup(1, ids).numpy(), live.gather(1, ids)[0])
            assert cached.stats.served_from_store == 3 and cached.stats.hits == 0
    finally:
        live.close()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
def test_a_cache_on_the_model_s_device_follows_the_pushes(tmp_path: Path, daemon_factory, device: str) -> None:
    """Through a CachedReader and a Prefetcher (on CUDA: lookups and changes on its copy stream)."""
    live = LiveTable.open(_zero_table(tmp_path / "t"), config=FAST)
    try:
        address = daemon_factory(live).address
        ids = np.arange(8).reshape(2, 4)

        def table_rows() -> np.ndarray:
            return live.gather(1, ids.reshape(-1))[0].reshape(2, 4, DIM)

        with MemstoreClient(address, FAST_FAIL) as client:
            with CachedReader(client, CacheConfig(max_rows=64), device=device) as cached:
                for step in range(1, 4):
                    np.testing.assert_array_equal(cached.lookup(1, ids).numpy(), table_rows())
                    client.push(1, ids, np.full((2, 4, DIM), step, np.float32))
                assert cached.stats.hits > 0 and cached.stats.rows_refreshed > 0
            config = PrefetchConfig(device=device, cache=CacheConfig(max_rows=64))
            with Prefetcher(client, lambda x: x, SMALL_LAYOUT.layer_ids, config) as prefetcher:
                for step in range(1, 4):
                    with prefetcher.submit_row_ids({1: ids, 4: ids}) as handle:
                        np.testing.assert_array_equal((handle.rows(1) * 1).cpu().numpy(), table_rows())
                    client.push(1, ids, np.full((2, 4, DIM), step, np.float32))
                assert prefetcher.stats.cache.hits > 0 and prefetcher.stats.cache.rows_refreshed > 0
    finally:
        live.close()


def test_a_cache_over_a_read_replica_follows_the_pushes_it_applies(tmp_path: Path) -> None:
    """A replica takes no pushes of its own, but its table changes with its primary's: the cache follows it."""
    primary_live = LiveTable.open(_zero_table(tmp_path / "primary"), config=FAST)
    primary = InProcessDaemon(primary_live, ServerConfig())
    replica_live = LiveTable.open(_zero_table(tmp_path / "replica"), config=FAST, primary=primary.address)
    follower = Follower(replica_live, FollowConfig(heartbeat_s=0.05, silence_s=2.0, initial_backoff_s=0.05))
    server, port = create_server(replica_live, "127.0.0.1:0", replica=follower)
    server.start()
    follower.start()
    try:
        ids = np.arange(6)
        with (
            MemstoreClient(primary.address, FAST_FAIL) as trainer,
            MemstoreClient(f"127.0.0.1:{port}", FAST_FAIL) as reader,
            CachedReader(reader, CacheConfig(max_rows=64)) as cached,
        ):
            assert not reader.trainable and reader.mutable and cached.stats.coherent
            cached.lookup(1, ids)
            trainer.push(1, ids, np.ones((6, DIM), np.float32))
            wait_until(lambda: replica_live.version == 1, "the replica applied the push")
            reader.version()  # the reader learns of it
            np.testing.assert_array_equal(cached.lookup(1, ids).numpy(), -np.ones((6, DIM), np.float32))
            assert cached.stats.rows_refreshed == 6 and cached.stats.hits == 6
    finally:
        follower.stop()
        server.stop(None).wait(10)
        replica_live.close()
        primary.server.stop(None).wait(10)
        primary_live.close()
