"""The daemon's life: `serve(config)` runs sessions of a gRPC server (memstore.service.create_server)
over an opened table until SIGTERM/SIGINT, then drains in-flight calls and returns 0.

A session ends early, and the next one serves again on the same port, when a replica must be
re-seeded from its primary first (memstore.reseed), or when a deposed leader must rejoin its shard
as a replica of the new leader (memstore.election). Around the sessions: the port file, the
Prometheus endpoint, the exposure warning and the periodic status lines.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
import time
from pathlib import Path
from typing import NamedTuple

from grpc_health.v1 import health

from memstore.auth import exposure_warning as auth_exposure_warning
from memstore.daemon_config import DaemonConfig, ServerConfig
from memstore.election import ShardElection, leader_of
from memstore.errors import DataLossError, InvalidArgumentError, MemstoreError, TableFormatError
from memstore.live import LiveTable
from memstore.member_state import daemon_state
from memstore.membership import Registration, advertised_address
from memstore.metrics import DaemonMetrics
from memstore.replica import Follower
from memstore.reseed import ReseedPolicy, reseed_from
from memstore.service import create_server
from memstore.tabledir.fsafe import file_policy

log = logging.getLogger("memstore.daemon")


def serve(config: DaemonConfig) -> int:
    """Serve `config.table` until SIGTERM or SIGINT, then drain in-flight calls; returns the exit code 0.

    A table with an optimizer takes pushes unless `config.read_only` (e.g. a snapshot serving inference),
    or `config.primary` names its primary: then it is a read replica that applies the primary's pushes
    and answers lookups while at most `config.follow_config.max_lag` versions behind. Raises
    LayoutMismatchError when that primary serves another table.
    """
    with file_policy(config.group_readable):
        return _serve(config)


class _Restart(NamedTuple):
    """Why a serving session ended other than by a signal, and how the next one starts."""

    port: int | None  # the port it served on (None: it never served)
    reason: str
    primary: str | None  # re-seed from this daemon first; None: rejoin (below)
    # A deposed leader's (shard, own member address, table version): it follows the shard's leader next.
    rejoin: tuple[int, str, int] | None = None


def _serve(config: DaemonConfig) -> int:
    """Serve sessions until a signal: a replica that had to be re-seeded (memstore.reseed) closes its
    table, replaces it with its primary's streamed over StreamSnapshot, and serves again on the same port;
    a deposed leader (memstore.election) serves again on the same port as a replica of the shard's new
    leader, re-seeded by that session when its table cannot be followed from."""
    check_port_file(config.port_file)  # before the table is opened: a wrong path fails at once
    signalled, wake = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        signalled.set()
        wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            restart = _serve_session(config, wake)
            if signalled.is_set() or restart is None:
                return 0
            wake.clear()
            if restart.rejoin is not None:
                rejoined = _rejoin(config, restart.reason, *restart.rejoin, stop=wake)
                if rejoined is None:
                    return 0
                config = rejoined
            else:
                config = dataclasses.replace(config, primary=restart.primary)  # an election may have named another
                if not _reseed(config, restart.reason, wake):
                    return 0
            if restart.port is not None:  # it served: the port file is written, and the port stays the same
                config = dataclasses.replace(config, port_file=None)
                if config.listen.endswith(":0"):  # clients find it where it was
                    config = dataclasses.replace(config, listen=f"{config.listen.rsplit(':', 1)[0]}:{restart.port}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _rejoin(
    config: DaemonConfig, reason: str, shard: int, member: str, version: int, stop: threading.Event
) -> DaemonConfig | None:
    """A deposed leader's next session: a replica (`--reseed auto`) of the shard's leader in etcd, its table
    re-seeded from that leader first when its `version` is past the acknowledged one; None once `stop` is set.
    A failed re-seed is retried with backoff, from the leader etcd names then (another may have been elected)."""
    assert config.membership is not None
    log.warning("rejoining shard %d as a replica: %s", shard, reason)
    follow = config.follow_config
    backoff = follow.initial_backoff_s
    while True:
        found = leader_of(config.membership, shard, member, stop)
        if found is None:
            return None
        leader, acked = found
        # --reseed auto: the replica's session re-seeds the table when the leader cannot be followed from
        # (ahead of it, diverged at the same version, or the leader no longer holds the records it needs).
        config = dataclasses.replace(config, primary=leader, reseed=ReseedPolicy.AUTO)
        if version <= acked:  # every push it holds was acknowledged, so the leader holds the same ones
            log.warning("rejoining shard %d as a replica of %s at version %d", shard, leader, version)
            return config
        # Pushes none acknowledged: perhaps no replica got them, and the digest check cannot see every
        # divergence (docs/replication.md), so the leader's table replaces this one.
        log.warning(
            "re-seeding %s from the leader %s: its version %d is past the last acknowledged one, %d",
            config.table,
            leader,
            version,
            acked,
        )
        try:
            reseed_from(leader, config.table, tls=follow.tls, token=follow.token, receiver_id=str(config.table))
            return config
        except MemstoreError as exc:
            log.error("re-seeding %s from %s failed (%s); trying again in %.1fs", config.table, leader, exc, backoff)
        if stop.wait(backoff):
            return None
        backoff = min(2 * backoff, follow.max_backoff_s)


def _reseed(config: DaemonConfig, reason: str, stop: threading.Event) -> bool:
    """Re-seed the replica's table from its primary, retrying with backoff until it worked (True) or
    `stop` is set (False). Nothing is served meanwhile: the table is closed."""
    assert config.primary is not None
    follow = config.follow_config
    backoff = follow.initial_backoff_s
    log.warning("re-seeding %s from its primary %s: %s", config.table, config.primary, reason)
    while not stop.is_set():
        try:
            reseed_from(config.primary, config.table, tls=follow.tls, token=follow.token, receiver_id=str(config.table))
            return True
        except MemstoreError as exc:
            log.error(
                "re-seeding %s from %s failed (%s); trying again in %.1fs", config.table, config.primary, exc, backoff
            )
        stop.wait(backoff)
        backoff = min(2 * backoff, follow.max_backoff_s)
    return False


def _serve_session(config: DaemonConfig, stop: threading.Event) -> _Restart | None:
    """Serve until `stop` is set; how to go on when a replica must be re-seeded first, or a deposed
    leader must rejoin as a replica."""
    address, port_file, settings, obs = config.listen, config.port_file, config.server, config.observability
    reseed: list[_Restart] = []
    port: int | None = None

    def request_reseed(reason: str) -> None:
        reseed.append(_Restart(port, reason, config.primary if replica is None else replica.primary))
        stop.set()

    def request_rejoin(shard: int, member: str, reason: str) -> None:
        assert table is not None
        reseed.append(_Restart(port, reason, None, (shard, member, table.version)))
        stop.set()

    table: LiveTable | None = None
    replica: Follower | None = None
    registration: Registration | None = None
    election: ShardElection | None = None
    health_servicer = health.HealthServicer()
    metrics = DaemonMetrics()
    host = address.rsplit(":", 1)[0]
    try:
        try:
            table = LiveTable.open(config.table, read_only=config.read_only, config=config.live, primary=config.primary)
        except (DataLossError, TableFormatError) as exc:  # the refusals that --accept-data-loss overrides, and
            # damage: a replica's table loses nothing acknowledged when replaced, its primary holds it all
            if config.primary is None or config.reseed is not ReseedPolicy.AUTO:
                raise
            return _Restart(None, f"its table refuses to open ({exc})", config.primary)
        if config.primary is not None:
            auto = config.reseed is ReseedPolicy.AUTO
            replica = Follower(table, config.follow_config, on_reseed=request_reseed if auto else None)
            replica.check_primary()  # another table: raises here, before serving anything
        server, port = create_server(table, address, settings, health_servicer, metrics, replica)
        warning = exposure_warning(address, settings)
        if warning is not None:
            log.warning(warning)
        if obs.metrics_port is not None:  # before serving: a port in use fails the start, not a running daemon
            metrics_port = _serve_metrics(metrics, obs.metrics_port, obs.metrics_host)
            log.info("metrics at http://%s:%d/metrics", obs.metrics_host, metrics_port)
        server.start()
        if replica is not None:
            replica.start()
        _log_serving(table, config.table, f"{host}:{port}", replica)
        if server.data_plane is not None:
            offer = server.data_plane.offer()
            log.info("data plane on port %d%s", server.data_plane.port, " (TLS)" if offer.tls else "")
        if config.membership is not None:  # once serving: clients may find it from now on
            member = advertised_address(config.membership, address, port)
            if config.membership.election and table.trainable:  # among the daemons that can take pushes
                sharding = table.manifest.sharding
                shard = 0 if sharding is None else sharding.shard
                election = ShardElection(config.membership, table, replica, member, shard)
                election.on_deposed = functools.partial(request_rejoin, shard, member)
                election.start()
            state = daemon_state(table, replica, member, election)
            registration = Registration(config.membership, state).start()
            if election is not None:
                election.on_change = registration.refresh
        if port_file is not None:
            write_port_file(port_file, port)
        last = metrics.counts()
        while not _wait_for_signal(stop, obs.log_interval_s):
            now = metrics.counts()
            log.info(
                "last %.0fs: %s; version %d",
                obs.log_interval_s,
                ", ".join(f"{now[name] - last[name]:,.0f} {name}" for name in now),
                table.version,
            )
            last = now
            if replica is not None:
                _log_replica(replica)
        log.info("stopping: draining in-flight calls (up to %.0fs)", config.grace_s)
        if election is not None:  # no push commits from now on; a replica may be elected at once
            election.stop()
            election = None
        if registration is not None:  # leave the cluster first: clients stop sending calls here
            registration.stop()
            registration = None
        health_servicer.enter_graceful_shutdown()
        if server.data_plane is not None:  # lookups in progress finish within the grace period, as gRPC's
            server.data_plane.drain()
        if replica is not None:
            replica.stop()  # apply nothing more: the table closes next
        table.close_feed()  # end Follow streams now rather than after the grace period
        server.stop(config.grace_s).wait()
        log.info("stopped")
    finally:
        if election is not None:
            election.stop()
        if registration is not None:
            registration.stop()
        if replica is not None:
            replica.stop()
        if table is not None:
            table.close()
    return reseed[0] if reseed else None


def exposure_warning(address: str, config: ServerConfig) -> str | None:
    """The warning a daemon logs on start when other hosts can reach it and neither TLS nor tokens
    guard it (None when loopback-only or guarded)."""
    return auth_exposure_warning(address, config.tls, config.token_file)


def _log_serving(table: LiveTable, table_path: Path, address: str, replica: Follower | None) -> None:
    manifest = table.manifest
    if replica is not None:
        role = f"replica of {replica.primary}, {table.config.durability.value} durability, "
        role += f"max lag {replica.config.max_lag} versions"
    elif table.trainable:
        role = f"trainable, {manifest.optimizer.kind.value}, {table.config.durability.value} durability"
    else:
        role = "frozen"
    log.info(
        "serving %s on %s (%s, version %d): layers %s, %d rows x %d %s, %.2f GB, fingerprint %s",
        table_path,
        address,
        role,
        table.version,
        list(manifest.layout.layer_ids),
        sum(manifest.stored_rows(layer_id) for layer_id in manifest.layout.layer_ids),
        manifest.layout.dim,
        manifest.dtype.value,
        manifest.total_bytes / 1e9,
        manifest.fingerprint,
    )


def _log_replica(replica: Follower) -> None:
    """The replica's periodic line: versions, lag, last contact, health."""
    status = replica.status()
    contact = "never" if status.seconds_since_contact is None else f"{status.seconds_since_contact:.1f}s ago"
    log.info(
        "replica of %s: version %d, primary at %d, lag %d versions (max %d), last heard %s; %s%s",
        status.primary,
        status.applied_version,
        status.primary_version,
        status.lag,
        replica.config.max_lag,
        contact,
        "serving" if status.serving else "NOT serving",
        f" ({status.problem})" if status.problem else "",
    )


def check_port_file(port_file: Path | None) -> None:
    """InvalidArgumentError unless the port file can be written where it is asked for (checked
    before serving, not found out once the daemon is up)."""
    if port_file is None:
        return
    parent = port_file.parent
    if not parent.is_dir():
        raise InvalidArgumentError(f"cannot write the port file {port_file}: the directory {parent} does not exist")
    if port_file.is_dir():
        raise InvalidArgumentError(f"cannot write the port file {port_file}: it is a directory")


def write_port_file(port_file: Path, port: int) -> None:
    """Write the bound port whole (temp file, rename): a reader never sees an empty or partial file."""
    partial = port_file.with_name(f".{port_file.name}.partial")
    try:
        partial.write_text(f"{port}\n")
        partial.replace(port_file)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write the port file {port_file}: {exc.strerror}") from None


def _serve_metrics(metrics: DaemonMetrics, port: int, host: str) -> int:
    """Start the metrics HTTP server; its port, or InvalidArgumentError saying why it cannot listen."""
    try:
        return metrics.serve_http(port, host.strip("[]"))
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror}; choose another --metrics-port (0: a free one)"
        ) from None


# How often the main thread wakes while serving, so that it runs a signal's handler (see below).
_SIGNAL_POLL_S = 0.2


def _wait_for_signal(stop: threading.Event, seconds: float) -> bool:
    """`stop.wait(seconds)`, waking every _SIGNAL_POLL_S: Python runs a signal's handler only in the
    main thread, once that thread runs again. A SIGTERM the kernel hands to one of gRPC's threads
    (as after the daemon was stopped and continued) would otherwise wait out the whole interval."""
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        stop.wait(min(left, _SIGNAL_POLL_S))
    return True
