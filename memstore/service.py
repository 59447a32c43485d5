"""The gRPC daemon: a thin servicer over `memstore.table`, plus health, reflection and serve().

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
from memstore.codec import check_request_rows, decode_row_ids
from memstore.errors import InternalError, InvalidArgumentError, MemstoreError
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
        self.lookups = self.rows = self.bytes = self.errors = 0

    def add_lookup(self, rows: int, nbytes: int) -> None:
        with self._lock:
            self.lookups += 1
            self.rows += rows
            self.bytes += nbytes

    def add_error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot_and_reset(self) -> dict[str, int]:
        with self._lock:
            snap = {"lookups": self.lookups, "rows": self.rows, "bytes": self.bytes, "errors": self.errors}
            self._reset()
        return snap


class MemstoreServicer(pb_grpc.MemstoreServicer):
    """Translates RPCs to `Table` calls and project errors to status codes."""

    def __init__(self, table: Table, config: ServerConfig, counters: TrafficCounters) -> None:
        self._table = table
        self._config = config
        self._counters = counters
        manifest = table.manifest
        self._row_bytes = manifest.layout.dim * manifest.dtype.itemsize
        self._chunk_rows = max(1, config.chunk_bytes // self._row_bytes)
        self._describe = pb.DescribeResponse(
            manifest_json=manifest.to_json(),
            fingerprint=manifest.fingerprint,
            limits=pb.ServerLimits(
                max_rows_per_request=config.max_rows_per_request, chunk_bytes=self._chunk_rows * self._row_bytes
            ),
            server_version=__version__,
            same_host=advertise(table) if config.same_host else None,
        )

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        return self._describe

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> Iterator[pb.LookupResponse]:
        with self._translate_errors(context):
            ids = decode_row_ids(request.row_ids)
            check_request_rows(len(ids), self._config.max_rows_per_request)
            chunks = self._table.gather_chunks(request.layer_id, ids, self._chunk_rows)
            first = next(chunks, None)  # every id is checked here, before any row is sent
        header = {
            "dtype": self._table.manifest.dtype.wire,
            "dim": self._table.manifest.layout.dim,
            "num_rows": len(ids),
        }
        if first is None:
            yield pb.LookupResponse(**header)
            return
        offset = 0
        with self._translate_errors(context):
            for chunk in itertools.chain([first], chunks):
                yield pb.LookupResponse(**header, row_offset=offset, rows=chunk.tobytes())
                offset += len(chunk)
        self._counters.add_lookup(len(ids), len(ids) * self._row_bytes)

    @contextlib.contextmanager
    def _translate_errors(self, context: grpc.ServicerContext) -> Iterator[None]:
        try:
            yield
        except MemstoreError as exc:
            self._counters.add_error()
            context.abort(exc.code, str(exc))
        except Exception as exc:  # never crash a worker; report it precisely instead
            self._counters.add_error()
            log.exception("lookup failed unexpectedly")
            context.abort(InternalError.code, f"internal error: {exc!r}")


def create_server(
    table: Table,
    address: str = "127.0.0.1:0",
    config: ServerConfig | None = None,
    health_servicer: health.HealthServicer | None = None,
    counters: TrafficCounters | None = None,
) -> tuple[grpc.Server, int]:
    """A gRPC server (not started) serving `table`, with health and reflection; returns it and its port."""
    config = config or ServerConfig()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers), options=config.grpc_options())
    pb_grpc.add_MemstoreServicer_to_server(MemstoreServicer(table, config, counters or TrafficCounters()), server)
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
) -> int:
    """Serve a table until SIGTERM or SIGINT, then drain in-flight calls; returns the exit code 0."""
    config = config or ServerConfig()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    table = Table.open(table_path, read_only=True)
    health_servicer = health.HealthServicer()
    counters = TrafficCounters()
    try:
        server, port = create_server(table, address, config, health_servicer, counters)
        server.start()
        layout = table.manifest.layout
        host = address.rsplit(":", 1)[0]
        log.info(
            "serving %s on %s:%d: layers %s, %d rows x %d %s, %.2f GB, fingerprint %s",
            table_path,
            host,
            port,
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
                "last %.0fs: %d lookups, %d rows, %.1f MB, %d errors",
                config.log_interval_s,
                snap["lookups"],
                snap["rows"],
                snap["bytes"] / 1e6,
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
