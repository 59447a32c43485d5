"""Synchronous replication: a primary acknowledges a push only once N replicas hold it durably.

`memstore serve --sync-replicas N` (docs/replication.md, "Synchronous replication"). Replicas
report the version they hold durably (applied and logged per their own --durability) with the
`ConfirmDurable` RPC as they apply the primary's records; `SyncAcks.confirm` records each report.
A push commits as always (logged, applied, visible, fed to followers) under the table's push
lock; then, outside that lock, `SyncAcks.acknowledge` waits until N distinct replicas reported
a durable version at or past the push's. Later pushes commit and wait meanwhile; since a
replica's durable version only grows, acknowledgements come out in version order.

When fewer than N confirm within `SyncConfig.timeout_s`, the policy decides:

- `fail` (the default): the push fails with UNAVAILABLE. It is applied on the primary (and
  visible to its readers), only not acknowledged: a retry with the same step id is answered
  without applying it again, and waits for the replicas anew, so the retried push is applied
  exactly once and acknowledged only once N replicas hold it.
- `degrade`: the push is acknowledged anyway, the timeout is counted and logged, and the daemon
  acknowledges without waiting (asynchronous) until N replicas hold the version that timed
  out; then pushes wait again (MySQL's rpl_semi_sync_master_timeout behaviour).

`acknowledged_version` (the highest version acknowledged to a client) and each replica's reported
durable version are what a failover compares: a replica holding at least the acknowledged
version lost no acknowledged push.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memstore.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError

log = logging.getLogger("memstore.sync")

# Replica reports kept at most (a replica's id is its host and table directory, so a restarted one
# keeps its entry); past this the stalest report is forgotten.
MAX_REPLICA_REPORTS = 64
# A replica that reported within this many seconds counts as reporting (it reports every second when idle).
REPORTING_WITHIN_S = 10.0


class SyncTimeoutPolicy(enum.Enum):
    """What a push does when fewer than `SyncConfig.replicas` replicas confirm it in time."""

    FAIL = "fail"  # UNAVAILABLE: applied here, not acknowledged; a retry with the same step id waits again
    DEGRADE = "degrade"  # acknowledged anyway; asynchronous until enough replicas caught up

    def __str__(self) -> str:  # as argparse shows the choices
        return self.value


@dataclass(frozen=True)
class SyncConfig:
    """How many replicas must hold a push durably before the primary acknowledges it, and for how long
    a push waits for them."""

    replicas: int = 0  # 0: asynchronous replication (a push is acknowledged once committed here)
    timeout_s: float = 5.0
    policy: SyncTimeoutPolicy = SyncTimeoutPolicy.FAIL

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 0:
            raise InvalidArgumentError(f"sync replicas must be a count, 0 or more; got {self.replicas!r}")
        if not 0 < self.timeout_s <= 86400:  # False for nan too
            raise InvalidArgumentError(f"the sync timeout must be in (0, 86400] seconds; got {self.timeout_s}")
        if not isinstance(self.policy, SyncTimeoutPolicy):
            raise InvalidArgumentError(
                f"the sync timeout policy takes SyncTimeoutPolicy, not {type(self.policy).__name__}"
            )

    @property
    def enabled(self) -> bool:
        """Whether pushes wait for replicas."""
        return self.replicas > 0


@dataclass(frozen=True)
class ReplicaReport:
    """The durable version a replica last reported, and how long ago."""

    replica_id: str
    durable_version: int
    seconds_since_report: float


@dataclass(frozen=True)
class SyncStats:
    """What the metrics read off `SyncAcks`."""

    acknowledged_version: int
    confirmed_version: int  # the highest version `replicas` replicas hold (0 when fewer reported)
    reporting: int  # replicas heard from within REPORTING_WITHIN_S
    timeouts: int  # pushes that timed out waiting (under either policy)
    degradations: int  # times the daemon went asynchronous after a timeout (policy degrade)
    degraded: bool


class SyncAcks:
    """Replicas' durable versions, and the wait of a push for enough of them (see the module docstring)."""

    def __init__(self, config: SyncConfig, name: str | Path = "this table") -> None:
        self.config = config
        self._name = str(name)
        self._changed = threading.Condition()
        self._durable: dict[str, tuple[int, float]] = {}  # replica id -> (durable version, when reported)
        self._acknowledged = 0
        self._degraded = False
        self._degraded_at = 0  # the version whose push timed out, degrading
        self._closed = False
        self._timeouts = 0
        self._degradations = 0
        # Leader election (memstore.election): called with a push's version just before it is
        # acknowledged; raises when this daemon may no longer acknowledge (deposed, or etcd did not
        # take the acknowledged version).
        self.gate: Callable[[int], None] | None = None

    # -- replicas' reports -----------------------------------------------------------------------

    def confirm(self, replica_id: str, durable_version: int) -> None:
        """Replica `replica_id` holds every push up to `durable_version` durably (its latest report
        replaces the one before: a replica re-seeded from an older snapshot reports less)."""
        with self._changed:
            if replica_id not in self._durable and len(self._durable) >= MAX_REPLICA_REPORTS:
                stalest = min(self._durable, key=lambda known: self._durable[known][1])
                del self._durable[stalest]
            self._durable[replica_id] = (durable_version, time.monotonic())
            if self._degraded and self._confirming(self._degraded_at) >= self.config.replicas:
                self._degraded = False
                log.warning(
                    "%s: %d replicas caught up with the push that timed out (version %d): pushes wait for "
                    "--sync-replicas %d again",
                    self._name,
                    self.config.replicas,
                    self._degraded_at,
                    self.config.replicas,
                )
            self._changed.notify_all()

    def replicas(self) -> list[ReplicaReport]:
        """The replicas' last reports, most advanced first."""
        now = time.monotonic()
        with self._changed:
            reports = [ReplicaReport(rid, version, now - when) for rid, (version, when) in self._durable.items()]
        return sorted(reports, key=lambda report: (-report.durable_version, report.replica_id))

    def _confirming(self, version: int) -> int:
        return sum(1 for durable, _ in self._durable.values() if durable >= version)

    # -- acknowledging a push ------------------------------------------------------------------

    def acknowledge(self, version: int, timeout_s: float | None = None) -> None:
        """Return once the push of `version` (committed here) may be acknowledged: at once without
        sync replicas; else once `config.replicas` replicas hold it, or per the policy after
        `config.timeout_s` (UnavailableError for `fail`). `timeout_s` bounds the wait further (the
        caller's deadline: DeadlineExceededError when it passes first, whatever the policy)."""
        needed = self.config.replicas
        if not needed:
            if self.gate is not None:
                self.gate(version)
            self._acknowledged_through(version)
            return
        start = time.monotonic()
        policy_deadline = start + self.config.timeout_s
        deadline = policy_deadline if timeout_s is None else min(policy_deadline, start + max(0.0, timeout_s))
        with self._changed:
            while True:
                confirming = self._confirming(version)
                if confirming >= needed or self._degraded:
                    break
                if self._closed:
                    raise UnavailableError(
                        f"{self._unconfirmed(version, confirming)} before this daemon stopped; retry it with the same "
                        "step id once a primary serves (it is not applied again)"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            if confirming < needed and not self._degraded:
                if deadline < policy_deadline:
                    raise DeadlineExceededError(
                        f"{self._unconfirmed(version, confirming)} within the call's deadline; give pushes a deadline "
                        f"longer than --sync-timeout-s {self.config.timeout_s:g}"
                    )
                self._timed_out(version, confirming)  # raises under `fail`
        if self.gate is not None:  # outside the lock: it may wait on etcd
            self.gate(version)
        with self._changed:
            self._acknowledged = max(self._acknowledged, version)

    def _acknowledged_through(self, version: int) -> None:
        with self._changed:
            self._acknowledged = max(self._acknowledged, version)

    def _unconfirmed(self, version: int, confirming: int) -> str:
        return (
            f"the push of version {version} is applied on this primary and visible to its readers, but only "
            f"{confirming} of the {self.config.replicas} replicas --sync-replicas asks for confirmed holding it"
        )

    def _timed_out(self, version: int, confirming: int) -> None:
        """A push waited `config.timeout_s` in vain (the caller holds `_changed`): count it, then fail it
        or go asynchronous."""
        self._timeouts += 1
        held = ", ".join(f"{rid} at {durable}" for rid, (durable, _) in self._durable.items()) or "none reported"
        if self.config.policy is SyncTimeoutPolicy.FAIL:
            log.warning(
                "%s: push of version %d not acknowledged: %d of %d replicas confirmed it within %gs (replicas: %s)",
                self._name,
                version,
                confirming,
                self.config.replicas,
                self.config.timeout_s,
                held,
            )
            raise UnavailableError(
                f"{self._unconfirmed(version, confirming)} within --sync-timeout-s {self.config.timeout_s:g}, so it "
                "is not acknowledged: retry it with the same step id (it is not applied again, and is acknowledged "
                "once enough replicas hold it; a push without a step id would be applied twice). Replicas "
                f"reporting: {held}"
            )
        self._degraded = True
        self._degraded_at = version
        self._degradations += 1
        log.error(
            "%s: push of version %d acknowledged WITHOUT its replicas: %d of %d confirmed it within %gs "
            "(replicas: %s); pushes are acknowledged asynchronously, and may be lost with this daemon, until "
            "%d replicas hold every acknowledged version",
            self._name,
            version,
            confirming,
            self.config.replicas,
            self.config.timeout_s,
            held,
            self.config.replicas,
        )

    def close(self) -> None:
        """Wake every waiting push for good: it fails UNAVAILABLE (the daemon is stopping)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- state ---------------------------------------------------------------------------------

    @property
    def acknowledged_version(self) -> int:
        """The highest version acknowledged to a client since this daemon started."""
        return self._acknowledged

    @property
    def degraded(self) -> bool:
        """Whether pushes are acknowledged without waiting after a timeout (policy `degrade`)."""
        return self._degraded

    def stats(self) -> SyncStats:
        """A consistent view for the metrics."""
        now = time.monotonic()
        with self._changed:
            versions = sorted((durable for durable, _ in self._durable.values()), reverse=True)
            needed = max(1, self.config.replicas)
            return SyncStats(
                acknowledged_version=self._acknowledged,
                confirmed_version=versions[needed - 1] if len(versions) >= needed else 0,
                reporting=sum(1 for _, when in self._durable.values() if now - when <= REPORTING_WITHIN_S),
                timeouts=self._timeouts,
                degradations=self._degradations,
                degraded=self._degraded,
            )
