"""Pushes through a real daemon: client push, versions, errors, concurrent replicas, snapshots, Pusher modes."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import ClientConfig, MemstoreClient, PushAck, PushConfig, Pusher
from memstore.create import create_table
from memstore.daemon_config import ServerConfig
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, ReadOnlyError, UnavailableError
from memstore.layout import EngramLayout
from memstore.live import LiveConfig, LiveTable
from memstore.metrics import DaemonMetrics
from memstore.service import create_server
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from memstore.wire import memstore_pb2 as pb
from tests.helpers import DEADLINE_S, FAST_FAIL, SMALL_LAYOUT, join_all

LAYER = SMALL_LAYOUT.layer_ids[0]
DIM = SMALL_LAYOUT.dim
SGD_1 = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)  # a push of -g adds g exactly (small integers)


def _serve_trainable(path: Path, daemon_factory, init_std: float = 1.0, layout: EngramLayout = SMALL_LAYOUT):
    manifest = Manifest(layout=layout, dtype=DType.FLOAT32, seed=1, optimizer=SGD_1, init_std=init_std)
    live = LiveTable.open(create_table(path, manifest), config=LiveConfig(durability=Durability.OS))
    return daemon_factory(live, ServerConfig(snapshot_dir=path.parent / "snaps")), live


@pytest.fixture
def trainable(tmp_path, daemon_factory):
    """(daemon, LiveTable) of a float32 table trained by SGD with lr 1."""
    daemon, live = _serve_trainable(tmp_path / "t", daemon_factory)
    yield daemon, live
    live.close()


@pytest.fixture
def zero_table(tmp_path, daemon_factory):
    """Like `trainable`, with every row starting at 0: sums of small integers are exact in any order."""
    daemon, live = _serve_trainable(tmp_path / "zero", daemon_factory, init_std=0.0)
    yield daemon, live
    live.close()


def test_a_push_is_visible_to_the_next_lookup_on_both_transports(trainable, client_config) -> None:
    daemon, live = trainable
    ids = np.array([3, 7, 11])
    before = live.gather(LAYER, ids)[0].copy()
    with MemstoreClient(daemon.address, client_config) as client:
        assert client.trainable and client.version() == 0
        client.lookup(LAYER, ids)  # maps the files first on the same-host path
        ack = client.push(LAYER, ids, -np.ones((3, DIM), dtype=np.float32))
        assert ack == PushAck(version=1, layer_step=1, rows=3)
        rows, version = client.lookup(LAYER, ids, return_version=True)
        np.testing.assert_array_equal(rows.numpy(), before + 1)
        assert version == 1 and client.version() == 1


def test_repeated_ids_are_summed_before_sending(trainable) -> None:
    daemon, live = trainable
    before = live.gather(LAYER, np.array([5, 9]))[0].copy()
    with MemstoreClient(daemon.address, FAST_FAIL) as client:
        ack = client.push(
            LAYER,
            np.array([[5, 9], [5, 5]]),
            -np.arange(1, 5, dtype=np.float32).reshape(2, 2, 1) * np.ones((2, 2, DIM), np.float32),
        )
    assert ack.rows == 2
    np.testing.assert_array_equal(live.gather(LAYER, np.array([5, 9]))[0], before + np.float32([[1 + 3 + 4], [2]]))


def test_bad_pushes_get_precise_errors_and_change_nothing(trainable) -> None:
    daemon, live = trainable
    before = live.gather(LAYER, np.arange(100))[0].copy()
    with MemstoreClient(daemon.address, FAST_FAIL) as client:
        with pytest.raises(InvalidArgumentError, match="not finite"):
            client.push(LAYER, np.array([1, 2]), np.array([[np.nan] * DIM, [0] * DIM], dtype=np.float32))
        with pytest.raises(InvalidArgumentError, match="out of range"):
            client.push(LAYER, np.array([10**8]), np.zeros((1, DIM), np.float32))
        with pytest.raises(InvalidArgumentError, match="grads must be"):
            client.push(LAYER, np.array([1, 2]), np.zeros((3, DIM), np.float32))
        with pytest.raises(InvalidArgumentError, match="lr_scale"):
            client.push(LAYER, np.array([1]), np.zeros((1, DIM), np.float32), lr_scale=-1.0)
        raw = pb.PushRequest(layer_id=LAYER, row_ids=np.array([1], "<i8").tobytes(), grads=b"\0" * 7)
        with pytest.raises(grpc.RpcError) as caught:
            client._stub.Push(raw, timeout=5)
        assert (
            caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grads holds 7 bytes" in caught.value.details()
        )
    np.testing.assert_array_equal(live.gather(LAYER, np.arange(100))[0], before)
    assert live.version == 0


def test_a_frozen_table_refuses_pushes(daemon, client_config) -> None:
    with MemstoreClient(daemon.address, client_config) as client:
        assert not client.trainable
        with pytest.raises(ReadOnlyError, match="no optimizer"):
            client.push(LAYER, np.array([1]), np.zeros((1, DIM), np.float32))


def test_concurrent_replicas_lose_no_update(zero_table) -> None:
    daemon, live = zero_table
    replicas, pushes, rows = 8, 25, 64
    before = live.gather(LAYER, np.arange(rows))[0].copy()
    expected = before.copy()
    plans = []
    for r in range(replicas):
        rng = np.random.default_rng(r)
        plan = [
            (rng.choice(rows, 20, replace=False), rng.integers(1, 5, (20, 1)).astype(np.float32)) for _ in range(pushes)
        ]
        for ids, inc in plan:
            expected[ids] += inc
        plans.append(plan)
    errors: list[BaseException] = []

    def replica(plan) -> None:
        try:
            with MemstoreClient(daemon.address, replace(FAST_FAIL, client_id=f"r{id(plan)}")) as client:
                for step, (ids, inc) in enumerate(plan, start=1):
                    client.push(LAYER, ids, -np.repeat(inc, DIM, axis=1), step_id=step)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(plan,)) for plan in plans]
    for t in threads:
        t.start()
    join_all(threads)
    assert not errors
    assert live.version == replicas * pushes
    np.testing.assert_array_equal(live.gather(LAYER, np.arange(rows))[0], expected)  # float32 sums of small integers


def test_snapshot_rpc_writes_a_servable_copy(trainable, tmp_path) -> None:
    daemon, live = trainable
    with MemstoreClient(daemon.address, FAST_FAIL) as client:
        client.push(LAYER, np.array([1, 2]), np.ones((2, DIM), np.float32))
        path, version = client.snapshot("after-one")
        assert version == 1 and Path(path) == (tmp_path / "snaps" / "after-one").resolve()
        for bad in ("", "..", "a/b", ".hidden"):
            with pytest.raises(InvalidArgumentError, match="plain directory name"):
                client.snapshot(bad)
        with pytest.raises(InvalidArgumentError, match="exists"):
            client.snapshot("after-one")
    with LiveTable.open(path, read_only=True) as snap:
        np.testing.assert_array_equal(snap.gather(LAYER, np.array([1, 2]))[0], live.gather(LAYER, np.array([1, 2]))[0])


class _SlowTarget:
    """A push target with a fixed latency that records how many steps were unacknowledged."""

    def __init__(self, latency_s: float, fail_step: int | None = None) -> None:
        self.latency_s = latency_s
        self.fail_step = fail_step
        self.acked: set[int] = set()
        self.lock = threading.Lock()

    def push(self, layer_id, row_ids, grads, *, step_id=0, lr_scale=None) -> PushAck:
        time.sleep(self.latency_s)
        if step_id == self.fail_step:
            raise UnavailableError("daemon gone")
        with self.lock:
            self.acked.add(step_id)
        return PushAck(version=step_id, layer_step=step_id, rows=len(row_ids))


def _grads() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {layer: (np.arange(4), np.zeros((4, DIM), np.float32)) for layer in SMALL_LAYOUT.layer_ids}


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_pusher_keeps_at_most_k_steps_unacknowledged(staleness: int) -> None:
    target = _SlowTarget(0.01)
    with Pusher(target, SMALL_LAYOUT.layer_ids, PushConfig(max_in_flight_steps=staleness)) as pusher:
        for step in range(1, 12):
            pusher.push_step(step, _grads())
            with target.lock:
                unacknowledged = step - len(target.acked)
            assert unacknowledged <= staleness
        assert pusher.stats.max_in_flight_seen <= staleness + 1
    assert target.acked == set(range(1, 12))  # close() flushed the rest


def test_an_async_push_error_surfaces_in_a_later_step_naming_it() -> None:
    target = _SlowTarget(0.005, fail_step=3)
    pusher = Pusher(target, SMALL_LAYOUT.layer_ids, PushConfig(max_in_flight_steps=2))
    with pytest.raises(UnavailableError, match="push of step 3, layer"):
        for step in range(1, 10):
            pusher.push_step(step, _grads())
        pusher.flush()
    pusher.close()


@pytest.mark.parametrize("stop", ["checkpointed", "crashed"])
def test_an_applied_push_whose_answer_was_lost_is_retried_across_a_daemon_restart_and_applied_once(
    tmp_path, stop: str
) -> None:
    """The daemon applies the push and stops (cleanly, or crashing with the push only in its log)
    before answering; the client's retry (same step id) reaches the daemon restarted on the table,
    which recognises the step: applied once, and the first answer given again."""
    path = create_table(tmp_path / "t", Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=1, optimizer=SGD_1))
    # The client's address is a link to the listening daemon's Unix socket: the restarted daemon
    # listens before the first one stops, with no moment in which the address is free (a TCP port
    # freed by the stop could be taken by another process, and the client's retry could come too early).
    link = tmp_path / "daemon.sock"
    link.symlink_to(tmp_path / "first.sock")
    address = f"unix:{link}"
    ids, grads = np.array([1]), -np.ones((1, DIM), np.float32)
    first = LiveTable.open(path, config=LiveConfig(durability=Durability.OS, checkpoint_every=0))
    before = first.gather(LAYER, ids)[0].copy()
    server, _ = create_server(first, f"unix:{tmp_path / 'first.sock'}", ServerConfig(same_host=False))
    applied, stopped = threading.Event(), threading.Event()
    push = first.push

    def push_then_hang(*args, **kwargs):  # the daemon dies between applying and answering
        result = push(*args, **kwargs)
        applied.set()
        stopped.wait(30)
        return result

    first.push = push_then_hang
    servers = [server]
    server.start()
    config = replace(FAST_FAIL, same_host=False, timeout_s=30.0, max_attempts=2)  # one retry: it must land
    result: dict[str, object] = {}

    def train_step() -> None:
        with MemstoreClient(address, config) as client:
            try:
                result["ack"] = client.push(LAYER, ids, grads, step_id=7)
            except BaseException as exc:  # reported below
                result["error"] = exc

    trainer = threading.Thread(target=train_step)
    trainer.start()
    second = None
    try:
        assert applied.wait(30), "the push never reached the daemon"
        # The push is applied; its answer is not sent yet.
        if stop == "checkpointed":
            first.close()
        else:
            first._close_files()  # a crash: the push is only in the log, replayed by the restart
        second = LiveTable.open(path, config=LiveConfig(durability=Durability.OS))  # the restart
        assert second.version == 1
        metrics = DaemonMetrics()
        # Listening before the first daemon goes: the client's first retry finds the restarted one.
        restarted, _ = create_server(
            second, f"unix:{tmp_path / 'second.sock'}", ServerConfig(same_host=False), metrics=metrics
        )
        servers.append(restarted)
        restarted.start()
        (tmp_path / "moved.sock").symlink_to(tmp_path / "second.sock")
        (tmp_path / "moved.sock").replace(link)  # rename: atomic
        stopping = server.stop(grace=None)  # the first daemon goes without answering
        stopped.set()
        assert stopping.wait(30)
        trainer.join(60)
        assert not trainer.is_alive(), "the push neither succeeded nor failed by its deadline"
    finally:
        stopped.set()
        for running in servers:
            running.stop(grace=None).wait(30)
        trainer.join(60)
        first.close()
        if second is not None:
            second.close()
    assert "error" not in result, result.get("error")
    assert result["ack"] == PushAck(version=1, layer_step=1, rows=1)  # the first answer, sent again
    assert metrics.total("memstore_requests_total", method="Push", code="OK") == 1  # the retry got there
    with LiveTable.open(path, read_only=True) as reopened:
        assert reopened.version == 1
        np.testing.assert_array_equal(reopened.gather(LAYER, ids)[0], before + 1)  # applied once


def test_client_id_defaults_to_host_and_pid() -> None:
    assert ":" in ClientConfig().client_id


@pytest.mark.parametrize("transport", ["same-host", "data-plane"])
def test_readers_never_see_a_torn_row_while_pushes_land(tmp_path, daemon_factory, transport: str) -> None:
    # Each push adds one amount to every value of every row it touches, so a torn read shows a row
    # whose values differ from each other. Wide rows: numpy copies them without holding the GIL, so
    # the in-process reader can overlap the daemon's write of a row (16 values never would).
    wide = EngramLayout(layer_ids=(LAYER,), vocab_size_per_ngram=(60, 60), max_ngram=3, heads_per_ngram=1, dim=512)
    daemon, live = _serve_trainable(tmp_path / "wide", daemon_factory, init_std=0.0, layout=wide)
    ids = np.arange(wide.num_rows(LAYER))
    stop = threading.Event()
    failures: list[BaseException] = []

    def keep_pushing() -> None:
        try:
            with MemstoreClient(daemon.address, FAST_FAIL) as pusher:
                k = 0
                while not stop.is_set():
                    k += 1
                    pusher.push(LAYER, ids, -np.full((len(ids), wide.dim), k % 5 + 1, np.float32))
        except BaseException as exc:  # reported below
            failures.append(exc)

    writer = threading.Thread(target=keep_pushing)
    writer.start()
    try:
        reading = {"same-host": {"same_host": True}, "data-plane": {"same_host": False, "data_plane": True}}
        with MemstoreClient(daemon.address, replace(FAST_FAIL, **reading[transport])) as reader:
            # Same-host reads take microseconds, a push a millisecond: reads continue until they have
            # seen 30 versions, else they could all fall between two pushes and prove nothing.
            versions: list[int] = []
            deadline = time.monotonic() + DEADLINE_S
            while len(versions) < 200 or len(set(versions)) < 30:
                assert time.monotonic() < deadline, f"reads saw versions {sorted(set(versions))}: {failures}"
                rows, version = reader.lookup(LAYER, ids, return_version=True)
                assert (rows == rows[:, :1]).all(), "a row mixes values of two versions"
                versions.append(version)
            assert reader.transport == transport
    finally:
        stop.set()
        join_all([writer])
        live.close()
    assert not failures
    assert versions == sorted(versions)


def test_a_snapshot_serves_read_only_while_training_goes_on(trainable, daemon_factory) -> None:
    daemon, live = trainable
    with MemstoreClient(daemon.address, FAST_FAIL) as trainer:
        trainer.push(LAYER, np.array([4]), np.ones((1, DIM), np.float32))
        path, version = trainer.snapshot("for-inference")
        with LiveTable.open(path, read_only=True) as snapshot:
            inference = daemon_factory(snapshot)
            with MemstoreClient(inference.address, FAST_FAIL) as reader:
                served = reader.lookup(LAYER, np.array([4])).numpy()
                trainer.push(LAYER, np.array([4]), np.ones((1, DIM), np.float32))  # training goes on
                np.testing.assert_array_equal(reader.lookup(LAYER, np.array([4])).numpy(), served)
                assert not reader.trainable and reader.version() == version
                with pytest.raises(ReadOnlyError, match="read-only"):
                    reader.push(LAYER, np.array([4]), np.ones((1, DIM), np.float32))
