"""Read replicas: a daemon that follows a primary's pushes (`memstore serve DIR --follow PRIMARY`).

The replica serves lookups from its own copy of the primary's table and keeps it up to date:
a `Follower` thread Describes the primary (with a deadline), checks that it serves the same
table, then calls `Follow` from the replica's own version and applies every streamed record
with `LiveTable.apply_replicated` (logged, then applied under the sequence lock, like a push).
The stream has no deadline; the primary sends a heartbeat (a message without records) every
`FollowConfig.heartbeat_s` when idle, and a stream silent for `silence_s` is presumed dead,
cancelled and reconnected.

Health: the replica serves (SERVING, lookups answered) while its lag, the primary's last known
version minus its own, is at most `max_lag` versions. Above that, or once it stopped following
(the primary serves another table, or no longer holds the records the replica needs), it is
NOT_SERVING and lookups fail with UNAVAILABLE, so a client's retry goes to another replica. An
unreachable primary is retried with exponential backoff while the replica keeps serving its
last version (Describe reports the seconds since the primary was last heard from).

Durability reports: a third thread tells the primary the version this replica holds durably
(`ConfirmDurable`: every applied record is logged per the replica's own --durability first) after
each message applied, and every `heartbeat_s` when idle; a primary serving with --sync-replicas
acknowledges a push only once enough replicas reported it (memstore.sync). A primary that does not
know the call (an older memstore) is not asked again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import grpc

from memstore.auth import ClientTls, open_channel
from memstore.errors import (
    DataLossError,
    InvalidArgumentError,
    LayoutMismatchError,
    MemstoreError,
    ReplicationGapError,
    UnavailableError,
)
from memstore.live import LiveTable
from memstore.space import DiskFullError
from memstore.tabledir.manifest import CHECKSUMS_KEY, Manifest
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

log = logging.getLogger("memstore.replica")

DEFAULT_MAX_LAG = 1000


@dataclass(frozen=True)
class FollowConfig:
    """How a replica follows its primary."""

    # Versions the replica may trail its primary by and still answer lookups.
    max_lag: int = DEFAULT_MAX_LAG
    # Asked of the primary: seconds between heartbeats when no push lands.
    heartbeat_s: float = 1.0
    # A stream with no message (heartbeats included) for this long is presumed dead: reconnect.
    silence_s: float = 10.0
    # Deadline of the Describe that opens each connection.
    describe_timeout_s: float = 10.0
    # Reconnection backoff, doubling from initial to max.
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    # TLS to a primary served with --tls-cert, and a replicate token for one with --token-file.
    tls: ClientTls | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_lag < 0:
            raise InvalidArgumentError(f"max_lag must be 0 or more versions; got {self.max_lag}")
        if not 0 < self.heartbeat_s < self.silence_s:
            raise InvalidArgumentError(
                f"FollowConfig needs 0 < heartbeat_s < silence_s; got {self.heartbeat_s} and {self.silence_s}"
            )
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise InvalidArgumentError("FollowConfig needs 0 < initial_backoff_s <= max_backoff_s")
        if self.describe_timeout_s <= 0:
            raise InvalidArgumentError(f"describe_timeout_s must be positive; got {self.describe_timeout_s}")


@dataclass(frozen=True)
class ReplicaStatus:
    """Where a replica stands, as Describe and the log report it."""

    primary: str
    applied_version: int
    primary_version: int  # as last heard from the primary (the replica's own before that)
    lag: int  # versions
    seconds_since_contact: float | None  # None: never heard from the primary
    serving: bool
    problem: str  # why it does not serve or cannot reach the primary; "" when all is well


def manifest_differences(ours: Manifest, theirs: Manifest) -> list[str]:
    """What differs between two manifests, one "field: ours vs. theirs" line each ([] when equal)."""
    differences = []
    for spec in fields(Manifest):
        mine, other = getattr(ours, spec.name), getattr(theirs, spec.name)
        if spec.compare and mine != other:
            differences.append(f"{spec.name}: {_show(spec.name, mine, ours)} vs. {_show(spec.name, other, theirs)}")
    return differences


def _show(name: str, value: object, manifest: Manifest) -> str:
    """A manifest field, short enough for one line of an error message."""
    if value is None:
        return "none"
    if name == "layout":
        return f"layout with fingerprint {manifest.fingerprint}"
    if name == "sharding":
        sharding = manifest.sharding
        assert sharding is not None
        return f"shard {sharding.shard} of {len(set(sharding.assignment))} ({sharding.num_partitions} partitions)"
    if name == "optimizer":
        return ", ".join(f"{k} {v}" for k, v in manifest.optimizer.to_dict().items())
    return str(getattr(value, "value", value))


def check_same_table(replica: Manifest, primary: Manifest, replica_name: str, primary_name: str) -> None:
    """Raise LayoutMismatchError unless the two manifests are equal (layout, seed, dtype, backend,
    optimizer, shard, ...): a replica applies the primary's after-images row by row, which is
    only meaningful on the very same table."""
    differences = manifest_differences(replica, primary)
    if differences:
        raise LayoutMismatchError(
            f"{replica_name} cannot follow {primary_name}: their tables differ ({'; '.join(differences)}, "
            f"{replica_name}'s first); a replica serves a copy of its primary's table: a snapshot of it "
            "(`memstore snapshot`), a copy of its directory, or an identical `memstore create`"
        )


# The largest manifest a Follow request may carry: a real one is a few KB (the primes of each layer).
MAX_FOLLOW_MANIFEST_BYTES = 1 << 20
# Manifest keys that are not part of what makes two tables the same (see Manifest's compare=False).
_NOT_COMPARED = frozenset({"rows_sha256", CHECKSUMS_KEY})


def check_follower_manifest(manifest_json: str, ours: Manifest, follower_name: str, our_name: str) -> None:
    """Raise unless a follower's manifest (as it sent it) describes `ours`, computing nothing the
    sender chose the size of: the raw JSON fields are compared with ours first; a manifest is
    parsed (which builds its layout, a prime search) only when its layout is ours, for the
    detailed message of `check_same_table`. A different layout is refused by its fingerprints."""
    if len(manifest_json) > MAX_FOLLOW_MANIFEST_BYTES:
        raise InvalidArgumentError(
            f"{follower_name} sent a manifest of {len(manifest_json)} bytes, over {MAX_FOLLOW_MANIFEST_BYTES}"
        )
    try:
        theirs = json.loads(manifest_json)
    except (ValueError, RecursionError):
        raise InvalidArgumentError(f"{follower_name} sent a manifest that is not JSON") from None
    if not isinstance(theirs, dict):
        raise InvalidArgumentError(f"{follower_name} sent a manifest that is not a JSON object")
    mine = json.loads(ours.to_json())
    differing = sorted(
        key for key in (set(mine) | set(theirs)) - _NOT_COMPARED if mine.get(key, None) != theirs.get(key, None)
    )
    if not differing:
        return
    if "layout" in differing:
        claimed = theirs.get("fingerprint")
        shown = claimed if isinstance(claimed, str) and len(claimed) <= 64 else "unknown"
        raise LayoutMismatchError(
            f"{follower_name} cannot follow {our_name}: their tables differ (layout: fingerprint {shown} vs. "
            f"{ours.fingerprint}, the follower's first); a replica serves a copy of its primary's table: a snapshot "
            "of it (`memstore snapshot`), a copy of its directory, or an identical `memstore create`"
        )
    # The layout is ours: parsing costs what opening this table did, and names each difference.
    check_same_table(Manifest.from_json(manifest_json), ours, follower_name, our_name)


def record_digest(live: LiveTable, version: int) -> bytes:
    """SHA-256 of the payload of `live`'s own record of `version` (b"" for version 0, or when its feed
    and log no longer hold it)."""
    if not 0 < version <= live.version:
        return b""
    try:
        records = live.records_after(version - 1, 1, 0.0)
    except MemstoreError:
        return b""
    if not records or records[0].version != version:
        return b""
    return hashlib.sha256(records[0].payload).digest()


def check_same_history(live: LiveTable, version: int, digest: bytes, follower_name: str) -> None:
    """ReplicationGapError when `live`'s record of `version` is not the follower's (`digest` of its
    payload): the tables diverged, at the same version with different rows (a deposed primary's
    pushes, numbered like the new primary's). Nothing to check without a digest or our record."""
    ours = record_digest(live, version) if digest else b""
    if ours and ours != digest:
        raise ReplicationGapError(
            f"{follower_name}'s record of version {version} differs from this table's: the two tables diverged "
            "(it applied pushes this one never made, as a deposed primary does); replace its table with a copy of "
            "this one (it re-seeds itself with --reseed auto; `memstore reseed` by hand)"
        )


class Follower:
    """The replica side of replication: follows `primary` into `live` (a LiveTable opened with
    `primary=`) on a thread of its own, and tracks lag, contact and health.

    `observe` and `stop_following` are the state transitions the thread makes; they are public
    so that health and the lag bound can be driven directly (tests, tools).
    """

    def __init__(
        self,
        live: LiveTable,
        config: FollowConfig | None = None,
        follower_id: str | None = None,
        on_reseed: Callable[[str], None] | None = None,
    ) -> None:
        if live.primary is None:
            raise InvalidArgumentError("a Follower needs a LiveTable opened as a replica (LiveTable.open(primary=...))")
        self.live = live
        self.primary = live.primary
        self.config = config or FollowConfig()
        self.follower_id = follower_id or f"{socket.gethostname()}:{os.getpid()}:{live.path}"
        self._lock = threading.Lock()
        self._primary_version = live.version
        self._last_contact: float | None = None
        self._stopped: str | None = None  # why it stopped following for good
        self._problem = ""  # the last connection failure, cleared by the next message
        self._serving: bool | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._health_lock = threading.Lock()  # listeners hear transitions in the order they happen
        self._connection: grpc.Channel | None = None  # the channel in use, closed by stop()
        self._call: grpc.Future | None = None  # the Follow stream in progress, cancelled by the watchdog
        self._streamed = 0  # Follow messages received, heartbeats included
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Stable across restarts (unlike follower_id): a primary counts a replica once for --sync-replicas.
        self.replica_id = f"{socket.gethostname()}:{live.path.resolve()}"
        self._applied = threading.Event()  # set after each message applied: a durability report is due
        self._report_channel: grpc.Channel | None = None
        self.reported = 0  # the durable version the primary last took from this replica
        # The highest leader epoch known (memstore.election; 0 without etcd): records streamed by a
        # primary of a lower epoch, a deposed one, are refused.
        self.epoch = 0
        # Called (with the reason) instead of stopping for good when the primary no longer holds the records
        # after our version or has fewer than ours: the daemon then re-seeds the table (memstore.reseed).
        self._on_reseed = on_reseed

    # -- state -------------------------------------------------------------------------------

    def status(self) -> ReplicaStatus:
        """A consistent view of the replica's state now."""
        with self._lock:
            applied = self.live.version
            lag = max(0, self._primary_version - applied)
            since = None if self._last_contact is None else time.monotonic() - self._last_contact
            problem = self._stopped or self._problem
            serving = self._serving_now(lag)
            if not serving and not problem:
                problem = f"{lag} versions behind the primary, more than --max-lag {self.config.max_lag}"
            return ReplicaStatus(self.primary, applied, self._primary_version, lag, since, serving, problem)

    def _serving_now(self, lag: int) -> bool:
        return self._stopped is None and lag <= self.config.max_lag

    def observe(self, primary_version: int) -> None:
        """A message from the primary arrived, saying its version is `primary_version`."""
        with self._lock:
            self._primary_version = max(self._primary_version, primary_version)
            self._last_contact = time.monotonic()
            self._problem = ""
        self._publish_health()

    def stop_following(self, reason: str) -> None:
        """Stop following for good (until a restart): NOT_SERVING, lookups refused with `reason`."""
        log.error("replica of %s stopped following and no longer serves lookups: %s", self.primary, reason)
        with self._lock:
            self._stopped = reason
        self._stop.set()
        self._cancel_call()
        self._publish_health()

    def check_readable(self) -> None:
        """Raise UnavailableError when the replica must not answer lookups (lag above the bound, or
        stopped following): a client's retry then goes to another replica or the primary."""
        with self._lock:
            stopped = self._stopped
            lag = max(0, self._primary_version - self.live.version)
        if stopped is not None:
            raise UnavailableError(
                f"replica stopped following its primary {self.primary} ({stopped}); another replica or the "
                "primary can serve this read"
            )
        if lag > self.config.max_lag:
            raise UnavailableError(
                f"replica is {lag} versions behind its primary {self.primary}, more than --max-lag "
                f"{self.config.max_lag}; another replica or the primary can serve this read"
            )

    def add_health_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(serving)` now and whenever the replica starts or stops serving."""
        with self._health_lock:
            with self._lock:
                self._listeners.append(listener)
                serving = self._serving_now(max(0, self._primary_version - self.live.version))
            listener(serving)

    def _publish_health(self) -> None:
        with self._health_lock:
            with self._lock:
                serving = self._serving_now(max(0, self._primary_version - self.live.version))
                changed = serving != self._serving
                self._serving = serving
                listeners = list(self._listeners)
            if changed:
                for listener in listeners:
                    listener(serving)

    # -- following ---------------------------------------------------------------------------

    def check_primary(self) -> bool:
        """Describe the primary once: raise LayoutMismatchError when it serves another table; False
        when it cannot be reached now (the thread keeps trying), True otherwise."""
        try:
            with self._channel() as channel:
                self._describe(pb_grpc.MemstoreStub(channel))
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            with self._lock:
                self._problem = f"primary unreachable: {reason}"
            log.warning(
                "primary %s is not reachable yet (%s); serving version %d meanwhile",
                self.primary,
                reason,
                self.live.version,
            )
            return False
        return True

    def start(self) -> None:
        """Follow the primary on a background thread (and watch the stream for silence on another)."""
        self._threads = [
            threading.Thread(target=self._run, name="memstore-follower", daemon=True),
            threading.Thread(target=self._watch, name="memstore-follower-watchdog", daemon=True),
            threading.Thread(target=self._report, name="memstore-follower-reports", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop following (hang up, join the threads); the table stays at its version. Idempotent."""
        self._stop.set()
        self._applied.set()  # wakes the reporter
        with self._lock:
            connections = [self._connection, self._report_channel]
        for connection in connections:
            if connection is not None:
                connection.close()  # ends a Describe, stream or report in flight at once, even to a hung primary
        for thread in self._threads:
            thread.join()
        self._threads = []

    def retarget(self, primary: str) -> None:
        """Follow `primary` from now on (an election made it the shard's leader): hang up on the old
        one, then follow the new one from this replica's version. Also resumes a follower that was
        stopped with `stop` (a candidate that lost its election)."""
        self.stop()
        with self._lock:
            self.primary = primary
            self.live.primary = primary
            self._problem = ""
            self._last_contact = None
        self._stop.clear()
        log.info("following %s from now on (version %d)", primary, self.live.version)
        self.start()

    def _cancel_call(self) -> None:
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def _channel(self) -> grpc.Channel:
        # Records are sent whole (a push's after-image can exceed gRPC's 4 MiB default).
        options = [("grpc.max_receive_message_length", -1)]
        return open_channel(self.primary, options, self.config.tls, self.config.token)

    def _describe(self, stub: pb_grpc.MemstoreStub) -> None:
        described = stub.Describe(pb.DescribeRequest(), timeout=self.config.describe_timeout_s)
        check_same_table(
            self.live.manifest,
            Manifest.from_json(described.manifest_json),
            f"replica {self.live.path}",
            f"primary {self.primary}",
        )
        self.observe(described.version)

    def _run(self) -> None:
        backoff = self.config.initial_backoff_s
        while not self._stop.is_set():
            streamed = self._streamed
            try:
                self._follow_once()
                reason = "the primary ended the stream"
            except Exception as exc:
                if self._stop.is_set():  # stop() hung up on a call in flight
                    break
                reason = self._why_lost(exc)
                if reason is None:  # stopped following for good
                    break
            if self._stop.is_set():
                break
            if self._streamed > streamed:
                backoff = self.config.initial_backoff_s  # the stream worked: start the backoff afresh
            with self._lock:
                self._problem = f"primary unreachable: {reason}"
            log.warning(
                "lost the primary %s (%s) at version %d; reconnecting in %.1fs",
                self.primary,
                reason,
                self.live.version,
                backoff,
            )
            self._stop.wait(backoff)
            backoff = min(2 * backoff, self.config.max_backoff_s)

    def _why_lost(self, exc: Exception) -> str | None:
        """Why a connection failed, for a retry; None after stopping following for good."""
        if isinstance(exc, grpc.RpcError):
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # too far behind or ahead: Describe checked the table
                if self._on_reseed is not None:
                    self.stop_following(f"re-seeding from the primary, which refused to stream: {exc.details()}")
                    self._on_reseed(exc.details())
                else:
                    self.stop_following(f"the primary refused: {exc.details()}")
                return None
            if exc.code() == grpc.StatusCode.CANCELLED:  # only the watchdog cancels while we follow
                return f"silent for over {self.config.silence_s:g}s, so presumed dead"
            return f"{exc.code().name}: {exc.details()}"
        if isinstance(exc, UnavailableError):  # a deposed primary's stream: the election retargets us
            return str(exc)
        if isinstance(exc, DataLossError):  # a record out of order or malformed: start again from our version
            log.error("replica of %s: %s; reconnecting", self.primary, exc)
            return str(exc)
        if isinstance(exc, DiskFullError):  # nothing applied: follow again, and catch up once space is freed
            log.error("replica of %s: %s", self.primary, exc)
            return str(exc)
        if isinstance(exc, MemstoreError):  # another table, or a local failure (the log refuses writes)
            self.stop_following(str(exc))
            return None
        # A bug: say so loudly rather than let the thread die unseen.
        log.error("replica of %s: following failed unexpectedly", self.primary, exc_info=exc)
        self.stop_following(f"unexpected error: {exc!r}")
        return None

    def _follow_once(self) -> None:
        """One connection: Describe, check, Follow from our version and apply until it breaks."""
        with self._channel() as channel:
            with self._lock:
                self._connection = channel
            try:
                if self._stop.is_set():  # stop() ran before there was a connection to hang up
                    return
                stub = pb_grpc.MemstoreStub(channel)
                self._describe(stub)
                request = pb.FollowRequest(
                    from_version=self.live.version,
                    fingerprint=self.live.manifest.fingerprint,
                    manifest_json=self.live.manifest.to_json(),
                    follower_id=self.follower_id,
                    heartbeat_s=self.config.heartbeat_s,
                    last_record_sha256=record_digest(self.live, self.live.version),
                    epoch=self.epoch,
                )
                call = stub.Follow(request)  # no deadline: the stream lives as long as both daemons do
                with self._lock:
                    self._call = call
                log.info("following %s from version %d", self.primary, self.live.version)
                for response in call:
                    if response.epoch < self.epoch:  # fencing: a deposed primary's records never land here
                        raise UnavailableError(
                            f"{self.primary} streams as the leader of epoch {response.epoch}, but epoch {self.epoch} "
                            "elected another: its records are refused"
                        )
                    for record in response.records:
                        self.live.apply_replicated(record.version, record.payload)
                    if response.records:
                        self._applied.set()
                    self._streamed += 1
                    self.observe(response.primary_version)
            finally:
                with self._lock:
                    self._connection = None
                    self._call = None

    def _report(self) -> None:
        """Tell the primary the version this replica holds durably: after each message applied, and
        every heartbeat_s when idle (a restarted primary learns it again)."""
        said = ""  # the last problem logged, so that a lasting one is logged once
        while not self._stop.is_set():
            try:
                with self._channel() as channel:
                    with self._lock:
                        if self._stop.is_set():
                            return
                        self._report_channel = channel
                    stub = pb_grpc.MemstoreStub(channel)
                    while not self._stop.is_set():
                        self._applied.clear()
                        version = self.live.version  # every applied record was logged first: durable
                        stub.ConfirmDurable(
                            pb.ConfirmDurableRequest(
                                replica_id=self.replica_id,
                                durable_version=version,
                                fingerprint=self.live.manifest.fingerprint,
                            ),
                            timeout=self.config.describe_timeout_s,
                        )
                        self.reported = version
                        said = ""
                        self._applied.wait(self.config.heartbeat_s)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info(
                        "primary %s takes no durability reports (an older memstore): it cannot count this replica "
                        "for --sync-replicas",
                        self.primary,
                    )
                    return
                problem = f"{exc.code().name}: {exc.details()}"
                if problem != said and exc.code() != grpc.StatusCode.UNAVAILABLE:  # unreachable: _run says so
                    log.warning("primary %s refused this replica's durability report: %s", self.primary, problem)
                said = problem
            finally:
                with self._lock:
                    self._report_channel = None
            self._stop.wait(self.config.heartbeat_s)  # a new channel then: no reconnection backoff of gRPC's

    def _watch(self) -> None:
        """Cancel a stream that stays silent past `silence_s` (a dead connection looks idle)."""
        while not self._stop.wait(self.config.heartbeat_s):
            with self._lock:
                call = self._call
                silent = None if self._last_contact is None else time.monotonic() - self._last_contact
            if call is not None and silent is not None and silent > self.config.silence_s:
                log.warning("no message from the primary %s for %.0fs; reconnecting", self.primary, silent)
                call.cancel()
