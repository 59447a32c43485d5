"""Read replicas: the feed and apply_replicated without gRPC, then real primaries and replicas on loopback."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import MemstoreClient
from memstore.cli import main
from memstore.codec import encode_row_ids
from memstore.create import create_table
from memstore.daemon_config import ServerConfig
from memstore.dtypes import DType
from memstore.errors import (
    DataLossError,
    InvalidArgumentError,
    LayoutMismatchError,
    ReadOnlyError,
    ReplicationGapError,
    UnavailableError,
)
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveConfig, LiveTable
from memstore.replica import FollowConfig, Follower, check_same_table, manifest_differences
from memstore.service import SERVICE_NAME, create_server
from memstore.sharding import Sharding
from memstore.table import open_store
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.tabledir.record import PushRecord
from memstore.wal import Durability
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc
from tests.helpers import DEADLINE_S, FAST_FAIL, SMALL_LAYOUT, join_all, wait_until

LAYERS = SMALL_LAYOUT.layer_ids
DIM = SMALL_LAYOUT.dim
MANIFEST = Manifest(
    layout=SMALL_LAYOUT, dtype=DType.FLOAT16, seed=5, optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.05)
)
# No checkpoints while a test runs: the log keeps every push, for comparing the logged bytes.
FAST = LiveConfig(durability=Durability.OS, checkpoint_every=0)
QUICK = FollowConfig(heartbeat_s=0.05, silence_s=2.0, initial_backoff_s=0.05, max_backoff_s=0.2)
NOBODY = "127.0.0.1:1"  # a primary address where nothing listens


def _push_args(i: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The i-th push of a deterministic sequence: a layer, distinct ids, float32 gradients."""
    rng = np.random.default_rng(i)
    layer = LAYERS[i % len(LAYERS)]
    ids = rng.choice(SMALL_LAYOUT.num_rows(layer), size=64, replace=False)
    return layer, ids, rng.standard_normal((64, DIM)).astype(np.float32)


def _push(live: LiveTable, first: int, last: int) -> None:
    for i in range(first, last + 1):
        live.push(*_push_args(i), step_id=i, client_id="trainer")


def _contents(path: Path, live: LiveTable | None = None) -> dict[str, bytes]:
    """Every row and optimizer-state byte of a table, per file (through `live`'s stores when open)."""
    if live is not None:
        return {name: s.gather(np.arange(s.num_rows)).tobytes() for name, s in live._stores_by_name().items()}
    manifest = Manifest.read(path)
    contents = {}
    for layer in manifest.layout.layer_ids:
        stores = {manifest.layer_file(layer): (DIM, manifest.dtype)}
        stores |= {name: (width, DType.FLOAT32) for name, width in manifest.state_files(layer).values()}
        for name, (width, dtype) in stores.items():
            store = open_store(manifest.backend, path / name, manifest.stored_rows(layer), width, dtype, True)
            contents[name] = store.gather(np.arange(store.num_rows)).tobytes()
            store.close()
    return contents


def _logged(live: LiveTable) -> list[tuple[int, bytes]]:
    """Every record in a table's write-ahead log (FAST keeps them all until close)."""
    return [(r.version, r.payload) for r in live._wal.records()]


def _wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _health(address: str) -> set[int]:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status for s in ("", SERVICE_NAME)}


def _describe(address: str) -> pb.DescribeResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.MemstoreStub(channel).Describe(pb.DescribeRequest(), timeout=5)


def _lookup_status(address: str) -> tuple[grpc.StatusCode, str]:
    """The status of a one-row Lookup through the raw stub (no client retries)."""
    with grpc.insecure_channel(address) as channel:
        request = pb.LookupRequest(layer_id=LAYERS[0], row_ids=encode_row_ids(np.array([0])))
        try:
            list(pb_grpc.MemstoreStub(channel).Lookup(request, timeout=5))
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@dataclass
class Served:
    """A table opened live and served on loopback (a primary, or a replica with its follower)."""

    live: LiveTable
    server: grpc.Server
    address: str
    follower: Follower | None = None

    def stop(self) -> None:
        """Stop following, serving, and close the table; idempotent."""
        if self.follower is not None:
            self.follower.stop()
        assert self.server.stop(grace=None).wait(DEADLINE_S)
        self.live.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """`serve(path, primary=None, config=FAST, follow=QUICK, server=None, listen="127.0.0.1:0")`: a
    started primary (or, with `primary`, a following replica); all are stopped afterwards, replicas first."""
    started: list[Served] = []

    def start(
        path: Path,
        primary: str | None = None,
        config: LiveConfig = FAST,
        follow: FollowConfig = QUICK,
        server: ServerConfig | None = None,
        listen: str = "127.0.0.1:0",
        start_following: bool = True,
    ) -> Served:
        live = LiveTable.open(path, config=config, primary=primary)
        follower = None if primary is None else Follower(live, follow)
        grpc_server, bound = create_server(live, listen, server, replica=follower)
        grpc_server.start()
        if follower is not None and start_following:
            follower.start()
        address = listen if listen.startswith("unix:") else f"127.0.0.1:{bound}"
        started.append(Served(live, grpc_server, address, follower))
        return started[-1]

    yield start
    for served in reversed(started):
        served.stop()


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path]:
    """Two identical trainable tables (an identical `memstore create`): a primary's and a replica's."""
    return create_table(tmp_path / "primary", MANIFEST), create_table(tmp_path / "replica", MANIFEST)


# -- the plain-function layer ---------------------------------------------------------------------


def test_records_after_waits_for_pushes_and_reads_the_log_behind_the_feed(tables) -> None:
    path, _ = tables
    one_record = LiveConfig(durability=Durability.OS, checkpoint_every=0, feed_bytes=1)  # the newest only
    with LiveTable.open(path, config=one_record) as live:
        assert live.records_after(0, 1 << 20, timeout_s=0.01) == []  # up to date: a heartbeat is due
        woken: list = []
        # A wait far longer than the test's deadline: only the push can end it in time.
        waiter = threading.Thread(target=lambda: woken.append(live.records_after(0, 1 << 20, timeout_s=600)))
        waiter.start()
        wait_until(lambda: len(live._feed.changed._waiters) == 1, "the follower waits for the next push")
        _push(live, 1, 1)
        join_all([waiter])  # woken by the push
        assert [r.version for r in woken[0]] == [1]
        _push(live, 2, 6)
        logged = _logged(live)
        assert [(r.version, r.payload) for r in live.records_after(5, 1 << 20, 0)] == logged[5:]  # from the feed
        behind = live.records_after(0, 1 << 20, 0)  # versions 1..5 left the feed: read from the log
        assert [(r.version, r.payload) for r in behind] == logged
        assert len(live.records_after(0, 1, 0)) == 1  # a batch is at least one record, else within max_bytes
        with pytest.raises(ReplicationGapError, match="past this table's version 6"):
            live.records_after(7, 1 << 20, 0)
        live.checkpoint()  # drops the log: versions 1..5 are gone
        with pytest.raises(ReplicationGapError, match="memstore reseed") as info:
            live.records_after(2, 1 << 20, 0)
        assert "holds pushes only after version 5" in str(info.value)
        _push(live, 7, 10)  # the log holds 7..10, the feed 10
        with pytest.raises(ReplicationGapError, match="holds pushes only after version 6"):
            live.records_after(2, 1 << 20, 0)
        live._wal.append(11, logged[0][1])  # logged but not applied yet: a push in progress
        assert [r.version for r in live.records_after(6, 1 << 20, 0)] == [7, 8, 9, 10]
        live.close_feed()
        with pytest.raises(UnavailableError, match="stopped serving followers"):
            live.records_after(10, 1 << 20, 5)


def test_apply_replicated_reproduces_the_primary_and_checks_its_input(tables) -> None:
    primary_path, replica_path = tables
    with (
        LiveTable.open(primary_path, config=FAST) as primary,
        LiveTable.open(replica_path, config=FAST, primary=NOBODY) as replica,
    ):
        _push(primary, 1, 8)
        records = primary.records_after(0, 1 << 30, 0)
        before = _contents(replica_path, replica)
        with pytest.raises(DataLossError, match="does not follow this replica's version 0"):
            replica.apply_replicated(2, records[1].payload)
        with pytest.raises(DataLossError, match="malformed"):
            replica.apply_replicated(1, records[0].payload[:-3])
        with pytest.raises(DataLossError, match="outside layer"):
            bad = PushRecord.decode(records[0].payload, primary.manifest)
            replica.apply_replicated(1, replace(bad, ids=np.r_[10**9, bad.ids[1:]]).encode())
        assert replica.version == 0 and _contents(replica_path, replica) == before
        for record in records:
            replica.apply_replicated(record.version, record.payload)
        assert replica.version == primary.version == 8
        assert replica.layer_steps == primary.layer_steps
        # Each client's last step, so a retried step is recognised after a failover to the replica too.
        assert replica._last_push == primary._last_push
        assert {key: step for key, (step, _) in replica._last_push.items()} == {
            ("trainer", LAYERS[0]): 8,
            ("trainer", LAYERS[1]): 7,
        }
        assert _contents(replica_path, replica) == _contents(primary_path, primary)
        with pytest.raises(ReadOnlyError, match=f"read replica of {NOBODY}; push to the primary"):
            replica.push(*_push_args(9))
        with pytest.raises(ReadOnlyError, match="for read replicas"):
            primary.apply_replicated(9, records[0].payload)
        assert _logged(replica) == _logged(primary)  # the very bytes the primary logged


def test_a_replica_needs_a_writable_trainable_table(tables, table_path) -> None:
    _, replica_path = tables
    with pytest.raises(InvalidArgumentError, match="drop --read-only"):
        LiveTable.open(replica_path, read_only=True, primary=NOBODY)
    with pytest.raises(InvalidArgumentError, match="no optimizer"):
        LiveTable.open(table_path, primary=NOBODY)
    LiveTable.open(replica_path, config=FAST).close()  # the failed opens released the writer lock


def test_manifest_differences_name_the_field() -> None:
    other_optimizer = replace(MANIFEST, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.05))
    assert manifest_differences(MANIFEST, replace(MANIFEST, rows_sha256="ab")) == []  # not part of the table
    assert manifest_differences(MANIFEST, other_optimizer) == [
        "optimizer: "
        + ", ".join(f"{k} {v}" for k, v in MANIFEST.optimizer.to_dict().items())
        + " vs. "
        + ", ".join(f"{k} {v}" for k, v in other_optimizer.optimizer.to_dict().items())
    ]
    shard0 = replace(MANIFEST, sharding=Sharding.spread(2, 0, num_partitions=4))
    shard1 = replace(MANIFEST, sharding=Sharding.spread(2, 1, num_partitions=4))
    assert manifest_differences(shard0, shard1) == [
        "sharding: shard 0 of 2 (4 partitions) vs. shard 1 of 2 (4 partitions)"
    ]
    with pytest.raises(LayoutMismatchError, match="replica cannot follow primary: their tables differ .seed: 5 vs. 6"):
        check_same_table(MANIFEST, replace(MANIFEST, seed=6), "replica", "primary")


# -- over gRPC -------------------------------------------------------------------------------


def test_pushes_reach_the_replica_byte_identical(tables, serve) -> None:
    primary_path, replica_path = tables
    primary = serve(primary_path)
    assert _describe(primary.address).replication.role == pb.REPLICATION_ROLE_STANDALONE
    replica = serve(replica_path, primary=primary.address)
    with MemstoreClient(primary.address, FAST_FAIL) as trainer:
        for i in range(1, 31):
            trainer.push(*_push_args(i), step_id=i)
    _wait_until(lambda: replica.live.version == 30)
    assert _contents(replica_path, replica.live) == _contents(primary_path, primary.live)
    assert replica.live.layer_steps == primary.live.layer_steps
    with MemstoreClient(replica.address, FAST_FAIL) as reader:
        layer, ids, _ = _push_args(30)
        rows, version = reader.lookup(layer, ids, return_version=True)
        np.testing.assert_array_equal(rows.numpy(), primary.live.gather(layer, ids)[0])
        assert version == 30 and not reader.trainable
    described = _describe(replica.address).replication
    assert described.role == pb.REPLICATION_ROLE_REPLICA and described.primary_address == primary.address
    assert (described.applied_version, described.primary_version, described.lag_versions) == (30, 30, 0)
    assert described.serving and described.HasField("seconds_since_contact") and described.seconds_since_contact < 5
    on_primary = _describe(primary.address).replication
    assert on_primary.role == pb.REPLICATION_ROLE_PRIMARY and on_primary.followers == 1
    assert _health(replica.address) == {health_pb2.HealthCheckResponse.SERVING}
    assert _logged(replica.live) == _logged(primary.live) and len(_logged(primary.live)) == 30


def test_a_replica_can_follow_a_replica(tables, serve, tmp_path) -> None:
    primary_path, replica_path = tables
    primary = serve(primary_path)
    replica = serve(replica_path, primary=primary.address)
    second = serve(create_table(tmp_path / "second", MANIFEST), primary=replica.address)
    _push(primary.live, 1, 10)
    _wait_until(lambda: second.live.version == 10)
    assert _contents(tmp_path / "second", second.live) == _contents(primary_path, primary.live)
    described = _describe(replica.address).replication
    assert described.role == pb.REPLICATION_ROLE_REPLICA and described.followers == 1


def test_pushes_to_a_replica_are_refused_naming_the_primary(tables, serve) -> None:
    primary_path, replica_path = tables
    primary = serve(primary_path)
    replica = serve(replica_path, primary=primary.address)
    with MemstoreClient(replica.address, FAST_FAIL) as client:
        with pytest.raises(ReadOnlyError, match=f"read replica of {primary.address}; push to the primary"):
            client.push(*_push_args(1))
    assert replica.live.version == primary.live.version == 0


def test_a_replica_beyond_max_lag_is_not_serving_and_refuses_lookups(tables, serve) -> None:
    primary_path, replica_path = tables
    with LiveTable.open(primary_path, config=FAST) as primary:
        _push(primary, 1, 6)
        records = primary.records_after(0, 1 << 30, 0)
    replica = serve(replica_path, primary=NOBODY, follow=replace(QUICK, max_lag=5), start_following=False)
    follower = replica.follower
    follower.observe(primary_version=6)  # the primary said it is at 6; the replica is at 0
    assert _health(replica.address) == {health_pb2.HealthCheckResponse.NOT_SERVING}
    code, details = _lookup_status(replica.address)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == (
        f"replica is 6 versions behind its primary {NOBODY}, more than --max-lag 5; another replica or the "
        "primary can serve this read"
    )
    described = _describe(replica.address).replication
    assert (described.lag_versions, described.serving) == (6, False) and "more than --max-lag 5" in described.problem
    replica.live.apply_replicated(records[0].version, records[0].payload)
    follower.observe(primary_version=6)  # lag 5: at the bound, still serving
    assert _health(replica.address) == {health_pb2.HealthCheckResponse.SERVING}
    assert _lookup_status(replica.address) == (grpc.StatusCode.OK, "")
    follower.observe(primary_version=7)  # the primary moved on: lag 6 again
    assert _lookup_status(replica.address)[0] == grpc.StatusCode.UNAVAILABLE


def test_a_replica_behind_what_the_primary_holds_stops_then_catches_up_from_a_snapshot(tables, serve) -> None:
    primary_path, replica_path = tables
    # A feed of 3 records (10.8 kB each) and a checkpoint every 2 pushes: a replica at 0 is out of reach.
    small = LiveConfig(durability=Durability.OS, checkpoint_every=2, feed_bytes=40_000)
    primary = serve(primary_path, config=small)
    _push(primary.live, 1, 9)
    replica = serve(replica_path, primary=primary.address)
    _wait_until(lambda: not replica.follower.status().serving)
    status = replica.follower.status()
    assert status.lag == 9 and "too far behind" in status.problem and "memstore reseed" in status.problem
    assert _health(replica.address) == {health_pb2.HealthCheckResponse.NOT_SERVING}
    code, details = _lookup_status(replica.address)
    assert code == grpc.StatusCode.UNAVAILABLE and "stopped following" in details
    assert replica.live.version == 0
    # The documented way back: a snapshot of the primary copied over the replica's table, then a restart.
    replica.stop()
    primary.live.snapshot(primary_path.parent / "snap")
    shutil.rmtree(replica_path)
    shutil.copytree(primary_path.parent / "snap", replica_path)
    _push(primary.live, 10, 12)  # training goes on meanwhile (the feed still holds these three)
    restarted = serve(replica_path, primary=primary.address)
    _wait_until(lambda: restarted.live.version == 12)
    assert restarted.follower.status().serving
    assert _contents(replica_path, restarted.live) == _contents(primary_path, primary.live)


def test_a_replica_of_another_table_refuses_at_start_up(tables, serve, tmp_path, capsys) -> None:
    primary_path, _ = tables
    primary = serve(primary_path)
    other = create_table(tmp_path / "other", replace(MANIFEST, optimizer=OptimizerConfig(kind=OptimizerKind.SGD)))
    code = main(["serve", str(other), "--listen", "127.0.0.1:0", "--follow", primary.address])
    assert code == 2
    error = capsys.readouterr().err
    assert f"cannot follow primary {primary.address}: their tables differ (optimizer: kind sgd" in error
    # The primary refuses such a follower too, whatever the follower checked.
    request = pb.FollowRequest(manifest_json=Manifest.read(other).to_json(), follower_id="stray")
    with grpc.insecure_channel(primary.address) as channel, pytest.raises(grpc.RpcError) as info:
        next(pb_grpc.MemstoreStub(channel).Follow(request, timeout=5))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "follower stray cannot follow this daemon: their tables differ (optimizer" in info.value.details()


def test_followers_beyond_max_followers_are_refused(tables, serve) -> None:
    primary_path, _ = tables
    primary = serve(primary_path, server=ServerConfig(max_followers=1))
    request = pb.FollowRequest(manifest_json=MANIFEST.to_json(), heartbeat_s=0.05)
    with grpc.insecure_channel(primary.address) as channel:
        stub = pb_grpc.MemstoreStub(channel)
        first = stub.Follow(request)
        assert list(next(first).records) == []  # a heartbeat: the stream holds the only slot
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Follow(request, timeout=5))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-followers" in info.value.details()
        first.cancel()
        _wait_until(lambda: _describe(primary.address).replication.followers == 0)
        assert list(next(stub.Follow(request, timeout=5)).records) == []  # the slot was released


def test_a_replica_keeps_serving_while_its_primary_is_down_and_catches_up_after(tables, serve) -> None:
    primary_path, replica_path = tables
    # The primary restarts at its own Unix socket: a TCP port freed by its stop could be taken meanwhile.
    listen = f"unix:{primary_path.parent / 'primary.sock'}"
    primary = serve(primary_path, listen=listen)
    replica = serve(replica_path, primary=primary.address)
    _push(primary.live, 1, 5)
    _wait_until(lambda: replica.live.version == 5)
    primary.stop()
    _wait_until(lambda: "unreachable" in replica.follower.status().problem)
    _wait_until(lambda: replica.follower.status().seconds_since_contact > 0.3)  # down a while, no contact
    status = replica.follower.status()
    assert status.serving and "unreachable" in status.problem and status.applied_version == 5
    assert _lookup_status(replica.address) == (grpc.StatusCode.OK, "")  # still serving version 5
    restarted = serve(primary_path, listen=listen)
    _push(restarted.live, 6, 10)
    _wait_until(lambda: replica.live.version == 10)  # reconnected with backoff, and caught up
    assert replica.follower.status().problem == ""
    assert _contents(replica_path, replica.live) == _contents(primary_path, restarted.live)


def test_a_silent_primary_is_presumed_dead_and_followed_again_once_it_speaks(tables, serve) -> None:
    primary_path, replica_path = tables
    process, address = start_daemon(primary_path, ["--durability", "os"])
    try:
        # A Describe deadline beyond the test's: stop() can only return in time by hanging up.
        quiet = replace(QUICK, silence_s=0.5, describe_timeout_s=600.0)
        replica = serve(replica_path, primary=address, follow=quiet)
        _wait_until(lambda: replica.follower.status().seconds_since_contact is not None)
        process.send_signal(signal.SIGSTOP)  # a hung host: the connection stays open, nothing arrives
        _wait_until(lambda: "presumed dead" in replica.follower.status().problem)
        assert replica.follower.status().serving  # still serving its last version
        process.send_signal(signal.SIGCONT)
        with MemstoreClient(address, FAST_FAIL) as trainer:
            trainer.push(*_push_args(1))
        _wait_until(lambda: replica.live.version == 1)
        process.send_signal(signal.SIGSTOP)
        _wait_until(lambda: "presumed dead" in replica.follower.status().problem)
        # Past the backoff: connected again (the dead stream's connection was dropped before the
        # problem was set), its Describe hanging on the stopped primary.
        _wait_until(lambda: replica.follower._connection is not None)
        stopper = threading.Thread(target=replica.follower.stop)
        stopper.start()
        # Hung up on the Describe at once: without that, stop() waits until gRPC gives up connecting
        # to the stopped primary (its 20 s connect timeout), or the 600 s Describe deadline.
        join_all([stopper], timeout_s=10.0)
        assert "presumed dead" in replica.follower.status().problem  # the Describe never answered
    finally:
        process.kill()  # after SIGSTOP/SIGCONT a daemon may see SIGTERM only once its log interval ends
        process.wait(timeout=60)


def test_a_killed_replica_restarts_and_catches_up_while_pushes_go_on(tables, serve) -> None:
    primary_path, replica_path = tables
    # A one-record feed: the restarted replica catches up from the primary's log.
    primary = serve(primary_path, config=replace(FAST, feed_bytes=1))
    stop = threading.Event()
    pushed = [0]

    def keep_pushing() -> None:
        with MemstoreClient(primary.address, FAST_FAIL) as trainer:
            while not stop.is_set() and pushed[0] < 2000:
                trainer.push(*_push_args(pushed[0] + 1))
                pushed[0] += 1
                time.sleep(0.002)

    pusher = threading.Thread(target=keep_pushing)
    pusher.start()
    args = ["--follow", primary.address, "--durability", "os"]
    replica, address = start_daemon(replica_path, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until(lambda: _describe(address).version >= 20)
        replica.send_signal(signal.SIGKILL)
        replica.wait(timeout=60)
        at_kill = pushed[0]
        _wait_until(lambda: pushed[0] >= at_kill + 20)  # pushes go on without it
        replica, address = start_daemon(replica_path, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(lambda: _describe(address).version >= pushed[0] > 0)
        stop.set()
        join_all([pusher])
        _wait_until(lambda: _describe(address).version == primary.live.version)
        assert _describe(address).replication.serving
    finally:
        stop.set()
        join_all([pusher])
        assert stop_daemon(replica) == 0
    assert _contents(replica_path) == _contents(primary_path, primary.live)


def test_a_stopping_primary_ends_follow_streams_at_once(tables) -> None:
    primary_path, _ = tables
    # A grace beyond the test's deadlines: the daemon exits in time only if the stream ends at once.
    process, address = start_daemon(primary_path, ["--grace-s", "600", "--durability", "os"])
    try:
        with grpc.insecure_channel(address) as channel:
            request = pb.FollowRequest(manifest_json=MANIFEST.to_json(), heartbeat_s=0.05)
            stream = pb_grpc.MemstoreStub(channel).Follow(request)
            next(stream)  # streaming
            process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(timeout=60) == 0  # not the 600 s grace: the stream did not hold the drain
    finally:
        stop_daemon(process)


def test_a_follow_request_with_a_costly_layout_is_refused_without_building_it(tables, serve) -> None:
    """A few hundred bytes naming 25,000 heads used to make the primary search primes for seconds
    (blocking lookups) before comparing anything; the raw fields are compared first now."""
    primary_path, _ = tables
    primary = serve(primary_path)
    data = json.loads(MANIFEST.to_json())
    # 25,000 heads per n-gram of 10^12 rows on four layers: building it takes the daemon ~15 s of CPU.
    data["layout"] = {**data["layout"], "heads_per_ngram": 25_000, "layer_ids": [1, 4, 7, 10]}
    data["layout"]["vocab_size_per_ngram"] = [10**12] * len(data["layout"]["vocab_size_per_ngram"])
    del data["layout"]["primes"]  # the daemon would derive them: the costly part
    request = pb.FollowRequest(manifest_json=json.dumps(data), follower_id="costly")
    with grpc.insecure_channel(primary.address) as channel, pytest.raises(grpc.RpcError) as info:
        # A deadline well inside the prime search's cost: building the layout first misses it.
        next(pb_grpc.MemstoreStub(channel).Follow(request, timeout=5))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "follower costly cannot follow this daemon: their tables differ (layout" in info.value.details()


@pytest.mark.parametrize(
    ("manifest_json", "said"),
    [
        ("not json", "sent a manifest that is not JSON"),
        ("[" * 100_000, "not JSON"),
        (" " * (1 << 20) + "{}", "bytes, over"),
    ],
    ids=["garbage", "deeply-nested", "oversized"],
)
def test_a_malformed_follow_manifest_is_the_callers_error(tables, serve, manifest_json: str, said: str) -> None:
    """A malformed manifest in a Follow request was answered FAILED_PRECONDITION "manifest is
    malformed", as if this daemon's table were damaged; it is the caller's INVALID_ARGUMENT."""
    primary_path, _ = tables
    primary = serve(primary_path)
    request = pb.FollowRequest(manifest_json=manifest_json, follower_id="odd")
    with grpc.insecure_channel(primary.address) as channel, pytest.raises(grpc.RpcError) as info:
        next(pb_grpc.MemstoreStub(channel).Follow(request, timeout=5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "follower odd" in info.value.details() and said in info.value.details()
