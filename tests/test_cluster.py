"""ClusterClient against real daemons on loopback: routing, replicas, failover, training, refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_health.v1 import health, health_pb2

from client import ClusterClient, ClusterSpec, LoadBalancing, MemstoreClient, Prefetcher
from client.cluster_spec import ShardAddresses
from memstore.create import create_sharded, create_table
from memstore.errors import InvalidArgumentError, LayoutMismatchError, UnavailableError
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveTable
from memstore.metrics import DaemonMetrics, summarize
from memstore.service import SERVICE_NAME, create_server
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import shard_dirs
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from tests.helpers import DEADLINE_S, FAST_FAIL, SMALL_LAYOUT, join_all

GRPC = replace(FAST_FAIL, same_host=False)
ADAM = OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.05)


def _random_ids(layer_id: int, count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SMALL_LAYOUT.num_rows(layer_id), count)


@pytest.fixture(scope="module")
def sharded_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a plain table, the same table in 3 shards with 8 partitions)."""
    root = tmp_path_factory.mktemp("cluster")
    manifest = Manifest(layout=SMALL_LAYOUT, seed=3)
    create_sharded(root / "sharded", manifest, num_shards=3, num_partitions=8)
    return create_table(root / "plain", manifest), root / "sharded"


@pytest.fixture
def replicated(daemon_factory, sharded_table: tuple[Path, Path]) -> Iterator[ClusterSpec]:
    """3 shards x 2 in-process daemons (frozen table: both replicas serve the same files)."""
    tables = [Table.open(path) for path in shard_dirs(sharded_table[1]) for _ in range(2)]
    daemons = [daemon_factory(table) for table in tables]
    yield ClusterSpec(tuple(ShardAddresses(daemons[2 * s].address, (daemons[2 * s + 1].address,)) for s in range(3)))
    for table in tables:
        table.close()


@pytest.mark.parametrize(
    ("config", "transport"),
    [
        (replace(GRPC, data_plane=False), "grpc"),
        (replace(GRPC, data_plane=True), "data-plane"),
        (replace(FAST_FAIL, same_host=None), "same-host"),
    ],
    ids=["grpc", "data-plane", "same-host"],
)
def test_lookups_through_three_shards_equal_one_daemon(
    replicated, daemon_factory, sharded_table, config, transport
) -> None:
    plain = daemon_factory(Table.open(sharded_table[0]))
    with ClusterClient(replicated, config) as cluster, MemstoreClient(plain.address, GRPC) as single:
        assert cluster.num_shards == 3
        for layer_id in SMALL_LAYOUT.layer_ids:
            ids = torch.from_numpy(_random_ids(layer_id, 5000, seed=layer_id)).reshape(50, 100)
            assert torch.equal(cluster.lookup(layer_id, ids), single.lookup(layer_id, ids))
            out = torch.empty(50, 100, SMALL_LAYOUT.dim, dtype=torch.float16)
            got, version = cluster.lookup(layer_id, ids, out=out, return_version=True)
            assert got.data_ptr() == out.data_ptr() and torch.equal(out, single.lookup(layer_id, ids))
            assert version == 0
        assert cluster.describe().fingerprint == single.describe().fingerprint
        assert cluster.describe().sharding is None
        assert cluster.lookup(1, np.array([], dtype=np.int64)).shape == (0, SMALL_LAYOUT.dim)
        assert cluster.transport == transport  # every shard's rows came the way the test is named for


def test_bad_ids_fail_like_one_daemon(replicated) -> None:
    with ClusterClient(replicated, GRPC) as cluster:
        with pytest.raises(InvalidArgumentError, match="out of range"):
            cluster.lookup(1, np.array([0, SMALL_LAYOUT.num_rows(1)]))
        with pytest.raises(InvalidArgumentError, match="out of range"):
            cluster.lookup(1, np.array([-1, 2]))
        with pytest.raises(InvalidArgumentError, match="layer"):
            cluster.lookup(9, np.array([0]))


def test_a_shard_refuses_rows_it_does_not_hold(replicated) -> None:
    with MemstoreClient(replicated.shards[0].primary, GRPC) as shard0, ClusterClient(replicated, GRPC) as cluster:
        ids = np.arange(8)  # partitions 0..7: shard 0 holds only some of them
        with pytest.raises(LayoutMismatchError, match="held by shard"):
            shard0.lookup(1, ids)
        assert cluster.lookup(1, ids).shape == (8, SMALL_LAYOUT.dim)


def test_a_cluster_whose_daemons_disagree_is_refused(daemon_factory, sharded_table, tmp_path) -> None:
    shards = shard_dirs(sharded_table[1])
    daemons = [daemon_factory(Table.open(path)) for path in shards]
    other = create_sharded(tmp_path / "other", Manifest(layout=SMALL_LAYOUT, seed=4), num_shards=3, num_partitions=8)
    impostor = daemon_factory(Table.open(other[1]))
    addresses = [d.address for d in daemons]
    swapped = ClusterSpec.from_flags([addresses[1], addresses[0], addresses[2]])
    with pytest.raises(LayoutMismatchError, match="listed as shard 0 of 3 but serves shard 1"):
        ClusterClient(swapped, GRPC)
    mixed = ClusterSpec.from_flags([addresses[0], impostor.address, addresses[2]])
    with pytest.raises(LayoutMismatchError, match="every daemon of a cluster must serve the same table"):
        ClusterClient(mixed, GRPC)
    replica_of_other = ClusterSpec.from_flags([addresses[0], f"{addresses[1]},{impostor.address}", addresses[2]])
    with pytest.raises(LayoutMismatchError):
        ClusterClient(replica_of_other, GRPC)
    with pytest.raises(LayoutMismatchError, match="fingerprint"):
        ClusterClient(ClusterSpec.from_flags(addresses), GRPC, expected_fingerprint="0" * 16)


def test_cluster_spec_parsing(tmp_path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[[shards]]\nprimary = "127.0.0.1:1"\nreplicas = ["127.0.0.1:2"]\n'
        '[[shards]]\nprimary = "localhost:3"\nread_target = "dns:///shard1:50051"\n'
    )
    spec = ClusterSpec.from_file(path)
    assert spec == ClusterSpec.from_flags(["127.0.0.1:1,127.0.0.1:2", "localhost:3"]).__class__(
        (ShardAddresses("127.0.0.1:1", ("127.0.0.1:2",)), ShardAddresses("localhost:3", (), "dns:///shard1:50051"))
    )
    assert spec.shards[0].reads() == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert spec.shards[1].reads() == "dns:///shard1:50051"
    assert ShardAddresses("localhost:5", ("127.0.0.1:6",)).reads() == "ipv4:127.0.0.1:5,127.0.0.1:6"
    path.write_text('[[shards]]\nprimary = "127.0.0.1:1"\nreplica = ["typo:2"]\n')
    with pytest.raises(InvalidArgumentError, match="unknown keys \\['replica'\\]"):
        ClusterSpec.from_file(path)
    with pytest.raises(InvalidArgumentError, match="not a HOST:PORT"):
        ClusterSpec.from_flags(["127.0.0.1"])
    with pytest.raises(InvalidArgumentError, match="twice"):
        ClusterSpec.from_flags(["127.0.0.1:1", "127.0.0.1:1"])


def test_training_through_shards_matches_one_daemon(daemon_factory, tmp_path) -> None:
    """Pushes split by shard (empty parts included) leave every row and Adam state as one table's."""
    manifest = Manifest(layout=SMALL_LAYOUT, seed=1, optimizer=ADAM)
    plain = LiveTable.open(create_table(tmp_path / "plain", manifest))
    shards = [LiveTable.open(p) for p in create_sharded(tmp_path / "sharded", manifest, 2, num_partitions=8)]
    try:
        single = daemon_factory(plain)
        spec = ClusterSpec.from_flags([daemon_factory(live).address for live in shards])
        rng = np.random.default_rng(0)
        with ClusterClient(spec, GRPC) as cluster, MemstoreClient(single.address, GRPC) as one:
            assert cluster.trainable
            for step in range(1, 6):
                ids = rng.integers(0, 40, 64)  # few rows: some steps leave a shard without any
                grads = rng.standard_normal((64, SMALL_LAYOUT.dim)).astype(np.float32)
                ack = cluster.push(1, ids, grads, step_id=step)
                one.push(1, ids, grads, step_id=step)
                assert ack.layer_step == step
            ids = np.arange(SMALL_LAYOUT.num_rows(1))
            assert torch.equal(cluster.lookup(1, ids), one.lookup(1, ids))
            assert cluster.version() == 2 * 5  # each of the 2 shards applied 5 pushes
            assert cluster.push(1, ids[:3], np.ones((3, SMALL_LAYOUT.dim), np.float32), step_id=5).layer_step == 5
            snapshots = cluster.snapshot("after-5")
            assert [version for _, version in snapshots] == [5, 5]
    finally:
        for live in (plain, *shards):
            live.close()


class _Processes:
    """`memstore serve` children, restartable on their own port."""

    def __init__(self) -> None:
        self.processes: list = []
        self.paths: list[Path] = []
        self.addresses: list[str] = []

    def start(self, path: Path, address: str = "127.0.0.1:0") -> str:
        process, address = start_daemon(path, ["--no-same-host", "--listen", address])
        self.processes.append(process)
        self.paths.append(path)
        self.addresses.append(address)
        return address

    def kill(self, index: int) -> None:
        self.processes[index].kill()
        self.processes[index].wait(timeout=60)

    def restart(self, index: int) -> None:
        # Its old port, which the cluster spec names; freed by the kill (see the report on port reuse).
        process, _ = start_daemon(self.paths[index], ["--no-same-host", "--listen", self.addresses[index]])
        self.processes[index] = process

    def lookups_served(self, index: int) -> float:
        """Lookups this daemon process has answered (its own metrics, read over the Stats RPC)."""
        try:
            with MemstoreClient(self.addresses[index], GRPC) as client:
                methods = summarize(client.stats()).methods
        except UnavailableError:  # restarted, and not reached yet (gRPC backs off reconnecting to a port that refused)
            return 0.0
        return sum(methods[name].calls for name in ("Lookup", "DataPlaneLookup") if name in methods)

    def stop(self) -> None:
        for process in self.processes:
            stop_daemon(process)


@pytest.fixture
def processes() -> Iterator[_Processes]:
    started = _Processes()
    yield started
    started.stop()


def test_killing_a_replica_of_each_shard_fails_no_lookup(processes: _Processes, tmp_path) -> None:
    """10k lookups while one replica of each shard is killed, then restarted: none fails, all exact.
    The killed replicas took their share of the reads before, and the restarted ones take it again."""
    manifest = Manifest(layout=SMALL_LAYOUT, seed=5)
    copies = [create_sharded(tmp_path / f"copy{r}", manifest, 2, num_partitions=8) for r in range(2)]
    for shard in range(2):
        for replica in range(2):
            processes.start(copies[replica][shard])
    a = processes.addresses
    spec = ClusterSpec.from_flags([f"{a[0]},{a[1]}", f"{a[2]},{a[3]}"])
    tables = [Table.open(path) for path in copies[0]]
    config = replace(GRPC, timeout_s=10.0, max_attempts=5, attempt_timeout_s=2.0)
    failures: list[BaseException] = []
    done = threading.Event()
    counts = [0] * 4

    def expected(layer_id: int, ids: np.ndarray) -> np.ndarray:
        owner = manifest_sharding.shard_of(ids)
        rows = np.empty((len(ids), SMALL_LAYOUT.dim), np.float16)
        for shard, table in enumerate(tables):
            rows[owner == shard] = table.gather(layer_id, ids[owner == shard])
        return rows

    def read(worker: int) -> None:
        rng = np.random.default_rng(worker)
        with ClusterClient(spec, config) as cluster:
            while not done.is_set():
                layer_id = int(rng.choice(SMALL_LAYOUT.layer_ids))
                ids = rng.integers(0, SMALL_LAYOUT.num_rows(layer_id), 64)
                try:
                    if not np.array_equal(cluster.lookup(layer_id, ids).numpy(), expected(layer_id, ids)):
                        failures.append(AssertionError(f"rows differ for layer {layer_id}"))
                except BaseException as exc:  # counted, then reported by the assertion below
                    failures.append(exc)
                counts[worker] += 1

    manifest_sharding = tables[0].manifest.sharding
    workers = [threading.Thread(target=read, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    try:
        _wait_for(lambda: sum(counts) >= 2000)
        assert processes.lookups_served(1) > 0 and processes.lookups_served(3) > 0  # killing them matters
        processes.kill(1)  # the second replica of each shard
        processes.kill(3)
        at_kill = sum(counts)
        _wait_for(lambda: sum(counts) >= at_kill + 4000)  # lookups go on while they are down
        processes.restart(1)
        processes.restart(3)
        # The cluster's reads reach the restarted replicas again (the count starts afresh in the new process).
        _wait_for(lambda: processes.lookups_served(1) > 0 and processes.lookups_served(3) > 0)
        _wait_for(lambda: sum(counts) >= 10_000)
    finally:
        done.set()
        join_all(workers)
        for table in tables:
            table.close()
    assert not failures, f"{len(failures)} of {sum(counts)} lookups failed, first: {failures[0]!r}"
    for index in (1, 3):  # the restarted replicas serve again, their own shard's rows
        with MemstoreClient(processes.addresses[index], GRPC) as back:
            assert back.describe().sharding.shard == index // 2
            ids = np.flatnonzero(manifest_sharding.shard_of(np.arange(64)) == index // 2)
            assert back.lookup(1, ids).shape == (len(ids), SMALL_LAYOUT.dim)


def _wait_for(condition, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_unreachable_shard_is_an_error_at_connect(tmp_path) -> None:
    with pytest.raises(UnavailableError, match="no daemon of shard 0"):
        ClusterClient(ClusterSpec.from_flags(["127.0.0.1:1"]), replace(GRPC, timeout_s=0.5, max_attempts=1))


@pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])
def test_prefetcher_and_pusher_take_a_cluster(replicated, data_plane: bool) -> None:
    with ClusterClient(replicated, replace(GRPC, data_plane=data_plane)) as cluster:
        ids = {layer: torch.from_numpy(_random_ids(layer, 300)).reshape(3, 100) for layer in SMALL_LAYOUT.layer_ids}
        with Prefetcher(cluster, lambda _: ids, SMALL_LAYOUT.layer_ids) as prefetcher:
            with prefetcher.submit(torch.zeros(3, 100, dtype=torch.long)) as handle:
                for layer in SMALL_LAYOUT.layer_ids:
                    assert torch.equal(handle.rows(layer), cluster.lookup(layer, ids[layer]))


def test_reads_skip_a_replica_whose_health_is_not_serving(sharded_table) -> None:
    """Client-side health checking: a NOT_SERVING replica (a lagging follower says so) gets no reads."""
    tables = [Table.open(shard_dirs(sharded_table[1])[0]) for _ in range(2)]
    healths = [health.HealthServicer() for _ in tables]
    metrics = [DaemonMetrics() for _ in tables]
    servers = [
        create_server(t, "127.0.0.1:0", health_servicer=h, metrics=m) for t, h, m in zip(tables, healths, metrics)
    ]
    try:
        for server, _ in servers:
            server.start()
        for name in ("", SERVICE_NAME):
            healths[1].set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        ids = np.flatnonzero(tables[0].manifest.sharding.shard_of(np.arange(200)) == 0)
        shard = ShardAddresses(*(f"127.0.0.1:{port}" for _, port in servers[:1]), (f"127.0.0.1:{servers[1][1]}",))
        balanced = replace(GRPC, load_balancing=LoadBalancing.ROUND_ROBIN, data_plane=False)  # gRPC's balancing
        with MemstoreClient(shard.reads(), balanced) as reader:
            for _ in range(20):
                reader.lookup(1, ids)
        served = [m.total("memstore_requests_total", method="Lookup") for m in metrics]
        assert served == [20, 0]
        for name in ("", SERVICE_NAME):  # back to SERVING: it takes its share again
            healths[1].set(name, health_pb2.HealthCheckResponse.SERVING)
        with MemstoreClient(shard.reads(), balanced) as reader:
            for _ in range(20):
                reader.lookup(1, ids)
        assert metrics[1].total("memstore_requests_total", method="Lookup") > 0
    finally:
        for server, _ in servers:
            assert server.stop(None).wait(DEADLINE_S)
        for table in tables:
            table.close()
