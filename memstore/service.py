"""The gRPC daemon: a thin servicer over `memstore.live`, plus health, reflection and serve().

The servicer only translates messages to plain types and back; everything it calls is
tested without gRPC. `create_server` builds a server without starting it; `serve` runs
one until SIGTERM/SIGINT, then drains in-flight calls and returns 0.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memstore import __version__
from memstore.codec import check_request_rows, decode_grads, decode_row_ids
from memstore.errors import InternalError, InvalidArgumentError, MemstoreError
from memstore.live import LiveConfig, LiveTable
from memstore.same_host import advertise
from memstore.table import Table
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

log = logging.getLogger("memstore.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Memstore"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Daemon settings; the defaults suit one host serving a few model replicas."""

    max_rows_per_request: int = 1 << 22
    # Row bytes per streamed message: large enough to amortise per-message costs, small
    # enough that gathering the next chunk overlaps sending this one (measured: 1 MiB).
    chunk_bytes: int = 1 << 20
    max_workers: int = 8
    # HTTP/2 flow-control window per stream; a small window stalls large responses.
    window_bytes: int = 16 << 20
    grace_s: float = 10.0
    log_interval_s: float = 60.0
    # Let clients on this host map the table's files read-only instead of streaming rows.
    same_host: bool = True
    # Where Snapshot writes (default: "<table>.snapshots" beside the table).
    snapshot_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("max_rows_per_request", "chunk_bytes", "max_workers", "window_bytes"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"ServerConfig.{name} must be at least 1; got {getattr(self, name)}")

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_rows_per_request * 8 + 1024),
            ("grpc.max_send_message_length", self.chunk_bytes + 1024),
            ("grpc.http2.lookahead_bytes", self.window_bytes),
        ]


class TrafficCounters:
    """Thread-safe counts since the last snapshot, for the periodic log line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.lookups = self.rows = self.bytes = self.errors = self.pushes = self.pushed_rows = 0

    def add_lookup(self, rows: int, nbytes: int) -> None:
        with self._lock:
            self.lookups += 1
            self.rows += rows
            self.bytes += nbytes

    def add_push(self, rows: int) -> None:
        with self._lock:
            self.pushes += 1
            self.pushed_rows += rows

    def add_error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot_and_reset(self) -> dict[str, int]:
        with self._lock:
            snap = {
                "lookups": self.lookups,
                "rows": self.rows,
                "bytes": self.bytes,
                "pushes": self.pushes,
                "pushed_rows": self.pushed_rows,
                "errors": self.errors,
            }
            self._reset()
        return snap


class MemstoreServicer(pb_grpc.MemstoreServicer):
    """Translates RPCs to `LiveTable` calls and project errors to status codes."""

    def __init__(self, live: LiveTable, config: ServerConfig, counters: TrafficCounters) -> None:
        self._live = live
        self._config = config
        self._counters = counters
        manifest = live.manifest
        self._row_bytes = manifest.dtype.row_bytes(manifest.layout.dim)
        self._chunk_rows = max(1, config.chunk_bytes // self._row_bytes)
        self._snapshot_dir = config.snapshot_dir or live.path.with_name(live.path.name + ".snapshots")
        self._describe = pb.DescribeResponse(
            manifest_json=manifest.to_json(),
            fingerprint=manifest.fingerprint,
            limits=pb.ServerLimits(
                max_rows_per_request=config.max_rows_per_request, chunk_bytes=self._chunk_rows * self._row_bytes
            ),
            server_version=__version__,
            same_host=advertise(live) if config.same_host else None,  # None: not offered
            trainable=live.trainable,
        )

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        response = pb.DescribeResponse()
        response.CopyFrom(self._describe)
        response.version = self._live.version
        return response

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> Iterator[pb.LookupResponse]:
        with self._translate_errors(context):
            ids = decode_row_ids(request.row_ids)
            check_request_rows(len(ids), self._config.max_rows_per_request)
            chunks = self._live.gather_chunks(request.layer_id, ids, self._chunk_rows)
            first = next(chunks, None)  # every id is checked here, before any row is sent
        header = {"dtype": self._live.manifest.dtype.wire, "dim": self._live.manifest.layout.dim, "num_rows": len(ids)}
        if first is None:
            yield pb.LookupResponse(**header, version=self._live.version)
            return
        offset = 0
        with self._translate_errors(context):
            for rows, version in itertools.chain([first], chunks):
                yield pb.LookupResponse(**header, row_offset=offset, rows=rows.tobytes(), version=version)
                offset += len(rows)
        self._counters.add_lookup(len(ids), len(ids) * self._row_bytes)

    def Push(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushResponse:
        with self._translate_errors(context):
            ids = decode_row_ids(request.row_ids)
            check_request_rows(len(ids), self._config.max_rows_per_request)
            grads = decode_grads(request.grads, len(ids), self._live.manifest.layout.dim)
            result = self._live.push(
                request.layer_id,
                ids,
                grads,
                lr_scale=request.lr_scale if request.HasField("lr_scale") else 1.0,
                step_id=request.step_id,
                client_id=request.client_id,
            )
            self._counters.add_push(result.rows)
            return pb.PushResponse(version=result.version, layer_step=result.layer_step)

    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotResponse:
        with self._translate_errors(context):
            name = request.name
            if not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
                raise InvalidArgumentError(
                    f"snapshot name {name!r} must be a plain directory name (no separators, not hidden)"
                )
            dest = self._snapshot_dir / name
            version = self._live.snapshot(dest)
            log.info("snapshot of version %d written to %s", version, dest)
            return pb.SnapshotResponse(path=str(dest.resolve()), version=version)

    @contextlib.contextmanager
    def _translate_errors(self, context: grpc.ServicerContext) -> Iterator[None]:
        try:
            yield
        except MemstoreError as exc:
            self._counters.add_error()
            context.abort(exc.code, str(exc))
        except Exception as exc:  # never crash a worker; report it precisely instead
            self._counters.add_error()
            log.exception("call failed unexpectedly")
            context.abort(InternalError.code, f"internal error: {exc!r}")


def create_server(
    table: Table | LiveTable,
    address: str = "127.0.0.1:0",
    config: ServerConfig | None = None,
    health_servicer: health.HealthServicer | None = None,
    counters: TrafficCounters | None = None,
) -> tuple[grpc.Server, int]:
    """A gRPC server (not started) serving `table`, with health and reflection; returns it and its port.

    A plain `Table` is served frozen; a `LiveTable` opened writable with an optimizer takes pushes.
    """
    config = config or ServerConfig()
    live = table if isinstance(table, LiveTable) else LiveTable(table)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers), options=config.grpc_options())
    pb_grpc.add_MemstoreServicer_to_server(MemstoreServicer(live, config, counters or TrafficCounters()), server)
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"cannot listen on {address}: {exc}") from None
    return server, port


def serve(
    table_path: Path,
    address: str = "127.0.0.1:50051",
    config: ServerConfig | None = None,
    port_file: Path | None = None,
    read_only: bool = False,
    live_config: LiveConfig | None = None,
) -> int:
    """Serve a table until SIGTERM or SIGINT, then drain in-flight calls; returns the exit code 0.

    A table with an optimizer takes pushes unless `read_only` (e.g. a snapshot serving inference).
    """
    config = config or ServerConfig()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    table = LiveTable.open(table_path, read_only=read_only, config=live_config)
    health_servicer = health.HealthServicer()
    counters = TrafficCounters()
    try:
        server, port = create_server(table, address, config, health_servicer, counters)
        server.start()
        layout = table.manifest.layout
        host = address.rsplit(":", 1)[0]
        log.info(
            "serving %s on %s:%d (%s, version %d): layers %s, %d rows x %d %s, %.2f GB, fingerprint %s",
            table_path,
            host,
            port,
            f"trainable, {table.manifest.optimizer.kind.value}, {table.config.durability.value} durability"
            if table.trainable
            else "frozen",
            table.version,
            list(layout.layer_ids),
            layout.total_rows,
            layout.dim,
            table.manifest.dtype.value,
            table.manifest.total_bytes / 1e9,
            table.manifest.fingerprint,
        )
        if port_file is not None:
            port_file.write_text(f"{port}\n")
        while not stop.wait(config.log_interval_s):
            snap = counters.snapshot_and_reset()
            log.info(
                "last %.0fs: %d lookups, %d rows, %.1f MB; %d pushes, %d rows, version %d; %d errors",
                config.log_interval_s,
                snap["lookups"],
                snap["rows"],
                snap["bytes"] / 1e6,
                snap["pushes"],
                snap["pushed_rows"],
                table.version,
                snap["errors"],
            )
        log.info("stopping: draining in-flight calls (up to %.0fs)", config.grace_s)
        health_servicer.enter_graceful_shutdown()
        server.stop(config.grace_s).wait()
        log.info("stopped")
    finally:
        table.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
