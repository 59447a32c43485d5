"""The gRPC service: a thin servicer over `memstore.live`, plus health and reflection.

The servicer only translates messages to plain types and back; everything it calls is
tested without gRPC. `create_server` builds a server without starting it;
`memstore.daemon.serve` runs one until SIGTERM/SIGINT, then drains in-flight calls and returns 0.

Replication (docs/replication.md): any trainable daemon streams its pushes to followers
(`Follow`); `serve` of a DaemonConfig with a `primary` runs a read replica (memstore.replica).
Replicas report the version they hold durably (`ConfirmDurable`); with `--sync-replicas` a Push
is answered only once enough of them hold it (memstore.sync), waiting without a work slot. gRPC's sync
server runs every call, streams included, on a thread, and a Follow stream holds its thread for
as long as the follower stays: a follower beyond `ServerConfig.max_followers` gets
RESOURCE_EXHAUSTED, and Follow streams take no work slot, so they never take what lookups and
pushes need.

Lookups' rows for clients on other hosts go over the data plane (memstore.dataplane), which
`create_server` opens beside gRPC: Describe offers it, OpenDataPlane hands out its tickets.

Every call passes memstore.guard first (the token check of memstore.auth before its request is
read, read and send deadlines, per-peer and concurrency limits, `max_workers` work slots), is
parsed there so a malformed message gets INVALID_ARGUMENT, and is counted and timed
(memstore.metrics) and checked against the limits (memstore.limits); docs/operations.md.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memstore import __version__
from memstore.auth import TokenInterceptor, TokenTable
from memstore.codec import check_request_rows, decode_grads, decode_row_ids
from memstore.daemon_config import (
    MAX_HEARTBEAT_S,
    MIN_HEARTBEAT_S,
    ServerConfig,
    check_listen_address,
)
from memstore.dataplane.server import DataPlaneLimits, DataPlaneServer
from memstore.errors import (
    RETRY_PUSHBACK_KEY,
    InternalError,
    InvalidArgumentError,
    LayoutMismatchError,
    MemstoreError,
    ReadOnlyError,
    ReplicationGapError,
    ResourceExhaustedError,
    UnavailableError,
)
from memstore.guard import REQUEST_BYTES, CallGuard, GuardConfig, StreamSlots, idle_work_slot
from memstore.limits import InFlightBudget, lookup_cost, push_cost
from memstore.live import LiveTable
from memstore.metrics import DaemonMetrics
from memstore.replica import Follower, check_follower_manifest, check_same_history
from memstore.reseed import chunk_size, snapshot_chunks
from memstore.rowwatch import check_watch_layers, row_watch_slots, rows_after
from memstore.same_host import advertise
from memstore.snapshots import SnapshotSlots, check_snapshot_name
from memstore.sync import SyncTimeoutPolicy
from memstore.table import Table
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

log = logging.getLogger("memstore.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Memstore"].full_name
_SYNC_POLICIES = {
    SyncTimeoutPolicy.FAIL: pb.SYNC_TIMEOUT_POLICY_FAIL,
    SyncTimeoutPolicy.DEGRADE: pb.SYNC_TIMEOUT_POLICY_DEGRADE,
}
# Characters of a replica id a durability report may carry (a host name and a path).
MAX_REPLICA_ID_CHARS = 1024


# Threads beyond the admitted calls, for the refusals of calls past them (each brief).
_SPARE_THREADS = 8


def follower_slots(limit: int) -> StreamSlots:
    """The Follow streams in progress, at most `limit` (--max-followers) at once."""
    return StreamSlots(
        limit,
        lambda follower, limit: (
            f"follower {follower!r} refused: this daemon already streams to {limit} followers "
            "(--max-followers); follow another replica, or raise --max-followers here"
        ),
    )


class MemstoreServicer(pb_grpc.MemstoreServicer):
    """Translates RPCs to `LiveTable` calls and project errors to status codes, counting each call."""

    def __init__(
        self,
        live: LiveTable,
        config: ServerConfig,
        metrics: DaemonMetrics,
        replica: Follower | None = None,
        *,
        budget: InFlightBudget | None = None,
        data_plane: DataPlaneServer | None = None,
    ) -> None:
        self._live = live
        self._config = config
        self._metrics = metrics
        self._replica = replica
        self.followers = follower_slots(config.max_followers)
        self.row_watchers = row_watch_slots(config.max_row_watchers)
        self.budget = budget or InFlightBudget(config.max_in_flight_bytes)
        self._data_plane = data_plane
        manifest = live.manifest
        self._row_bytes = manifest.dtype.row_bytes(manifest.layout.dim)
        self._chunk_rows = max(1, config.chunk_bytes // self._row_bytes)
        optimizer = manifest.optimizer
        self._state_width = 0 if optimizer is None else sum(optimizer.state_slots(manifest.layout.dim).values())
        self._snapshot_dir = config.snapshot_dir or live.path.with_name(live.path.name + ".snapshots")
        self._snapshot_slots = SnapshotSlots(self._snapshot_dir, config.max_snapshots)
        self._describe = pb.DescribeResponse(
            manifest_json=manifest.to_json(),
            fingerprint=manifest.fingerprint,
            limits=pb.ServerLimits(
                max_rows_per_request=config.max_rows_per_request,
                chunk_bytes=self._chunk_rows * self._row_bytes,
                max_message_bytes=config.max_message_bytes,
                max_concurrent_calls=config.max_concurrent_calls,
                max_in_flight_bytes=config.max_in_flight_bytes,
            ),
            server_version=__version__,
            # None: not offered
            same_host=advertise(live.table, live.seqlock, live.row_cache) if config.same_host else None,
            trainable=live.accepts_pushes,
            data_plane=None if data_plane is None else data_plane.offer(),
        )

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        with self._call("Describe", context):
            response = pb.DescribeResponse()
            response.CopyFrom(self._describe)
            response.version = self._live.version
            response.trainable = self._live.accepts_pushes  # a replica promoted by an election takes pushes
            response.replication.CopyFrom(self._replication())
            return response

    def _replication(self) -> pb.Replication:
        sync = self._live.sync
        reports = [
            pb.ReplicaDurability(
                replica_id=report.replica_id,
                durable_version=report.durable_version,
                seconds_since_report=report.seconds_since_report,
            )
            for report in sync.replicas()
        ]
        described = pb.Replication(
            sync_replicas=sync.config.replicas,
            sync_timeout_policy=_SYNC_POLICIES[sync.config.policy],
            acknowledged_version=sync.acknowledged_version,
            sync_degraded=sync.degraded,
            replicas=reports,
        )
        described.MergeFrom(self._role())
        described.epoch = self._live.epoch
        described.election_state = self._live.election_state
        return described

    def _role(self) -> pb.Replication:
        followers = self.followers.active
        if self._replica is None or self._live.primary is None:  # a primary, or a replica promoted by an election
            version = self._live.version
            role = pb.REPLICATION_ROLE_PRIMARY if followers else pb.REPLICATION_ROLE_STANDALONE
            return pb.Replication(
                role=role, applied_version=version, primary_version=version, followers=followers, serving=True
            )
        status = self._replica.status()
        return pb.Replication(
            role=pb.REPLICATION_ROLE_REPLICA,
            primary_address=status.primary,
            applied_version=status.applied_version,
            primary_version=status.primary_version,
            lag_versions=status.lag,
            seconds_since_contact=status.seconds_since_contact,
            followers=followers,
            serving=status.serving,
            problem=status.problem,
        )

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> Iterator[pb.LookupResponse]:
        with self._call("Lookup", context):
            if self._replica is not None and self._live.primary is not None:
                self._replica.check_readable()  # UNAVAILABLE beyond the lag bound: clients retry elsewhere
            ids = decode_row_ids(request.row_ids)
            check_request_rows(len(ids), self._config.max_rows_per_request)
            cost = lookup_cost(
                len(ids), self._row_bytes, self._chunk_rows, self._config.window_bytes, REQUEST_BYTES.get()
            )
            with self.budget.reserve(cost, f"a lookup of {len(ids):,} rows"):
                chunks = self._live.gather_chunks(request.layer_id, ids, self._chunk_rows)
                first = next(chunks, None)  # every id is checked here, before any row is sent
                header = {
                    "dtype": self._live.manifest.dtype.wire,
                    "dim": self._live.manifest.layout.dim,
                    "num_rows": len(ids),
                }
                if first is None:
                    yield pb.LookupResponse(**header, version=self._live.version)
                    return
                offset = 0
                for rows, version in itertools.chain([first], chunks):
                    yield pb.LookupResponse(**header, row_offset=offset, rows=rows.tobytes(), version=version)
                    offset += len(rows)
            self._metrics.rows_served.inc(len(ids))
            self._metrics.bytes_served.inc(len(ids) * self._row_bytes)

    def Push(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushResponse:
        with self._call("Push", context):
            ids = decode_row_ids(request.row_ids)
            check_request_rows(len(ids), self._config.max_rows_per_request)
            dim = self._live.manifest.layout.dim
            with self.budget.reserve(
                push_cost(len(ids), dim, self._state_width, REQUEST_BYTES.get()), f"a push of {len(ids):,} rows"
            ):
                grads = decode_grads(request.grads, len(ids), dim)
                result = self._live.push(
                    request.layer_id,
                    ids,
                    grads,
                    lr_scale=request.lr_scale if request.HasField("lr_scale") else 1.0,
                    step_id=request.step_id,
                    client_id=request.client_id,
                    acknowledge=False,
                )
            self._metrics.pushes.inc()
            self._metrics.pushed_rows.inc(result.rows)
            self._acknowledge(result.version, context)
            return pb.PushResponse(version=result.version, layer_step=result.layer_step)

    def _acknowledge(self, version: int, context: grpc.ServicerContext) -> None:
        """Wait, holding no work slot, until the push of `version` may be acknowledged (--sync-replicas),
        within the call's deadline."""
        sync = self._live.sync
        if not sync.config.enabled:
            sync.acknowledge(version)
            return
        start = time.perf_counter()
        try:
            with idle_work_slot():  # lookups and other pushes go on while this one waits
                sync.acknowledge(version, context.time_remaining())
        finally:
            self._metrics.sync_wait.observe(time.perf_counter() - start)

    def ConfirmDurable(
        self, request: pb.ConfirmDurableRequest, context: grpc.ServicerContext
    ) -> pb.ConfirmDurableResponse:
        with self._call("ConfirmDurable", context):
            replica = request.replica_id
            if not replica or len(replica) > MAX_REPLICA_ID_CHARS:
                raise InvalidArgumentError(
                    f"a durability report needs a replica_id of 1 to {MAX_REPLICA_ID_CHARS} characters; "
                    f"got {len(replica)}"
                )
            if request.fingerprint != self._live.manifest.fingerprint:
                raise LayoutMismatchError(
                    f"replica {replica!r} reports on a table of fingerprint {request.fingerprint[:64]!r}, not this "
                    f"daemon's ({self._live.manifest.fingerprint}); its reports are not counted"
                )
            version = self._live.version
            if request.durable_version > version:
                raise ReplicationGapError(
                    f"replica {replica!r} reports holding version {request.durable_version}, past this daemon's "
                    f"version {version}: it holds pushes it did not get from here, so its reports are not counted; "
                    "replace its table with a snapshot of this one"
                )
            self._live.sync.confirm(replica, request.durable_version)
            return pb.ConfirmDurableResponse(version=version)

    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotResponse:
        with self._call("Snapshot", context):
            if self._live.table.read_only:
                raise ReadOnlyError(
                    "snapshots are refused: this daemon serves its table read-only (--read-only, or a frozen "
                    "table) and writes nothing on its host; snapshot the primary, or copy the directory"
                )
            check_snapshot_name(request.name)  # before anything is logged or created: the name is the client's
            dest = self._snapshot_dir / request.name
            with self._snapshot_slots.held():
                version = self._live.snapshot(dest)
            log.info("snapshot of version %d written to %s", version, dest)
            return pb.SnapshotResponse(path=str(dest.resolve()), version=version)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        with self._call("Stats", context):
            return pb.StatsResponse(prometheus_text=self._metrics.text().decode())

    def OpenDataPlane(
        self, request: pb.OpenDataPlaneRequest, context: grpc.ServicerContext
    ) -> pb.OpenDataPlaneResponse:
        with self._call("OpenDataPlane", context):
            if self._data_plane is None:
                raise UnavailableError("this daemon serves no data plane (--no-data-plane): look rows up over gRPC")
            tickets = self._data_plane.tickets
            return pb.OpenDataPlaneResponse(ticket=tickets.issue(), expires_in_s=tickets.lifetime_s)

    def Follow(self, request: pb.FollowRequest, context: grpc.ServicerContext) -> Iterator[pb.FollowResponse]:
        follower = request.follower_id or context.peer()
        with self._call("Follow", context):
            check_follower_manifest(request.manifest_json, self._live.manifest, f"follower {follower}", "this daemon")
            check_same_history(self._live, request.from_version, request.last_record_sha256, f"follower {follower}")
            heartbeat_s = request.heartbeat_s or self._config.follow_heartbeat_s
            if not MIN_HEARTBEAT_S <= heartbeat_s <= MAX_HEARTBEAT_S:
                raise InvalidArgumentError(
                    f"heartbeat_s must be in [{MIN_HEARTBEAT_S}, {MAX_HEARTBEAT_S}] seconds; got {heartbeat_s}"
                )
            self.followers.acquire(follower)
            if not context.add_callback(self.followers.release):  # released when the stream ends, however it ends
                self.followers.release()
                return
            version = request.from_version
            if request.epoch > self._live.epoch and self._live.primary is None and self._live.fence is not None:
                raise UnavailableError(
                    f"follower {follower!r} knows leader epoch {request.epoch}, past this daemon's {self._live.epoch}: "
                    "another daemon was elected; follow the shard's leader"
                )
            log.info(
                "follower %r streams from version %d (this daemon is at %d)", follower, version, self._live.version
            )
            while context.is_active():
                try:
                    records = self._live.records_after(version, self._config.follow_batch_bytes, heartbeat_s)
                except UnavailableError:  # this daemon is stopping: the follower reconnects later
                    log.info("follower %r at version %d: this daemon is stopping", follower, version)
                    raise
                except MemstoreError as exc:  # too far behind, or diverged: worth a line here too
                    log.warning("follower %r at version %d: %s", follower, version, exc)
                    raise
                if records and self._live.fence is not None:
                    self._live.fence()  # a deposed primary streams nothing more (UNAVAILABLE)
                response = pb.FollowResponse(primary_version=self._live.version, epoch=self._live.epoch)
                for record in records:
                    # Added in place: a ReplicatedRecord built first would be copied once more on the way in
                    # (measured: 1.4 instead of 2.2 ms per 1.35 MB record).
                    response.records.add(version=record.version, payload=record.payload)
                yield response
                if records:
                    version = records[-1].version
            log.info("follower %r left at version %d", follower, version)

    def StreamSnapshot(
        self, request: pb.StreamSnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SnapshotChunk]:
        receiver = request.follower_id[:200] or context.peer()
        with self._call("StreamSnapshot", context):
            if self._live.table.read_only:
                raise ReadOnlyError(
                    "a streamed snapshot is refused: this daemon serves its table read-only (--read-only, or a "
                    "frozen table) and writes nothing on its host; stream from the primary, or copy the directory"
                )
            self.followers.acquire(receiver)  # a re-seed holds a thread as long as a follower does
            if not context.add_callback(self.followers.release):
                self.followers.release()
                return
            log.info("streaming a snapshot to %r", receiver)
            chunk_bytes = chunk_size(request.chunk_bytes, self._config.max_message_bytes)
            yield from snapshot_chunks(self._live, self._snapshot_dir, chunk_bytes)
            log.info("streamed a snapshot to %r", receiver)

    def WatchRows(self, request: pb.WatchRowsRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchRowsResponse]:
        with self._call("WatchRows", context):
            layers = check_watch_layers(self._live.manifest, request.layer_ids)
            heartbeat_s = request.heartbeat_s or self._config.follow_heartbeat_s
            if not MIN_HEARTBEAT_S <= heartbeat_s <= MAX_HEARTBEAT_S:
                raise InvalidArgumentError(
                    f"heartbeat_s must be in [{MIN_HEARTBEAT_S}, {MAX_HEARTBEAT_S}] seconds; got {heartbeat_s}"
                )
            self.row_watchers.acquire(context.peer())
            if not context.add_callback(self.row_watchers.release):  # released however the stream ends
                self.row_watchers.release()
                return
            version = request.from_version
            while context.is_active():
                batch = rows_after(
                    self._live, version, layers, self._config.follow_batch_bytes, heartbeat_s, context.is_active
                )
                response = pb.WatchRowsResponse(through_version=batch.through, table_version=self._live.version)
                for change in batch.changes:
                    response.changes.add(
                        version=change.version,
                        layer_id=change.layer_id,
                        row_ids=change.ids.astype("<i8", copy=False).tobytes(),
                        rows=change.rows.tobytes(),
                    )
                yield response
                version = batch.through

    @contextlib.contextmanager
    def _call(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Count and time one call, and turn what it raises into its status code."""
        with self._metrics.observe(method) as outcome:
            try:
                yield
            except MemstoreError as exc:
                outcome.code = exc.code
                if isinstance(exc, ResourceExhaustedError):
                    self._refuse(exc, context)
                context.abort(exc.code, str(exc))
            except GeneratorExit:  # the client cancelled a stream, or went away
                outcome.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # never crash a worker; report it precisely instead
                outcome.code = InternalError.code
                log.exception("call failed unexpectedly")
                context.abort(InternalError.code, f"internal error: {exc!r}")

    def _refuse(self, exc: ResourceExhaustedError, context: grpc.ServicerContext) -> None:
        """Tell gRPC's retry policy whether to repeat a refused call (pushback -1: never)."""
        busy = exc.retry_after_s is not None
        self._metrics.rejected.labels("busy" if busy else "too_large").inc()
        pushback = round(exc.retry_after_s * 1000) if busy else -1
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(pushback)),))


def create_server(
    table: Table | LiveTable,
    address: str = "127.0.0.1:0",
    config: ServerConfig | None = None,
    health_servicer: health.HealthServicer | None = None,
    metrics: DaemonMetrics | None = None,
    replica: Follower | None = None,
) -> tuple[grpc.Server, int]:
    """A gRPC server (not started) serving `table`, with health and reflection; returns it and its port.

    A plain `Table` is served frozen; a `LiveTable` opened writable with an optimizer takes pushes.
    With `replica` (the Follower of a replica table), lookups and health follow its lag bound.
    `config.tls` makes it listen with TLS, `config.token_file` asks every call for a token.
    Beside it, unless `config.data_plane` is None, the data plane (memstore.dataplane) accepts
    connections at once and closes when the server stops (`server.data_plane`).
    """
    config = config or ServerConfig()
    live = table if isinstance(table, LiveTable) else LiveTable(table)
    metrics = metrics or DaemonMetrics()
    # Every admitted call gets a thread at once (one waiting for its request or for a slow reader
    # holds no more than that: the work itself runs in max_workers slots, memstore.guard), Follow
    # streams hold theirs for their whole life, and a few more serve health checks and refusals.
    admitted = config.max_concurrent_calls + config.max_followers + config.max_row_watchers
    pool = futures.ThreadPoolExecutor(max_workers=admitted + _SPARE_THREADS)
    check = (
        None
        if config.token_file is None
        else TokenInterceptor(TokenTable.from_file(config.token_file), metrics.auth_refused_call)
    )
    guard = CallGuard(
        GuardConfig(
            service=SERVICE_NAME,
            max_workers=config.max_workers,
            max_calls=config.max_concurrent_calls,
            # Follow streams past max_followers get the servicer's own refusal; these stop a flood.
            max_untimed=config.max_followers + config.max_row_watchers + _SPARE_THREADS,
            untimed_methods=frozenset({"Follow", "WatchRows", "StreamSnapshot"}),
            request_timeout_s=config.request_timeout_s,
            send_timeout_s=config.send_timeout_s,
            max_calls_per_peer=config.max_calls_per_peer,
            max_watch_streams=config.max_watch_streams,
        ),
        check,
        lambda method, exc: _count_refusal(metrics, method, exc),
    )
    server = grpc.server(
        pool,
        options=config.grpc_options(),
        interceptors=[guard],
        # No maximum_concurrent_rpcs: it counted health Watch streams and silent health checks with
        # the table's calls, so they could lock those out. The guard admits max_concurrent_calls and
        # max_followers of ours, max_watch_streams Watch streams; health and reflection have their own threads.
    )
    server.guard = guard  # type: ignore[attr-defined]  # for tests and metrics: watchdog, peers
    budget = InFlightBudget(config.max_in_flight_bytes)
    check_listen_address(address)
    data_plane = _data_plane(live, address, config, budget, guard, metrics, replica)
    server.data_plane = data_plane  # type: ignore[attr-defined]  # for the daemon's log line and tests
    servicer = MemstoreServicer(live, config, metrics, replica, budget=budget, data_plane=data_plane)
    pb_grpc.add_MemstoreServicer_to_server(servicer, server)
    metrics.track(live, servicer.budget, replica)
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if replica is not None:
        replica.add_health_listener(lambda serving: _set_health(health_servicer, serving and _intact(live)))
    live.add_failure_listener(lambda _message: _set_health(health_servicer, False))  # it cannot write safely
    if live.integrity is not None:  # damaged rows found (on read or by the scrub): NOT_SERVING for good
        live.integrity.add_damage_listener(lambda: _set_health(health_servicer, False))
        if not live.integrity.intact:
            _set_health(health_servicer, False)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if config.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, config.tls.server_credentials())
    except RuntimeError:
        if data_plane is not None:
            data_plane.close()
        raise InvalidArgumentError(
            f"cannot listen on {address}: the port is in use (another daemon serving there?) or the host is not "
            "an address of this machine; stop what holds the port or choose another (port 0 picks a free one)"
        ) from None
    if data_plane is not None:
        metrics.data_plane_connections.set_function(lambda: data_plane.connections)
        data_plane.start()
        threading.Thread(
            target=_close_with, args=(server, data_plane), name="memstore-data-plane-stop", daemon=True
        ).start()
    return server, port


def _data_plane(
    live: LiveTable,
    address: str,
    config: ServerConfig,
    budget: InFlightBudget,
    guard: CallGuard,
    metrics: DaemonMetrics,
    replica: Follower | None,
) -> DataPlaneServer | None:
    """The data plane beside a server listening on `address` (bound, not yet accepting), sharing its budget,
    work slots, peer limits, metrics and TLS; None when turned off or beside a Unix socket without a TCP address."""
    tcp_host = None if address.startswith(("unix:", "unix-abstract:", "vsock:")) else address.rpartition(":")[0]
    if config.data_plane is None or not (tcp_host or config.data_plane.listen):
        return None
    return DataPlaneServer(
        live,
        config.data_plane,
        DataPlaneLimits(config.max_rows_per_request, config.request_timeout_s, config.send_timeout_s),
        host=(tcp_host or "").strip("[]"),
        budget=budget,
        guard=guard,
        metrics=metrics,
        tls=None if config.tls is None else config.tls.ssl_context(),
        replica=replica,
    )


def _close_with(server: grpc.Server, data_plane: DataPlaneServer) -> None:
    """Close the data plane once the gRPC server has stopped (whoever stopped it)."""
    server.wait_for_termination()
    data_plane.close()


def _count_refusal(metrics: DaemonMetrics, method: str, exc: MemstoreError) -> None:
    """Count a call the guard refused before the servicer saw it, as the servicer counts its own."""
    metrics.requests.labels(method, exc.code.name).inc()
    if isinstance(exc, ResourceExhaustedError):
        metrics.rejected.labels("busy" if exc.retry_after_s is not None else "too_large").inc()


def _intact(live: LiveTable) -> bool:
    return live.integrity is None or live.integrity.intact


def _set_health(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)
