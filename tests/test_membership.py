"""Membership in etcd and discovery: real `memstore serve --etcd` daemons, a real etcd, ClusterClient.discover."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client import ClusterClient, MemstoreClient
from client.cluster import add_connection_arguments, connect
from memstore.cli import _parser as memstore_parser
from memstore.cli_serve import daemon_config
from memstore.create import create_sharded, create_table
from memstore.errors import InvalidArgumentError, UnavailableError
from memstore.etcd import EtcdClient
from memstore.launch import start_daemon, stop_daemon
from memstore.membership import MemberRecord, MembershipConfig, Role, member_key, members_prefix
from memstore.metrics import summarize
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import shard_dirs
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from tests.etcd_server import EtcdServer
from tests.helpers import FAST_FAIL, SMALL_LAYOUT, wait_until

GRPC = replace(FAST_FAIL, same_host=False)
MANIFEST = Manifest(layout=SMALL_LAYOUT, seed=5, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.5))
CLUSTER = "engram"
TTL_S = 2  # etcd's shortest lease: a killed daemon leaves within seconds
WAIT_S = 30.0


class _Daemons:
    """`memstore serve --etcd` children registering in the test's etcd; killed or stopped afterwards."""

    def __init__(self, etcd: EtcdServer) -> None:
        self.etcd = etcd
        self.processes: list[subprocess.Popen] = []

    def start(self, path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
        flags = ["--no-same-host", "--etcd", self.etcd.endpoint, "--cluster-name", CLUSTER, "--etcd-ttl-s", str(TTL_S)]
        process, address = start_daemon(path, [*flags, *extra])
        self.processes.append(process)
        return process, address

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_daemon(process)


@pytest.fixture
def daemons(etcd: EtcdServer) -> Iterator[_Daemons]:
    started = _Daemons(etcd)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """A trainable table in 2 shards, twice (an identical create): the primaries' and the replicas' copies."""
    for name in ("primary", "replica"):
        create_sharded(tmp_path / name, MANIFEST, num_shards=2, num_partitions=4)
    return shard_dirs(tmp_path / "primary"), shard_dirs(tmp_path / "replica")


def _members(etcd_store: EtcdClient) -> dict[str, MemberRecord]:
    return {
        r.address: r
        for r in (MemberRecord.decode(kv.value) for kv in etcd_store.get_prefix(members_prefix(CLUSTER))[0])
    }


def _lookups_served(address: str) -> float:
    with MemstoreClient(address, GRPC) as client:
        methods = summarize(client.stats()).methods
    return sum(methods[name].calls for name in ("Lookup", "DataPlaneLookup") if name in methods)


def _ids(count: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, SMALL_LAYOUT.num_rows(1), count)


def test_membership_flags_are_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="cluster name"):
        MembershipConfig(endpoints=("127.0.0.1:2379",), cluster="a/b")
    with pytest.raises(InvalidArgumentError, match="refresh period"):
        MembershipConfig(endpoints=("127.0.0.1:2379",), cluster="a", ttl_s=2, refresh_s=5)
    record = MemberRecord("h:1", 0, 2, Role.REPLICA, 7, 1, "ab", primary="h:2")
    assert MemberRecord.decode(record.encode()) == record
    newer = record.encode().replace(b"{", b'{"added_later": 1, ', 1)  # a newer daemon's record still reads
    assert MemberRecord.decode(newer) == record
    with pytest.raises(InvalidArgumentError, match="not a member record"):
        MemberRecord.decode(b'{"address": "h:1"}')


def test_connection_and_serve_flags_go_in_pairs() -> None:
    parser = argparse.ArgumentParser()
    add_connection_arguments(parser)
    with pytest.raises(InvalidArgumentError, match="--etcd and --cluster-name go together"):
        connect(parser.parse_args(["--etcd", "127.0.0.1:2379"]))
    serve = memstore_parser()
    with pytest.raises(InvalidArgumentError, match="need --etcd"):
        daemon_config(serve.parse_args(["serve", "t", "--cluster-name", "engram"]))
    with pytest.raises(InvalidArgumentError, match="--etcd needs --cluster-name"):
        daemon_config(serve.parse_args(["serve", "t", "--etcd", "127.0.0.1:2379"]))


def test_a_daemon_registers_updates_its_record_and_leaves_on_a_clean_stop(daemons, etcd_store, tmp_path) -> None:
    table = create_table(tmp_path / "t", MANIFEST)
    process, address = daemons.start(table)
    wait_until(lambda: address in _members(etcd_store), "the daemon registered", WAIT_S)  # at once, unless etcd is slow
    record = _members(etcd_store)[address]
    assert (record.shard, record.num_shards, record.role, record.version, record.lag) == (0, 1, Role.PRIMARY, 0, 0)
    assert record.trainable and record.fingerprint == MANIFEST.fingerprint
    with MemstoreClient(address, GRPC) as client:
        client.push(1, np.array([1, 2]), np.ones((2, SMALL_LAYOUT.dim), np.float32))
    wait_until(lambda: _members(etcd_store)[address].version == 1, "the record shows the push", WAIT_S)
    assert stop_daemon(process) == 0
    assert etcd_store.get(member_key(CLUSTER, 0, address)) is None  # revoked on the way out, not left to expire


def test_a_killed_daemon_leaves_when_its_lease_expires(daemons, etcd_store, tmp_path) -> None:
    process, address = daemons.start(create_table(tmp_path / "t", MANIFEST))
    wait_until(lambda: address in _members(etcd_store), "the daemon registered", WAIT_S)
    process.kill()
    process.wait(timeout=WAIT_S)
    wait_until(lambda: address not in _members(etcd_store), "the killed daemon's key expired", WAIT_S)


def test_discovery_follows_daemons_joining_and_a_killed_replica_leaving(daemons, etcd, etcd_store, sharded) -> None:
    primaries, replicas = sharded
    _, p0 = daemons.start(primaries[0])
    p1_process, p1 = daemons.start(primaries[1])
    r0_process, r0 = daemons.start(replicas[0], "--follow", p0)
    wait_until(lambda: {p0, p1, r0} <= set(_members(etcd_store)), "the daemons registered", WAIT_S)
    record = _members(etcd_store)[r0]
    assert (record.role, record.shard, record.primary) == (Role.REPLICA, 0, p0)
    ids = _ids()
    with ClusterClient.discover(etcd.endpoint, CLUSTER, GRPC, expected_fingerprint=MANIFEST.fingerprint) as cluster:
        assert [(s.primary, s.replicas) for s in cluster.spec.shards] == [(p0, (r0,)), (p1, ())]
        before = cluster.lookup(1, ids).clone()
        cluster.push(1, ids, np.ones((len(ids), SMALL_LAYOUT.dim), np.float32), step_id=1)
        # Replication is asynchronous: read back once the replica (which takes a share of the reads) has it.
        wait_until(lambda: _members(etcd_store)[r0].version == 1, "the replica applied the push", WAIT_S)
        after = cluster.lookup(1, ids).clone()
        assert not np.array_equal(after.numpy(), before.numpy())  # read back through the shards

        _, r1 = daemons.start(replicas[1], "--follow", p1)  # joins: used without reconnecting
        wait_until(lambda: cluster.spec.shards[1].replicas == (r1,), "the client saw the new replica", WAIT_S)

        def r1_serves() -> bool:
            cluster.lookup(1, ids)
            return _lookups_served(r1) > 0

        wait_until(r1_serves, "lookups reached the new replica", WAIT_S)

        r0_process.kill()  # leaves once its lease expires; reads go on meanwhile
        r0_process.wait(timeout=WAIT_S)

        def r0_dropped() -> bool:
            cluster.lookup(1, ids)
            return cluster.spec.shards[0].addresses == (p0,)

        wait_until(r0_dropped, "the client dropped the killed replica", WAIT_S)
        served = _lookups_served(p0)
        for _ in range(5):
            cluster.lookup(1, ids)
        assert _lookups_served(p0) > served  # shard 0's reads now all go to its primary

        wait_until(lambda: _members(etcd_store)[r1].version == 1, "the new replica caught up", WAIT_S)
        stop_daemon(p1_process)  # a clean stop: its key goes at once
        wait_until(lambda: cluster.spec.shards[1].primary is None, "the client saw shard 1 lose its primary", WAIT_S)
        assert np.array_equal(cluster.lookup(1, ids).numpy(), after.numpy())  # shard 1 read from its replica
        with pytest.raises(UnavailableError, match="shard 1 has no primary registered"):
            cluster.push(1, ids, np.ones((len(ids), SMALL_LAYOUT.dim), np.float32), step_id=2)


def test_serving_goes_on_while_etcd_restarts_and_registration_comes_back(daemons, etcd, etcd_store, tmp_path) -> None:
    _, address = daemons.start(create_table(tmp_path / "t", MANIFEST))
    ids, grads = _ids(), np.ones((64, SMALL_LAYOUT.dim), np.float32)
    with ClusterClient.discover(etcd.endpoint, CLUSTER, GRPC) as cluster:
        etcd.stop()
        for step in range(1, 4):  # etcd is down: reads and pushes do not need it
            cluster.push(1, ids, grads, step_id=step)
            cluster.lookup(1, ids)
        etcd.start()  # the same etcd back: the registration was kept, the client's watch resumes
        wait_until(lambda: _members(etcd_store).get(address, None) is not None, "the member key is back", WAIT_S)
        _, second = daemons.start(create_table(tmp_path / "other", MANIFEST))  # a second primary registers
        wait_until(lambda: cluster.spec.shards[0].primary == second, "the client followed after the restart", WAIT_S)

        etcd.stop()  # now an etcd that lost everything: each daemon registers anew
        shutil.rmtree(etcd.data_dir)
        etcd.start()
        wait_until(lambda: set(_members(etcd_store)) == {address, second}, "both daemons registered anew", WAIT_S)
        # The new etcd's revisions start again below where the client's watch was: it must list anew.
        _, third = daemons.start(create_table(tmp_path / "third", MANIFEST))
        wait_until(lambda: cluster.spec.shards[0].primary == third, "the client followed the new etcd", WAIT_S)
        cluster.lookup(1, ids)


def test_a_daemon_started_while_etcd_is_down_serves_and_registers_once_it_is_up(
    daemons, etcd, etcd_store, tmp_path
) -> None:
    etcd.stop()
    _, address = daemons.start(create_table(tmp_path / "t", MANIFEST))  # starts: etcd is not needed to serve
    with MemstoreClient(address, GRPC) as client:
        assert client.version() == 0
    etcd.start()
    wait_until(lambda: address in _members(etcd_store), "the daemon registered once etcd was up", WAIT_S)
