"""Leader election, fencing and automatic failover (memstore.election): a real etcd, real `memstore serve
--etcd --failover` daemons, ClusterClient.discover; primaries killed with SIGKILL or stopped with SIGSTOP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client import ClusterClient, MemstoreClient
from memstore.cli import _parser as memstore_parser
from memstore.cli_serve import daemon_config
from memstore.election import LeaderState, ShardElection
from memstore.errors import InvalidArgumentError, MemstoreError, UnavailableError
from memstore.etcd import EtcdClient
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveTable
from memstore.membership import LeaderRecord, MembershipConfig, acked_key, epoch_key, leader_key, version_bytes
from memstore.replica import Follower
from memstore.wire import memstore_pb2 as pb
from tests.etcd_server import EtcdServer
from tests.helpers import DEADLINE_S, FAST_FAIL, SMALL_LAYOUT, wait_until
from tests.test_reseed import _table_bytes
from tests.test_sync_replication import FAST, LAYERS, _expected, _push_args, _zero_table

CLUSTER = "failover"
TTL_S = 2  # etcd's shortest useful lease: a killed leader is replaced within seconds
WAIT_S = 60.0
# Trainers retry a push (same step id) until the failover is over: a deadline well past TTL + election.
TRAINER = replace(FAST_FAIL, max_attempts=5, timeout_s=WAIT_S, same_host=False)
ONCE = replace(FAST_FAIL, max_attempts=1, timeout_s=DEADLINE_S, same_host=False)
SYNC = ["--sync-replicas", "1", "--sync-timeout-s", "30"]


def test_failover_flags_are_checked() -> None:
    serve = memstore_parser()
    with pytest.raises(InvalidArgumentError, match="--failover need --etcd"):
        daemon_config(serve.parse_args(["serve", "t", "--failover"]))
    with pytest.raises(InvalidArgumentError, match="--sync-replicas is for a primary"):  # it would never apply
        daemon_config(serve.parse_args(["serve", "t", "--follow", "p:1", "--sync-replicas", "1"]))
    replica = ["serve", "t", "--follow", "p:1", "--sync-replicas", "1", "--etcd", "e:1", "--cluster-name", "c"]
    assert daemon_config(serve.parse_args([*replica, "--failover"])).live.sync.replicas == 1  # once promoted
    assert LeaderRecord.decode(LeaderRecord("h:1", 3).encode()) == LeaderRecord("h:1", 3)
    assert version_bytes(9) < version_bytes(10)  # etcd compares bytes: the padding makes that numeric


class _Shard:
    """Shard 0's daemons (`memstore serve --etcd --failover` children) by address; killed afterwards."""

    def __init__(self, etcd: EtcdServer, tmp_path: Path) -> None:
        self.etcd, self.tmp_path = etcd, tmp_path
        self.processes: dict[str, subprocess.Popen] = {}
        self.tables: dict[str, Path] = {}

    def start(self, name: str, *extra: str) -> str:
        return self.serve(_zero_table(self.tmp_path / name), *extra)

    def serve(self, table: Path, *extra: str) -> str:
        flags = ["--no-same-host", "--durability", "os", "--etcd", self.etcd.endpoint, "--cluster-name", CLUSTER]
        flags += ["--etcd-ttl-s", str(TTL_S), "--failover", *SYNC]
        process, address = start_daemon(table, [*flags, *extra])
        self.processes[address] = process
        self.tables[address] = table
        return address

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a stopped one cannot take SIGTERM
            stop_daemon(process)


@pytest.fixture
def shard(etcd: EtcdServer, tmp_path: Path) -> Iterator[_Shard]:
    daemons = _Shard(etcd, tmp_path)
    try:
        yield daemons
    finally:
        daemons.stop()


def _leader(etcd_store: EtcdClient) -> LeaderRecord | None:
    kv = etcd_store.get(leader_key(CLUSTER, 0))
    return None if kv is None else LeaderRecord.decode(kv.value)


def _push(client: ClusterClient | MemstoreClient, step: int) -> None:
    layer, ids, grads = _push_args(step)
    client.push(layer, ids, grads, step_id=step)


def _check_rows(address: str, steps: list[int]) -> None:
    """The daemon's table holds exactly the pushes of `steps`, each once (zero-initialised SGD, integer gradients)."""
    expected = _expected(steps)
    with MemstoreClient(address, ONCE) as client:
        for layer in LAYERS:
            rows = client.lookup(layer, np.arange(SMALL_LAYOUT.num_rows(layer)))
            np.testing.assert_array_equal(rows, expected[layer])


def test_the_first_primary_leads_at_epoch_1_and_replicas_follow_it(shard, etcd_store) -> None:
    primary = shard.start("p")
    replica = shard.start("r", "--follow", primary)
    assert _leader(etcd_store) == LeaderRecord(primary, 1)  # elected before it served its first push
    assert etcd_store.get(epoch_key(CLUSTER, 0)).value == b"1"
    with MemstoreClient(replica, ONCE) as client, pytest.raises(MemstoreError, match="read replica"):
        _push(client, 1)
    with MemstoreClient(primary, ONCE) as client:
        _push(client, 1)
        described = client._describe(None).replication
        assert (described.epoch, described.election_state) == (1, "leader")
    wait_until(lambda: MemstoreClient(replica, ONCE).version() == 1, "the replica applied the push", WAIT_S)
    with MemstoreClient(replica, ONCE) as client:
        described = client._describe(None).replication
        assert (described.epoch, described.election_state) == (1, "follower")


def test_training_goes_on_through_two_kills_of_the_primary_and_loses_no_acknowledged_push(
    shard, etcd, etcd_store
) -> None:
    first = shard.start("p")
    for name in ("r1", "r2"):
        shard.start(name, "--follow", first)
    acked: list[int] = []
    failures: list[BaseException] = []
    done = threading.Event()
    with ClusterClient.discover(etcd.endpoint, CLUSTER, TRAINER) as cluster:

        def train() -> None:  # pushes back to back: a kill lands while one is in flight
            step = 0
            while not done.is_set():
                step += 1
                try:
                    _push(cluster, step)  # retried (same step id) through the failover by the client itself
                except MemstoreError as exc:
                    failures.append(exc)
                    return
                acked.append(step)

        def read() -> None:  # reads never fail: the replicas serve while the primary is replaced
            layer, ids, _ = _push_args(0)
            while not done.is_set():
                try:
                    cluster.lookup(layer, ids)
                except MemstoreError as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=train), threading.Thread(target=read)]
        for thread in threads:
            thread.start()
        try:
            for kill in range(2):
                base = len(acked)
                wait_until(lambda: len(acked) >= base + 8 or failures, "pushes acknowledged", WAIT_S)
                leader = _leader(etcd_store)
                assert leader is not None and leader.epoch == kill + 1
                shard.processes[leader.address].kill()  # mid-run: a push is in flight or about to be
                shard.processes[leader.address].wait()
                at_kill = len(acked)
                wait_until(lambda: len(acked) >= at_kill + 8 or failures, "training went on", WAIT_S)
                new = _leader(etcd_store)
                assert new is not None and new.address != leader.address and new.epoch == kill + 2
                if kill == 0:  # an operator replaces the lost daemon: a new replica of the new leader
                    shard.start("r3", "--follow", new.address)
        finally:
            done.set()
            for thread in threads:
                thread.join()
    assert failures == []
    assert acked == list(range(1, len(acked) + 1))
    _check_rows(_leader(etcd_store).address, acked)  # every acknowledged push, each exactly once


def _replication(address: str) -> pb.Replication:
    with MemstoreClient(address, ONCE) as client:
        return client._describe(None).replication


def _rejoined(address: str) -> bool:
    """Whether the daemon at `address` serves again, as a replica following the shard's leader."""
    try:
        described = _replication(address)
    except MemstoreError:  # between its sessions: the port is closed
        return False
    return described.role == pb.REPLICATION_ROLE_REPLICA and described.election_state == "follower"


def _refuse_until_rejoined(address: str) -> list[str]:
    """Push to the deposed daemon until it has rejoined as a replica: every push is refused; the refusals."""
    refusals: list[str] = []

    def rejoined() -> bool:
        with MemstoreClient(address, ONCE) as client, pytest.raises(MemstoreError) as refused:
            _push(client, 1000 + len(refusals))  # never taken: a step no trainer sends
        refusals.append(str(refused.value))
        return _rejoined(address)

    wait_until(rejoined, "the deposed primary rejoined as a replica by itself", WAIT_S)
    return refusals


def _caught_up(shard: _Shard, old: str, leader: str) -> None:
    """`old` holds what `leader` holds, byte for byte: rows, optimizer state, checksums, manifest."""
    with MemstoreClient(leader, ONCE) as client:
        version = client.version()
    wait_until(lambda: MemstoreClient(old, ONCE).version() == version, "the rejoined replica caught up", WAIT_S)
    assert _table_bytes(shard.tables[old]) == _table_bytes(shard.tables[leader])


def test_a_partitioned_primary_refuses_pushes_then_rejoins_as_a_replica_by_itself(shard, etcd, etcd_store) -> None:
    old = shard.start("p")
    replica = shard.start("r", "--follow", old)
    with ClusterClient.discover(etcd.endpoint, CLUSTER, TRAINER) as cluster:
        for step in (1, 2):
            _push(cluster, step)
        os.kill(shard.processes[old].pid, signal.SIGSTOP)  # partitioned: its lease expires
        wait_until(lambda: _leader(etcd_store) == LeaderRecord(replica, 2), "the replica was elected", WAIT_S)
        os.kill(shard.processes[old].pid, signal.SIGCONT)
        refusals = _refuse_until_rejoined(old)
        assert any(re.search("no longer the leader of shard 0|could not renew its etcd lease", r) for r in refusals)
        assert shard.processes[old].poll() is None  # the same process, on the same port
        with MemstoreClient(replica, ONCE) as client:  # promoted: Describe says so
            described = client._describe(None).replication
            assert client.trainable and described.role != pb.REPLICATION_ROLE_REPLICA
            assert (described.epoch, described.election_state) == (2, "leader")
        for step in (3, 4):  # --sync-replicas 1: acknowledged once the rejoined replica holds them
            _push(cluster, step)
        _caught_up(shard, old, replica)
        _check_rows(old, [1, 2, 3, 4])  # nothing of the refused pushes
    shard.processes[replica].kill()  # it takes part in elections again: a later failover promotes it
    wait_until(lambda: _leader(etcd_store) == LeaderRecord(old, 3), "the rejoined replica was elected", WAIT_S)
    assert _replication(old).election_state == "leader"


def test_a_deposed_primary_holding_a_push_no_replica_has_is_reseeded_as_it_rejoins(shard, etcd, etcd_store) -> None:
    old = shard.start("p")
    replica = shard.start("r", "--follow", old)
    with MemstoreClient(old, ONCE) as client:
        for step in (1, 2):
            _push(client, step)
    wait_until(lambda: MemstoreClient(replica, ONCE).version() == 2, "the replica applied the pushes", WAIT_S)
    shard.processes[replica].kill()  # not SIGSTOP: records already in its socket would land on SIGCONT
    shard.processes[replica].wait()
    orphan_failed: list[BaseException] = []

    def orphan() -> None:  # applied and logged on the primary, never acknowledged: no replica holds it
        try:
            with MemstoreClient(old, ONCE) as client:
                _push(client, 3)
        except MemstoreError as exc:
            orphan_failed.append(exc)

    pusher = threading.Thread(target=orphan)
    pusher.start()
    try:
        wait_until(lambda: MemstoreClient(old, ONCE).version() == 3, "the primary applied the orphan push", WAIT_S)
        os.kill(shard.processes[old].pid, signal.SIGSTOP)  # partitioned: its lease expires
        replica = shard.serve(shard.tables[replica], "--follow", old)  # at version 2, as before
        wait_until(lambda: _leader(etcd_store) == LeaderRecord(replica, 2), "the replica was elected", WAIT_S)
        os.kill(shard.processes[old].pid, signal.SIGCONT)
    finally:
        os.kill(shard.processes[old].pid, signal.SIGCONT)
        pusher.join()
    assert len(orphan_failed) == 1  # never acknowledged
    with ClusterClient.discover(etcd.endpoint, CLUSTER, TRAINER) as cluster:
        _refuse_until_rejoined(old)
        for step in (4, 5):  # its version 3 is not the new leader's: it can only have re-seeded
            _push(cluster, step)
    _caught_up(shard, old, replica)
    _check_rows(old, [1, 2, 4, 5])  # the orphan push is gone: the table is the leader's


def test_a_killed_primary_restarted_as_a_primary_rejoins_as_the_new_leaders_replica(shard, etcd, etcd_store) -> None:
    old = shard.start("p")
    replica = shard.start("r", "--follow", old)
    with MemstoreClient(old, ONCE) as client:
        for step in (1, 2):
            _push(client, step)
    shard.processes[old].kill()
    shard.processes[old].wait()
    wait_until(lambda: _leader(etcd_store) == LeaderRecord(replica, 2), "the replica was elected", WAIT_S)
    restarted = shard.serve(shard.tables[old])  # as it was started first: no --follow
    wait_until(lambda: _rejoined(restarted), "the restarted primary rejoined as a replica by itself", WAIT_S)
    with ClusterClient.discover(etcd.endpoint, CLUSTER, TRAINER) as cluster:
        _push(cluster, 3)  # --sync-replicas 1: acknowledged once the rejoined replica holds it
    _caught_up(shard, restarted, replica)
    _check_rows(restarted, [1, 2, 3])


def test_serving_goes_on_while_etcd_restarts_and_elections_resume(shard, etcd, etcd_store) -> None:
    primary = shard.start("p")
    replicas = {shard.start(name, "--follow", primary) for name in ("r1", "r2")}  # one left, for --sync-replicas 1
    with ClusterClient.discover(etcd.endpoint, CLUSTER, TRAINER) as cluster:
        _push(cluster, 1)
        etcd.stop()
        layer, ids, _ = _push_args(0)
        cluster.lookup(layer, ids)  # reads need no etcd
        etcd.start()
        for step in (2, 3):  # pushes wait for etcd (the acknowledged version goes there first), then go on
            _push(cluster, step)
        assert _leader(etcd_store) == LeaderRecord(primary, 1)  # the lease outlived the restart: no election
        shard.processes[primary].kill()  # elections resume with etcd back
        _push(cluster, 4)
        new = _leader(etcd_store)
        assert new is not None and new.address in replicas and new.epoch == 2
    _check_rows(new.address, [1, 2, 3, 4])


# -- the election in-process: a LiveTable, its ShardElection, the test's etcd ---------------------------


def _membership(etcd: EtcdServer) -> MembershipConfig:
    return MembershipConfig((etcd.endpoint,), CLUSTER, ttl_s=TTL_S, election=True)


def test_a_replica_missing_an_acknowledged_version_is_not_elected(etcd, etcd_store, tmp_path) -> None:
    etcd_store.put(acked_key(CLUSTER, 0), version_bytes(1))  # a lost leader acknowledged version 1
    with LiveTable.open(_zero_table(tmp_path / "r"), config=FAST, primary="127.0.0.1:1") as live:
        election = ShardElection(_membership(etcd), live, Follower(live), "127.0.0.1:2", 0)
        try:
            for _ in range(3):  # follower -> candidate (frozen at version 0) -> the transaction, refused
                election._tick()
            assert election.state is LeaderState.CANDIDATE and "below the acknowledged 1" in election.reason
            assert _leader(etcd_store) is None and live.primary is not None  # still a replica, not promoted
            with pytest.raises(MemstoreError, match="read replica"):
                live.push(*_push_args(1), step_id=1)
            etcd_store.put(acked_key(CLUSTER, 0), version_bytes(0))  # nothing acknowledged: it may lead
            election._tick()
            assert election.state is LeaderState.LEADER and _leader(etcd_store) == LeaderRecord("127.0.0.1:2", 1)
            live.push(*_push_args(1), step_id=1)  # promoted: it takes pushes
            assert live.version == 1 and live.epoch == 1
        finally:
            election.stop()


def test_a_leader_whose_lease_expired_commits_nothing(etcd, etcd_store, tmp_path) -> None:
    with LiveTable.open(_zero_table(tmp_path / "p"), config=FAST) as live:
        election = ShardElection(_membership(etcd), live, None, "127.0.0.1:3", 0)
        try:
            election._tick()
            assert election.state is LeaderState.LEADER
            live.push(*_push_args(1), step_id=1)
            etcd_store.revoke(etcd_store.get(leader_key(CLUSTER, 0)).lease)  # as etcd does when the lease expires
            election._tick()
            assert election.state is LeaderState.DEPOSED
            with pytest.raises(UnavailableError, match="no longer the leader of shard 0.*must rejoin as a replica"):
                live.push(*_push_args(2), step_id=2)
            assert live.version == 1  # nothing logged, applied or shown to readers
        finally:
            election.stop()
