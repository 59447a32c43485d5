"""Leader election per shard in etcd, fencing of a deposed primary, and automatic failover.

A daemon served with `--etcd` takes part in its shard's election (docs/replication.md, "Automatic
failover"). Every member holds an election lease of `--etcd-ttl-s` seconds, renewed every quarter of
it. The leader is the member whose `LeaderRecord` sits at `leader/<shard>` under its lease; the key
is created, and `epoch/<shard>` incremented, in one etcd transaction that succeeds only while no
leader key exists, the epoch is the one the candidate read, and `acked/<shard>` (the highest version
a leader acknowledged under --sync-replicas) is at most the candidate's version. So every
promotion has its own epoch, and no candidate missing an acknowledged push can win.

States (`LeaderState`): a primary starts as a CANDIDATE and becomes the LEADER (the first one at
epoch 1); a replica is a FOLLOWER of the leader the key names (retargeted when it changes), a
CANDIDATE once the key is gone (it stops following, so its version is frozen, publishes that version
under `candidates/<shard>/`, and campaigns when no other candidate holds more, or when the best one
did not win within two TTLs), and the LEADER when it wins: its table is promoted (`LiveTable.promote`)
and takes pushes. A leader that finds its lease expired, or the key naming another, is DEPOSED for
good: it refuses pushes and must rejoin as a replica. It does so by itself: `on_deposed` tells the
daemon (memstore.daemon), which ends its serving session and serves again, on the same port, as a
replica of the leader `leader_of` finds, re-seeded when its table cannot be followed from (it holds
pushes the leader does not), and takes part in elections again as a FOLLOWER.

Fencing (`fence`, called under the push lock before a push is logged or shown to readers, and before
a Follow stream sends records): only a LEADER whose lease is valid by this host's clock passes. The
lease is valid until the send time of its last successful renewal plus the TTL, less a margin: etcd
expires it no sooner, so a daemon passes the fence only while no other can have been elected.
`gate` (before a push is acknowledged) fences again and, under --sync-replicas, first stores the
push's version in `acked/<shard>` in a transaction that holds only while the leader key is this
daemon's (concurrent pushes share one write).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from memstore.errors import MemstoreError, UnavailableError
from memstore.etcd import EtcdClient, Watch
from memstore.live import LiveTable
from memstore.membership import (
    LeaderRecord,
    MembershipConfig,
    acked_key,
    candidates_prefix,
    epoch_key,
    leader_key,
    version_bytes,
)
from memstore.replica import Follower
from memstore.wire.etcd import rpc_pb2

log = logging.getLogger("memstore.election")

# Share of the TTL kept as a margin against clock-rate differences between this host and etcd's.
_LEASE_MARGIN = 0.1


class LeaderState(enum.Enum):
    """Where a daemon stands in its shard's election."""

    LEADER = "leader"  # holds the leader key: takes pushes and feeds the replicas
    FOLLOWER = "follower"  # a replica following the leader
    CANDIDATE = "candidate"  # no leader known: standing for election
    DEPOSED = "deposed"  # was the leader, lost its lease or key: refuses pushes, must rejoin as a replica


class ShardElection:
    """A daemon's part in its shard's election; installs `fence` and `gate` on `live` (see the module
    docstring). `start` runs it on a thread; `stop` gives the leadership up (the lease is revoked)."""

    def __init__(
        self, config: MembershipConfig, live: LiveTable, follower: Follower | None, address: str, shard: int
    ) -> None:
        self.config, self.live, self.follower, self.address, self.shard = config, live, follower, address, shard
        self.ttl_s = config.ttl_s
        self._etcd = EtcdClient(config.endpoints, timeout_s=max(0.5, min(5.0, config.ttl_s / 3)))
        self._leader_key = leader_key(config.cluster, shard)
        self._epoch_key = epoch_key(config.cluster, shard)
        self._acked_key = acked_key(config.cluster, shard)
        self._candidate_key = candidates_prefix(config.cluster, shard) + address.encode()
        self.state = LeaderState.FOLLOWER if follower is not None else LeaderState.CANDIDATE
        self.epoch = 0  # the highest epoch known
        self.leader: LeaderRecord | None = None  # the last leader seen
        self.reason = ""  # why deposed, or why a campaign failed
        self._lease = 0
        self._lease_until = 0.0  # monotonic: this daemon's lease is surely alive until then
        self._leader_revision = 0  # create revision of our leader key
        self._candidate_since = 0.0
        self._sync = live.config.sync.enabled
        self._wanted = 0  # the highest version a push asked to publish as acknowledged
        self._published = 0
        self._publish_lock = threading.Lock()
        self._lock = threading.Lock()
        self._failing = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._thread = threading.Thread(target=self._run, name="etcd-election", daemon=True)
        self.on_change: Callable[[], None] | None = None  # called after a promotion or deposition
        # Called once (with the reason) when this daemon is deposed while taking part: it then rejoins as a replica.
        self.on_deposed: Callable[[str], None] | None = None
        live.fence = self.fence
        live.sync.gate = self.gate
        live.election_state = self.state.value

    @property
    def period_s(self) -> float:
        return max(0.1, self.ttl_s / 4)

    # -- fencing ---------------------------------------------------------------------------------

    def leading(self) -> bool:
        """Whether this daemon may commit and acknowledge pushes now."""
        return self.state is LeaderState.LEADER and time.monotonic() < self._lease_until

    def fence(self) -> None:
        """Raise UnavailableError unless this daemon may commit a push now (a replica always passes:
        it takes no pushes, and its own followers take what it applied)."""
        if self.live.primary is not None or self.leading():
            return
        if self.state is LeaderState.LEADER:
            self._wake.set()  # its lease lapsed here: renew (or find it expired) now rather than at the next round
        raise UnavailableError(self._refusal())

    def gate(self, version: int) -> None:
        """Before the push of `version` is acknowledged: fence, and with --sync-replicas store the
        version in etcd's `acked/<shard>` first (UnavailableError when etcd does not take it: the
        push is applied, not acknowledged; a retry with the same step id is not applied again)."""
        self.fence()
        if not self._sync:
            return
        with self._lock:
            self._wanted = max(self._wanted, version)
        with self._publish_lock:
            if self._published >= version:
                return  # another push's write covered this one
            target = self._wanted
            ours = rpc_pb2.Compare(
                key=self._leader_key,
                target=rpc_pb2.Compare.CREATE,
                result=rpc_pb2.Compare.EQUAL,
                create_revision=self._leader_revision,
            )
            put = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=self._acked_key, value=version_bytes(target)))
            try:
                held, _ = self._etcd.txn([ours], [put])
            except MemstoreError as exc:
                raise UnavailableError(
                    f"the push of version {version} is applied on this primary, but etcd did not record it as "
                    f"acknowledged ({exc}), so it is not acknowledged: retry it with the same step id"
                ) from None
            if not held:
                self._depose("the leader key of its shard is no longer its own")
                raise UnavailableError(self._refusal())
            self._published = target

    def _refusal(self) -> str:
        shard = f"shard {self.shard}"
        leader = self.leader if self.leader is not None and self.leader.address != self.address else None
        if self.state is LeaderState.DEPOSED:
            elsewhere = (
                "a new leader is being elected"
                if leader is None
                else f"the leader is {leader.address} at epoch {leader.epoch}: push there"
            )
            return (
                f"pushes are refused: this daemon is no longer the leader of {shard} ({self.reason}); {elsewhere}. "
                "This daemon must rejoin as a replica, and does so by itself: it serves again on the same port as a "
                "replica of the leader (re-seeded from the leader's table when it holds pushes the leader lacks)"
            )
        if self.state is LeaderState.LEADER:
            return (
                f"pushes are refused: this daemon leads {shard} but could not renew its etcd lease in time "
                "(etcd unreachable, or this daemon was paused); it takes pushes again once its lease is renewed, or "
                "must rejoin as a replica if it expired"
            )
        there = "" if leader is None else f"; the last leader known is {leader.address}"
        return f"pushes are refused: {shard} has no leader yet (an election is under way{there}); retry shortly"

    # -- the election ----------------------------------------------------------------------------

    def start(self) -> ShardElection:
        """Take part now (a primary campaigns at once; a warning when etcd does not answer: the
        thread retries), then from a thread."""
        self._tick()
        try:
            _, revision = self._etcd.get_prefix(self._leader_key)
            self._watch = self._etcd.watch_prefix(
                self._leader_key, lambda _events: self._wake.set(), start_revision=revision + 1
            )
        except MemstoreError as exc:  # the loop polls anyway
            log.warning("election of shard %d: cannot watch the leader key yet: %s", self.shard, exc)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.period_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._tick()

    def _tick(self) -> None:
        try:
            self._renew()
            kv = self._etcd.get(self._leader_key)
            leader = None if kv is None else LeaderRecord.decode(kv.value)
            if leader is not None:
                self.leader = leader
                self._note_epoch(leader.epoch)
            if self.state is LeaderState.LEADER:
                if kv is None or kv.create_revision != self._leader_revision:
                    self._depose("its leader key " + ("expired" if kv is None else f"names {leader.address}"))
            elif self.state is LeaderState.DEPOSED:
                pass  # for good: it must rejoin as a replica
            elif leader is not None:
                self._follow(leader)
            else:
                self._campaign()
            if self._failing:
                log.info("election of shard %d: etcd answers again", self.shard)
                self._failing = False
        except MemstoreError as exc:
            if not self._failing:
                log.warning("election of shard %d: %s (retrying every %.1fs)", self.shard, exc, self.period_s)
            self._failing = True
        except Exception:  # noqa: BLE001 - a malformed key or a bug: say so, keep the thread (fencing holds)
            log.exception("election of shard %d: a round failed", self.shard)

    def _renew(self) -> None:
        """Keep the election lease alive; a leader whose lease expired is deposed."""
        sent = time.monotonic()
        if self._lease:
            ttl = self._etcd.keep_alive_once(self._lease)
            if ttl == 0:
                self._lease = 0
                if self.state is LeaderState.LEADER:
                    self._depose("its etcd lease expired")
        if not self._lease:
            self._lease = self._etcd.grant(self.ttl_s)
            ttl = self.ttl_s
        self._lease_until = sent + ttl * (1 - _LEASE_MARGIN)

    def _note_epoch(self, epoch: int) -> None:
        self.epoch = max(self.epoch, epoch)
        if self.follower is not None:
            self.follower.epoch = max(self.follower.epoch, self.epoch)
        if self.live.primary is not None:  # a replica says the epoch it follows; a leader keeps its own
            self.live.epoch = self.epoch

    def _follow(self, leader: LeaderRecord) -> None:
        if self.follower is None:  # a primary started while another leads
            if leader.address != self.address:
                self._depose(f"{leader.address} leads shard {self.shard} at epoch {leader.epoch}")
            return  # our own key from before a restart: it expires, then we campaign
        if leader.address == self.address:
            return
        if self.state is not LeaderState.FOLLOWER or self.follower.primary != leader.address:
            log.info("shard %d: following the leader %s (epoch %d)", self.shard, leader.address, leader.epoch)
            self.follower.retarget(leader.address)
            self._etcd.delete(self._candidate_key)
            self.state = LeaderState.FOLLOWER
            self.live.election_state = self.state.value

    def _campaign(self) -> None:
        if self.follower is not None:
            if self.state is LeaderState.FOLLOWER:
                # Freeze our version (no record lands while we stand), say it, let the others say theirs.
                self.follower.stop()
                self.state = LeaderState.CANDIDATE
                self.live.election_state = self.state.value
                self._candidate_since = time.monotonic()
                version = self.live.version
                self._etcd.put(self._candidate_key, str(version).encode(), lease=self._lease)
                log.warning("shard %d has no leader: standing for election at version %d", self.shard, version)
                return
            candidates, _ = self._etcd.get_prefix(candidates_prefix(self.config.cluster, self.shard))
            best = max(((int(kv.value), kv.key) for kv in candidates), default=None)
            ours = (self.live.version, self._candidate_key)
            if best is not None and best > ours and time.monotonic() - self._candidate_since < 2 * self.ttl_s:
                return  # a candidate holding more goes first: it would otherwise be ahead of the leader
        self._stand()

    def _stand(self) -> None:
        """The election transaction (see the module docstring)."""
        version = self.live.version
        epoch_kv = self._etcd.get(self._epoch_key)
        acked_kv = self._etcd.get(self._acked_key)
        epoch = 0 if epoch_kv is None else int(epoch_kv.value)
        compare = [
            rpc_pb2.Compare(
                key=self._leader_key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
            ),
            rpc_pb2.Compare(
                key=self._epoch_key,
                target=rpc_pb2.Compare.MOD,
                result=rpc_pb2.Compare.EQUAL,
                mod_revision=0 if epoch_kv is None else epoch_kv.mod_revision,
            ),
        ]
        if acked_kv is None:
            compare.append(
                rpc_pb2.Compare(
                    key=self._acked_key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
                )
            )
        else:  # acked <= version, as bytes of equal length
            compare.append(
                rpc_pb2.Compare(
                    key=self._acked_key,
                    target=rpc_pb2.Compare.VALUE,
                    result=rpc_pb2.Compare.LESS,
                    value=version_bytes(version + 1),
                )
            )
        record = LeaderRecord(self.address, epoch + 1)
        success = [
            rpc_pb2.RequestOp(
                request_put=rpc_pb2.PutRequest(key=self._leader_key, value=record.encode(), lease=self._lease)
            ),
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=self._epoch_key, value=str(epoch + 1).encode())),
        ]
        won, reply = self._etcd.txn(compare, success)
        if not won:
            acked = 0 if acked_kv is None else int(acked_kv.value)
            if acked > version:
                reason = f"it holds version {version}, below the acknowledged {acked}: acknowledged pushes lost"
                if reason != self.reason:
                    log.error("shard %d: this daemon cannot be elected: %s", self.shard, reason)
                self.reason = reason
            return
        self._leader_revision = reply.header.revision
        self.leader = record
        self.live.epoch = record.epoch
        self._note_epoch(record.epoch)
        if self.follower is not None:
            self.live.promote()
            self._etcd.delete(self._candidate_key)
        with self._lock:
            self._published = self._wanted = 0 if acked_kv is None else int(acked_kv.value)
        self.state = LeaderState.LEADER
        self._changed()
        log.warning("elected leader of shard %d at epoch %d (version %d)", self.shard, record.epoch, version)

    def _depose(self, reason: str) -> None:
        first = self.state is not LeaderState.DEPOSED
        if first and self._stop.is_set():
            log.info("giving the leadership of shard %d up: %s", self.shard, reason)
        elif first:
            log.error("no longer the leader of shard %d: %s; refusing pushes (rejoin as a replica)", self.shard, reason)
        self.state = LeaderState.DEPOSED
        self.reason = reason
        self._changed()
        if first and not self._stop.is_set() and self.on_deposed is not None:  # not when it stops: it leaves
            self.on_deposed(reason)

    def _changed(self) -> None:
        self.live.election_state = self.state.value
        if self.on_change is not None:
            self.on_change()

    def stop(self) -> None:
        """Stop taking part; a leader gives its key up at once (the lease is revoked)."""
        self._stop.set()
        self._wake.set()
        if self.state is LeaderState.LEADER:  # no push commits past this point: another may be elected now
            self._depose("this daemon is stopping")
        if self._watch is not None:
            self._watch.stop()
        if self._thread.is_alive():
            self._thread.join()
        if self._lease:
            try:
                self._etcd.revoke(self._lease, timeout_s=2.0)
            except MemstoreError as exc:
                log.warning("could not give the shard's leadership up in etcd (it expires): %s", exc)
        self._etcd.close()


def leader_of(config: MembershipConfig, shard: int, exclude: str, stop: threading.Event) -> tuple[str, int] | None:
    """`shard`'s leader once etcd names one other than `exclude` (this daemon), and the version in
    `acked/<shard>` then (0 when none was written), polling every quarter TTL; None once `stop` is set
    first. etcd unreachable: retried (logged once)."""
    key, acked = leader_key(config.cluster, shard), acked_key(config.cluster, shard)
    etcd = EtcdClient(config.endpoints, timeout_s=max(0.5, min(5.0, config.ttl_s / 3)))
    failing = False
    try:
        while not stop.is_set():
            try:
                kv = etcd.get(key)
                leader = None if kv is None else LeaderRecord.decode(kv.value)
                if leader is not None and leader.address != exclude:
                    acked_kv = etcd.get(acked)
                    return leader.address, 0 if acked_kv is None else int(acked_kv.value)
            except MemstoreError as exc:
                if not failing:
                    log.warning("shard %d: cannot read its leader from etcd yet: %s (retrying)", shard, exc)
                failing = True
            stop.wait(max(0.1, config.ttl_s / 4))
        return None
    finally:
        etcd.close()
