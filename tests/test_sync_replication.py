"""Synchronous replication (--sync-replicas): SyncAcks and LiveTable without gRPC, then real primaries and
replicas on loopback, the replicas as `memstore serve` children so that they can be stopped and killed."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save_file

from client import MemstoreClient
from memstore.cli import main
from memstore.daemon_config import DaemonConfig, ServerConfig
from memstore.dtypes import DType
from memstore.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from memstore.exchange import import_safetensors, tensor_name
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveConfig, LiveTable
from memstore.metrics import DaemonMetrics
from memstore.service import create_server
from memstore.sync import SyncAcks, SyncConfig, SyncTimeoutPolicy
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc
from tests.helpers import DEADLINE_S, FAST_FAIL, SMALL_LAYOUT, join_all, wait_until

LAYERS = SMALL_LAYOUT.layer_ids
DIM = SMALL_LAYOUT.dim
LR = 0.5  # a power of two: -LR x an integer sum is exact in float32, whatever the order of pushes
MANIFEST = Manifest(
    layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=3, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=LR)
)
FAST = LiveConfig(durability=Durability.OS, checkpoint_every=0)
# One attempt per call: a push the primary does not acknowledge raises here rather than being retried.
ONCE = replace(FAST_FAIL, max_attempts=1, timeout_s=DEADLINE_S, same_host=False)
# Every daemon a child: the log's records survive its kill -9 (not its host's power loss).
REPLICA_ARGS = ["--durability", "os", "--no-same-host"]
# Pushes meant to succeed retry UNAVAILABLE with their step id, as trainers do: a loaded host may keep a
# replica's report past a short --sync-timeout-s now and then.
RETRYING = replace(FAST_FAIL, max_attempts=5, timeout_s=DEADLINE_S, same_host=False)
WAIT_LONG = ["--sync-timeout-s", "600"]  # beyond every test's deadline: only a replica's report ends the wait


def _push_args(i: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The i-th push of a deterministic sequence: a layer, distinct ids, integer float32 gradients."""
    rng = np.random.default_rng(i)
    layer = LAYERS[i % len(LAYERS)]
    ids = rng.choice(SMALL_LAYOUT.num_rows(layer), size=32, replace=False)
    return layer, ids, rng.integers(-4, 5, (32, DIM)).astype(np.float32)


def _expected(pushes: list[int]) -> dict[int, np.ndarray]:
    """Every row of a zero-initialised SGD table after `pushes` (each applied once): -LR x the gradients."""
    rows = {layer: np.zeros((SMALL_LAYOUT.num_rows(layer), DIM), np.float32) for layer in LAYERS}
    for i in pushes:
        layer, ids, grads = _push_args(i)
        rows[layer][ids] -= LR * grads
    return rows


def _zero_table(path: Path) -> Path:
    """A float32 SGD table whose rows are all zero (zeros imported from safetensors)."""
    zeros = path.with_name(path.name + ".safetensors")
    save_file(
        {tensor_name(layer): np.zeros((SMALL_LAYOUT.num_rows(layer), DIM), np.float32) for layer in LAYERS}, str(zeros)
    )
    import_safetensors(zeros, path, manifest=MANIFEST)
    zeros.unlink()
    return path


def _rows_of(path: Path) -> tuple[int, dict[int, np.ndarray]]:
    """A stopped (or killed) daemon's table as its restart recovers it: its version and every row."""
    with LiveTable.open(path, config=FAST) as live:
        return live.version, {layer: live.gather(layer, np.arange(SMALL_LAYOUT.num_rows(layer)))[0] for layer in LAYERS}


def _describe(address: str) -> pb.DescribeResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.MemstoreStub(channel).Describe(pb.DescribeRequest(), timeout=5)


def _confirm(
    address: str, replica_id: str, version: int, fingerprint: str = MANIFEST.fingerprint, token: str = ""
) -> None:
    request = pb.ConfirmDurableRequest(replica_id=replica_id, durable_version=version, fingerprint=fingerprint)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        pb_grpc.MemstoreStub(channel).ConfirmDurable(request, timeout=5, metadata=metadata)


def _wait_for_reports(address: str, version: int) -> None:
    """Until a replica reported holding `version` (it follows, and reports)."""
    wait_until(
        lambda: any(r.durable_version >= version for r in _describe(address).replication.replicas),
        f"a replica reports version {version}",
    )


@pytest.fixture
def tables(tmp_path: Path) -> Callable[[str], Path]:
    """`tables(name)`: a zero-initialised SGD table (every one identical: replicas of one another)."""
    return lambda name: _zero_table(tmp_path / name)


@pytest.fixture
def daemons() -> Iterator[Callable[..., tuple[subprocess.Popen, str]]]:
    """`daemons(path, *args)`: a `memstore serve` child; every one is killed afterwards."""
    started: list[subprocess.Popen] = []

    def start(path: Path, *args: str) -> tuple[subprocess.Popen, str]:
        process, address = start_daemon(path, [*REPLICA_ARGS, *args])
        started.append(process)
        return process, address

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()  # a stopped (SIGSTOP) child too
            process.wait(timeout=DEADLINE_S)


@pytest.fixture
def primary(tables) -> Iterator[Callable[..., tuple[LiveTable, str, DaemonMetrics]]]:
    """`primary(sync, server=None)`: the table "primary" served in this process with `sync`."""
    started: list[tuple[grpc.Server, LiveTable]] = []

    def start(sync: SyncConfig, server: ServerConfig | None = None) -> tuple[LiveTable, str, DaemonMetrics]:
        live = LiveTable.open(tables("primary"), config=replace(FAST, sync=sync))
        metrics = DaemonMetrics()
        grpc_server, port = create_server(live, "127.0.0.1:0", server or ServerConfig(same_host=False), metrics=metrics)
        grpc_server.start()
        started.append((grpc_server, live))
        return live, f"127.0.0.1:{port}", metrics

    yield start
    for grpc_server, live in started:
        live.close_feed()  # pushes still waiting fail at once
        assert grpc_server.stop(grace=None).wait(DEADLINE_S)
        live.close()


# -- without gRPC ------------------------------------------------------------------------------------


def test_sync_acks_waits_for_distinct_replicas_and_releases_in_version_order() -> None:
    acks = SyncAcks(SyncConfig(replicas=2, timeout_s=600))
    done: list[int] = []
    waiters = [threading.Thread(target=lambda v=v: (acks.acknowledge(v), done.append(v))) for v in (1, 2, 3)]
    for waiter in waiters:
        waiter.start()
    wait_until(lambda: len(acks._changed._waiters) == 3, "three pushes wait")
    acks.confirm("a", 3)
    acks.confirm("a", 3)  # the same replica twice is one replica
    assert done == [] and acks.acknowledged_version == 0
    acks.confirm("b", 2)
    wait_until(lambda: sorted(done) == [1, 2], "versions 1 and 2 are acknowledged")
    assert acks.acknowledged_version == 2 and waiters[2].is_alive()
    acks.confirm("b", 3)
    join_all(waiters)
    assert acks.acknowledged_version == 3
    assert [(r.replica_id, r.durable_version) for r in acks.replicas()] == [("a", 3), ("b", 3)]
    stats = acks.stats()
    assert (stats.confirmed_version, stats.reporting, stats.timeouts) == (3, 2, 0)


def test_sync_acks_timeout_policies() -> None:
    fail = SyncAcks(SyncConfig(replicas=1, timeout_s=0.05))
    fail.confirm("a", 1)
    fail.acknowledge(1)
    with pytest.raises(
        UnavailableError, match="only 0 of the 1 replicas .* confirmed holding it within --sync-timeout-s"
    ):
        fail.acknowledge(2)
    assert fail.acknowledged_version == 1 and fail.stats().timeouts == 1 and not fail.degraded
    with pytest.raises(UnavailableError, match="retry it with the same step id"):
        fail.acknowledge(2)  # every push waits again under `fail`
    with pytest.raises(DeadlineExceededError, match="within the call's deadline"):
        fail.acknowledge(2, timeout_s=0.01)  # the caller's deadline, shorter than the policy's: not a timeout
    assert fail.stats().timeouts == 2

    degrade = SyncAcks(SyncConfig(replicas=1, timeout_s=0.05, policy=SyncTimeoutPolicy.DEGRADE))
    degrade.acknowledge(1)  # acknowledged after the timeout, without its replica
    assert degrade.degraded and degrade.acknowledged_version == 1
    degrade.acknowledge(2)  # at once: asynchronous now
    degrade.confirm("a", 1)  # caught up with the push that timed out: waiting again
    assert not degrade.degraded
    stats = degrade.stats()
    assert (stats.timeouts, stats.degradations, stats.acknowledged_version) == (1, 1, 2)

    closing = SyncAcks(SyncConfig(replicas=1, timeout_s=600))
    failed: list[Exception] = []

    def wait() -> None:
        try:
            closing.acknowledge(1)
        except UnavailableError as exc:
            failed.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: len(closing._changed._waiters) == 1, "the push waits")
    closing.close()  # the daemon stops: the push fails at once rather than after 600 s
    join_all([waiter])
    assert "before this daemon stopped" in str(failed[0])


def test_sync_config_checks_its_values() -> None:
    for bad in (-1, True, 1.5):
        with pytest.raises(InvalidArgumentError, match="sync replicas must be a count"):
            SyncConfig(replicas=bad)
    for bad in (0, -1, float("nan")):
        with pytest.raises(InvalidArgumentError, match="sync timeout must be in"):
            SyncConfig(replicas=1, timeout_s=bad)
    with pytest.raises(InvalidArgumentError, match="takes SyncTimeoutPolicy"):
        SyncConfig(replicas=1, policy="fail")


def test_a_waiting_push_holds_no_push_lock_and_a_retry_is_applied_once(tables) -> None:
    with LiveTable.open(tables("t"), config=replace(FAST, sync=SyncConfig(replicas=1, timeout_s=600))) as live:
        results: dict[int, object] = {}
        first = threading.Thread(
            target=lambda: results.update({1: live.push(*_push_args(1), step_id=1, client_id="a")})
        )
        first.start()
        wait_until(lambda: live.version == 1 and len(live.sync._changed._waiters) == 1, "push 1 waits for its replica")
        # Another trainer's push commits while the first waits (no push lock held), and waits in turn.
        second = threading.Thread(
            target=lambda: results.update({2: live.push(*_push_args(2), step_id=1, client_id="b")})
        )
        second.start()
        wait_until(lambda: live.version == 2 and len(live.sync._changed._waiters) == 2, "push 2 commits and waits")
        live.sync.confirm("r", 1)
        join_all([first])
        assert results[1].version == 1 and second.is_alive()
        live.sync.confirm("r", 2)
        join_all([second])
        assert live.sync.acknowledged_version == 2

    with LiveTable.open(tables("u"), config=replace(FAST, sync=SyncConfig(replicas=1, timeout_s=0.05))) as live:
        with pytest.raises(UnavailableError, match="version 1 is applied on this primary"):
            live.push(*_push_args(1), step_id=7, client_id="a")
        assert live.version == 1  # applied and visible, not acknowledged
        with pytest.raises(UnavailableError):  # the retry is answered only once a replica holds it
            live.push(*_push_args(1), step_id=7, client_id="a")
        live.sync.confirm("r", 1)
        again = live.push(*_push_args(1), step_id=7, client_id="a")
        assert again.version == 1 and live.version == 1  # not applied again
        layer, ids, grads = _push_args(1)
        np.testing.assert_array_equal(live.gather(layer, ids)[0], -LR * grads)  # once, exactly


# -- over gRPC ------------------------------------------------------------------------------------


def test_an_acknowledged_push_is_on_the_replica_when_the_primary_is_killed(tables, daemons) -> None:
    """kill -9 of the primary right after an acknowledgement: the replica holds every acknowledged push.
    The replica is stopped (SIGSTOP) before the last push and continued shortly after: asynchronously the
    push would be acknowledged while the replica cannot have it."""
    primary, address = daemons(tables("primary"), "--sync-replicas", "1", *WAIT_LONG)
    replica_path = tables("replica")
    replica, _ = daemons(replica_path, "--follow", address)
    with MemstoreClient(address, ONCE) as trainer:
        for i in range(1, 6):
            assert trainer.push(*_push_args(i), step_id=i).version == i
        replica.send_signal(signal.SIGSTOP)
        resume = threading.Timer(0.3, lambda: replica.poll() is None and replica.send_signal(signal.SIGCONT))
        resume.start()
        try:
            assert trainer.push(*_push_args(6), step_id=6).version == 6
            primary.kill()  # right after the acknowledgement, and the replica too
            replica.kill()
        finally:
            resume.cancel()
            join_all([resume])
    primary.wait(timeout=DEADLINE_S)
    replica.wait(timeout=DEADLINE_S)
    version, rows = _rows_of(replica_path)
    assert version == 6
    for layer, expected in _expected(list(range(1, 7))).items():
        np.testing.assert_array_equal(rows[layer], expected)


def test_a_stopped_replica_fails_pushes_after_the_timeout_and_a_retry_is_exactly_once(tables, daemons) -> None:
    primary, address = daemons(tables("primary"), "--sync-replicas", "1", "--sync-timeout-s", "1")
    replica, replica_address = daemons(tables("replica"), "--follow", address)
    _wait_for_reports(address, 0)
    with MemstoreClient(address, RETRYING) as trainer, MemstoreClient(address, ONCE) as once:
        trainer.push(*_push_args(1), step_id=1)
        replica.send_signal(signal.SIGSTOP)
        with pytest.raises(UnavailableError, match="version 2 is applied on this primary .* only 0 of the 1 replicas"):
            once.push(*_push_args(2), step_id=2)
        described = _describe(address)
        assert (described.version, described.replication.acknowledged_version) == (2, 1)
        assert described.replication.sync_replicas == 1
        assert described.replication.sync_timeout_policy == pb.SYNC_TIMEOUT_POLICY_FAIL
        replica.send_signal(signal.SIGCONT)
        assert trainer.push(*_push_args(2), step_id=2).version == 2  # the retry: acknowledged, not applied again
        assert trainer.push(*_push_args(3), step_id=3).version == 3
    with MemstoreClient(replica_address, ONCE) as reader:
        wait_until(lambda: reader.version() == 3, "the replica has version 3")
        for layer, expected in _expected([1, 2, 3]).items():
            np.testing.assert_array_equal(reader.lookup(layer, np.arange(len(expected))).numpy(), expected)
    described = _describe(address).replication
    assert described.acknowledged_version == 3 and not described.sync_degraded
    assert [r.durable_version for r in described.replicas] == [3]


def test_the_degrade_policy_acknowledges_then_waits_again_once_replicas_caught_up(primary) -> None:
    live, address, metrics = primary(SyncConfig(replicas=1, timeout_s=0.2, policy=SyncTimeoutPolicy.DEGRADE))
    with MemstoreClient(address, ONCE) as trainer:
        assert trainer.push(*_push_args(1), step_id=1).version == 1  # no replica: acknowledged after 0.2 s
        described = _describe(address).replication
        assert described.sync_degraded and described.acknowledged_version == 1
        assert described.sync_timeout_policy == pb.SYNC_TIMEOUT_POLICY_DEGRADE
        for i in range(2, 5):
            trainer.push(*_push_args(i), step_id=i)  # asynchronous: none of them waits, none times out
        assert metrics.total("memstore_sync_timeouts_total") == 1
        assert metrics.total("memstore_sync_degradations_total") == 1
        assert metrics.total("memstore_sync_degraded") == 1
        _confirm(address, "replica-a", 1)  # a replica holds the version that timed out: synchronous again
        assert not _describe(address).replication.sync_degraded
        assert trainer.push(*_push_args(5), step_id=5).version == 5  # waited again, timed out, degraded again
        assert metrics.total("memstore_sync_timeouts_total") == 2
        assert metrics.total("memstore_sync_degradations_total") == 2
        assert metrics.total("memstore_sync_degraded") == 1 and live.sync.acknowledged_version == 5


def test_two_sync_replicas_with_one_fail_until_a_second_follows(tables, daemons) -> None:
    _, address = daemons(tables("primary"), "--sync-replicas", "2", "--sync-timeout-s", "1")
    daemons(tables("replica1"), "--follow", address)
    _wait_for_reports(address, 0)
    with MemstoreClient(address, RETRYING) as trainer, MemstoreClient(address, ONCE) as once:
        with pytest.raises(UnavailableError, match="only [01] of the 2 replicas"):
            once.push(*_push_args(1), step_id=1)
        _wait_for_reports(address, 1)
        with pytest.raises(UnavailableError, match="only 1 of the 2 replicas"):  # one holds it: not enough
            once.push(*_push_args(1), step_id=1)
        daemons(tables("replica2"), "--follow", address)  # catches up from version 0
        assert trainer.push(*_push_args(1), step_id=1).version == 1
        assert trainer.push(*_push_args(2), step_id=2).version == 2
    replicas = _describe(address).replication.replicas
    assert len({r.replica_id for r in replicas}) == 2 and all(r.durable_version == 2 for r in replicas)


def test_a_replica_that_reconnects_catches_up_and_sync_resumes(tables, daemons) -> None:
    _, address = daemons(tables("primary"), "--sync-replicas", "1", "--sync-timeout-s", "1")
    replica_path = tables("replica")
    replica, _ = daemons(replica_path, "--follow", address)
    _wait_for_reports(address, 0)
    with MemstoreClient(address, RETRYING) as trainer, MemstoreClient(address, ONCE) as once:
        trainer.push(*_push_args(1), step_id=1)
        assert stop_daemon(replica) == 0
        with pytest.raises(UnavailableError, match="only 0 of the 1"):
            once.push(*_push_args(2), step_id=2)
        with pytest.raises(UnavailableError, match="only 0 of the 1"):
            once.push(*_push_args(3), step_id=3)  # the next one too: nobody holds it
        replica, _ = daemons(replica_path, "--follow", address)  # the same replica, restarted
        _wait_for_reports(address, 3)  # caught up with the pushes it missed
        trainer.push(*_push_args(4), step_id=4)
        assert trainer.push(*_push_args(3), step_id=3).version == 3  # the retry of 3: acknowledged, not applied
        described = _describe(address).replication
        assert [r.durable_version for r in described.replicas] == [4]  # one replica, known by its stable id
        assert described.acknowledged_version == 4
    assert stop_daemon(replica) == 0
    version, rows = _rows_of(replica_path)
    assert version == 4
    for layer, expected in _expected([1, 2, 3, 4]).items():
        np.testing.assert_array_equal(rows[layer], expected)


def test_asynchronous_replication_is_unchanged(tables, daemons) -> None:
    _, address = daemons(tables("primary"))
    replica, _ = daemons(tables("replica"), "--follow", address)
    wait_until(lambda: len(_describe(address).replication.replicas) == 1, "the replica reports")
    replica.send_signal(signal.SIGSTOP)
    with MemstoreClient(address, ONCE) as trainer:
        for i in range(1, 4):
            assert trainer.push(*_push_args(i), step_id=i).version == i  # acknowledged without the replica
    described = _describe(address).replication
    assert described.sync_replicas == 0 and described.acknowledged_version == 3
    assert [r.durable_version for r in described.replicas] == [0]  # reports, counted by nothing
    replica.send_signal(signal.SIGCONT)


def test_a_lookup_is_served_while_a_push_waits_for_its_replicas(primary) -> None:
    """With one work slot: a push waiting for its replicas gives it back, or lookups wait as long."""
    live, address, metrics = primary(
        SyncConfig(replicas=1, timeout_s=600), ServerConfig(same_host=False, max_workers=1)
    )
    with MemstoreClient(address, ONCE) as trainer, MemstoreClient(address, replace(ONCE, timeout_s=5)) as reader:
        pushing = threading.Thread(target=lambda: trainer.push(*_push_args(1), step_id=1))
        pushing.start()
        wait_until(lambda: len(live.sync._changed._waiters) == 1, "the push waits for its replica")
        layer, ids, grads = _push_args(1)
        np.testing.assert_array_equal(reader.lookup(layer, ids).numpy(), -LR * grads)  # visible before acknowledged
        assert pushing.is_alive()
        _confirm(address, "r", 1)
        join_all([pushing])
    assert metrics.total("memstore_sync_wait_seconds_count") == 1
    assert metrics.total("memstore_acknowledged_version") == 1


def test_confirm_durable_checks_its_caller_and_needs_a_replicate_token(primary, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    read, write, replicate = "r" * 20, "w" * 20, "p" * 20
    tokens.write_text(f"read {read}\nwrite {write}\nreplicate {replicate}\n")
    tokens.chmod(0o600)
    live, address, _ = primary(SyncConfig(replicas=1, timeout_s=600), ServerConfig(same_host=False, token_file=tokens))
    for token in (read, write):  # a trainer's token could otherwise acknowledge its own pushes
        with pytest.raises(grpc.RpcError) as info:
            _confirm(address, "fake", 0, token=token)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "ConfirmDurable needs a replicate token" in info.value.details()
    for kwargs, code, said in (
        ({"replica_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "needs a replica_id"),
        ({"fingerprint": "0" * 16}, grpc.StatusCode.FAILED_PRECONDITION, "not this daemon's"),
        ({"version": 5}, grpc.StatusCode.FAILED_PRECONDITION, "past this daemon's version 0"),
    ):
        arguments = {"replica_id": "r1", "version": 0, "fingerprint": MANIFEST.fingerprint} | kwargs
        with pytest.raises(grpc.RpcError) as info:
            _confirm(address, arguments["replica_id"], arguments["version"], arguments["fingerprint"], token=replicate)
        assert info.value.code() == code and said in info.value.details()
    assert live.sync.replicas() == []  # nothing refused was counted
    _confirm(address, "r1", 0, token=replicate)
    assert [r.replica_id for r in live.sync.replicas()] == ["r1"]


def test_sync_flags_are_checked_at_the_edge(tables, capsys) -> None:
    path = tables("t")
    for args, said in (
        (["--sync-timeout-s", "3"], "--sync-timeout-s configure synchronous replication and need --sync-replicas"),
        (["--sync-timeout-policy", "degrade"], "need --sync-replicas"),
        (["--sync-replicas", "-1"], "sync replicas must be a count"),
        (["--sync-replicas", "1", "--sync-timeout-s", "0"], "sync timeout must be in"),
        (["--sync-replicas", "5"], "can never be met: this daemon streams to at most --max-followers 4"),
        (["--sync-replicas", "1", "--read-only"], "drop --read-only"),
        (["--sync-replicas", "1", "--follow", "127.0.0.1:1"], "--sync-replicas is for a primary"),
    ):
        assert main(["serve", str(path), "--listen", "127.0.0.1:0", *args]) == 2, args
        assert said in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="can never be met"):
        DaemonConfig(path, server=ServerConfig(max_followers=0), live=replace(FAST, sync=SyncConfig(replicas=1)))
