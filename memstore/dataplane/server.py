"""The daemon's data-plane listener: lookups answered with raw rows over framed TCP (or TLS).

One thread per connection; a connection carries one lookup at a time (a client opens one per
concurrent call). Every lookup gets the gRPC path's guarantees, from the same objects:

- the ticket from OpenDataPlane (memstore.dataplane.tickets), checked at HELLO; a connection is
  refused its next lookup once the ticket expired, and closed when it idles past the expiry;
- the same checks and errors as the Lookup RPC (ids, limits, a lagging replica), sent as an
  ERROR frame with the gRPC status code, before any row when the request itself is wrong;
- the daemon's in-flight budget, its per-peer call limit and its `max_workers` work slots (taken
  while a chunk is gathered, not while it waits for the client), the request's own deadline;
- rows read under the table's sequence lock chunk by chunk, each chunk with its version, as gRPC;
- `request_timeout_s` for a request to arrive once started, `send_timeout_s` for the client to take
  each chunk: a peer that stalls or dies loses its connection and gives back all it held;
- calls counted and timed as `DataPlaneLookup` in the daemon's metrics, rows and bytes with gRPC's.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np

from memstore.codec import check_request_rows
from memstore.daemon_config import DataPlaneConfig, has_port
from memstore.dataplane import frames
from memstore.dataplane.tickets import TicketIssuer
from memstore.errors import (
    DataLossError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    MemstoreError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from memstore.guard import CallGuard
from memstore.limits import BUSY_RETRY_MS, InFlightBudget, lookup_cost
from memstore.live import LiveTable
from memstore.metrics import DaemonMetrics
from memstore.replica import Follower
from memstore.wire import memstore_pb2 as pb

log = logging.getLogger("memstore.dataplane")

METHOD = "DataPlaneLookup"  # its label in the daemon's metrics
# Socket buffers asked for (the kernel caps them at net.core.{w,r}mem_max): a chunk in flight
# while the next is gathered.
_SOCKET_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class DataPlaneLimits:
    """What the gRPC server's config bounds for the data plane too."""

    max_rows_per_request: int
    request_timeout_s: float
    send_timeout_s: float


class DataPlaneServer:
    """Listens for data-plane connections and serves their lookups until `close()`."""

    def __init__(
        self,
        live: LiveTable,
        config: DataPlaneConfig,
        limits: DataPlaneLimits,
        *,
        host: str,
        budget: InFlightBudget,
        guard: CallGuard,
        metrics: DaemonMetrics,
        tls: ssl.SSLContext | None = None,
        replica: Follower | None = None,
    ) -> None:
        self._live = live
        self._config = config
        self._limits = limits
        self._budget = budget
        self._guard = guard
        self._metrics = metrics
        self._tls = tls
        self._replica = replica
        self.tickets = TicketIssuer(config.ticket_s)
        manifest = live.manifest
        self._width = manifest.dtype.stored_width(manifest.layout.dim)
        self._row_bytes = manifest.dtype.row_bytes(manifest.layout.dim)
        self._chunk_rows = max(1, config.chunk_bytes // self._row_bytes)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closed = False
        self._draining = False
        listen_host, port = _split(config.listen) if config.listen else (host, 0)
        try:
            self._listener = socket.create_server(
                (listen_host, port), family=_family(listen_host), backlog=config.max_connections
            )
        except OSError as exc:
            raise InvalidArgumentError(
                f"cannot listen for the data plane on {listen_host}:{port}: {exc.strerror or exc}; choose another "
                "--data-plane-listen (port 0 picks a free one), or serve with --no-data-plane"
            ) from None
        self.port = self._listener.getsockname()[1]
        # Told to clients when it is one address (not a wildcard): a client reaches each daemon its gRPC target
        # names (a shard's replicas, an ipv4: list) at the address that daemon gives.
        self._own_host = "" if listen_host in ("", "0.0.0.0", "::") else listen_host
        self._acceptor = threading.Thread(target=self._accept, name="memstore-data-plane", daemon=True)

    def start(self) -> None:
        """Accept connections (on a thread of its own)."""
        self._acceptor.start()

    def offer(self) -> pb.DataPlaneOffer:
        """What Describe tells clients."""
        host, port = _advertised(self._config.advertise, self.port)
        host = host or self._own_host
        return pb.DataPlaneOffer(port=port, host=host, tls=self._tls is not None, protocol=frames.PROTOCOL)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    def drain(self) -> None:
        """Take no more connections and refuse new lookups with UNAVAILABLE (the daemon is stopping: clients
        go elsewhere); lookups in progress finish, until `close()`."""
        with self._lock:
            self._draining = True
        frames.close_socket(self._listener)

    def close(self) -> None:
        """Stop listening and close every connection (a lookup in progress fails on the client's side)."""
        with self._lock:
            self._closed = True
            open_now = list(self._connections)
        frames.close_socket(self._listener)
        for sock in open_now:
            frames.close_socket(sock)

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refused = self._closed or len(self._connections) >= self._config.max_connections
                if not refused:
                    self._connections.add(sock)
            if refused:
                self._refuse_connection(sock)
                continue
            threading.Thread(
                target=self._serve, args=(sock, address), name="memstore-data-plane-conn", daemon=True
            ).start()

    def _refuse_connection(self, sock: socket.socket) -> None:
        busy = ResourceExhaustedError(
            f"this daemon already has {self._config.max_connections} data plane connections (--data-plane-max-"
            "connections): retry shortly, or raise the limit",
            retry_after_s=BUSY_RETRY_MS / 1000,
        )
        try:
            frames.set_timeout(sock, 1.0)
            sock.sendall(frames.pack_error(0, busy))
        except OSError:
            pass
        frames.close_socket(sock)

    def _serve(self, raw: socket.socket, address: tuple) -> None:
        sock = raw
        peer = f"ipv6:[{address[0]}]" if ":" in address[0] else f"ipv4:{address[0]}"
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
            raw.settimeout(self._limits.request_timeout_s)  # the TLS handshake's
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
                with self._lock:
                    self._connections.discard(raw)
                    self._connections.add(sock)
            frames.set_timeout(sock, self._limits.request_timeout_s)
            expiry = self._hello(sock)
            buffer = np.empty((min(self._chunk_rows, 1024), self._width), dtype=self._live.manifest.dtype.numpy)
            while True:
                header, payload = self._next_request(sock, expiry)
                if header is None:
                    return
                buffer = self._lookup(sock, header, payload, expiry, peer, buffer)
        except (OSError, EOFError, ssl.SSLError, DataLossError) as exc:
            log.debug("data plane connection from %s ended: %s", address[0], exc)
        except Exception:  # a bug here must not pass silently, nor take the daemon down
            log.exception("data plane connection from %s failed unexpectedly", address[0])
        finally:
            with self._lock:
                self._connections.discard(sock)
                self._connections.discard(raw)
            frames.close_socket(sock)

    def _hello(self, sock: socket.socket) -> float:
        """Check the HELLO's protocol and ticket, answer READY; the ticket's expiry."""
        header, payload = frames.recv_frame(sock)
        try:
            if header.kind is not frames.Kind.HELLO or header.fields[0] != frames.PROTOCOL:
                raise InvalidArgumentError(
                    f"a data plane connection starts with HELLO of protocol {frames.PROTOCOL}; got {header.kind.name}"
                    f" (protocol {header.fields[0]}): upgrade the client, or turn its data plane off"
                )
            expiry = self.tickets.check(payload)
        except MemstoreError as exc:
            self._metrics.auth_refused.labels(METHOD, "invalid").inc()
            sock.sendall(frames.pack_error(header.request_id, exc))
            raise EOFError("refused at HELLO") from None
        sock.sendall(frames.pack_ready(self._limits.max_rows_per_request))
        return expiry

    def _next_request(self, sock: socket.socket, expiry: float) -> tuple[frames.Header | None, bytes]:
        """The next LOOKUP (header, ids bytes); (None, b"") when the connection idled past its ticket."""
        head = bytearray(frames.HEADER_BYTES)
        frames.set_timeout(sock, max(0.001, expiry - time.monotonic()))
        try:
            frames.recv_exact(sock, memoryview(head)[:1])
        except TimeoutError:
            return None, b""
        frames.set_timeout(sock, self._limits.request_timeout_s)  # a started request arrives in time, or never
        frames.recv_exact(sock, memoryview(head)[1:])
        header = frames.parse_header(head)
        if header.kind is not frames.Kind.LOOKUP:
            raise DataLossError(f"a data plane client sent {header.kind.name} where a LOOKUP was due")
        payload = bytearray(header.payload_bytes)
        frames.recv_exact(sock, memoryview(payload))
        return header, payload

    def _lookup(
        self, sock: socket.socket, header: frames.Header, payload: bytes, expiry: float, peer: str, buffer: np.ndarray
    ) -> np.ndarray:
        """Answer one LOOKUP with ROWS frames, or an ERROR frame; the gather buffer to keep."""
        layer_id, num_ids, timeout_ms, _ = header.fields
        deadline = time.monotonic() + timeout_ms / 1000
        with self._metrics.observe(METHOD) as outcome:
            try:
                if time.monotonic() >= expiry:
                    raise UnauthenticatedError("the data plane ticket expired: ask OpenDataPlane for a new one")
                if self._draining:
                    raise UnavailableError("this daemon is stopping: look the rows up on another daemon")
                ids = frames.lookup_ids(header, payload)
                if self._replica is not None and self._live.primary is not None:
                    self._replica.check_readable()
                check_request_rows(num_ids, self._limits.max_rows_per_request)
                cost = lookup_cost(num_ids, self._row_bytes, self._chunk_rows, 0, len(payload))
                with self._peer_call(peer), self._budget.reserve(cost, f"a lookup of {num_ids:,} rows"):
                    if len(buffer) < min(num_ids, self._chunk_rows):
                        buffer = np.empty((min(num_ids, self._chunk_rows), self._width), dtype=buffer.dtype)
                    self._send_rows(sock, header.request_id, layer_id, ids, buffer, deadline)
            except MemstoreError as exc:
                outcome.code = exc.code
                if isinstance(exc, ResourceExhaustedError):
                    self._metrics.rejected.labels("busy" if exc.retry_after_s is not None else "too_large").inc()
                sock.sendall(frames.pack_error(header.request_id, exc))
                if isinstance(exc, UnauthenticatedError):
                    raise EOFError("ticket expired") from None
                return buffer
            except (OSError, EOFError):
                outcome.code = grpc.StatusCode.CANCELLED  # the client went away mid-answer
                raise
            except Exception as exc:  # never kill the connection's thread silently
                outcome.code = InternalError.code
                log.exception("data plane lookup failed unexpectedly")
                sock.sendall(frames.pack_error(header.request_id, InternalError(f"internal error: {exc!r}")))
                return buffer
        return buffer

    def _send_rows(
        self, sock: socket.socket, request_id: int, layer_id: int, ids: np.ndarray, buffer: np.ndarray, deadline: float
    ) -> None:
        if len(ids) == 0:
            sock.sendall(frames.pack_rows(request_id, self._live.version, 0, 0, 0))
            return
        chunks = self._live.gather_chunks(layer_id, ids, min(self._chunk_rows, len(buffer)), buffer)
        offset = 0
        frames.set_timeout(sock, self._limits.send_timeout_s)
        while offset < len(ids):
            if time.monotonic() >= deadline:
                raise DeadlineExceededError(f"the lookup's deadline passed after {offset:,} of {len(ids):,} rows")
            with self._guard.work_slot(deadline - time.monotonic()):
                rows, version = next(chunks)  # [n, width], a view of buffer
            head = frames.pack_rows(request_id, version, offset, len(rows), rows.nbytes)
            offset += len(rows)
            if offset == len(ids):  # counted before the last frame goes: a client holding every row sees them counted
                self._metrics.rows_served.inc(len(ids))
                self._metrics.bytes_served.inc(len(ids) * self._row_bytes)
            frames.send_parts(sock, (head, rows))

    @contextmanager
    def _peer_call(self, peer: str) -> Iterator[None]:
        self._guard.peers.acquire(peer)
        try:
            yield
        finally:
            self._guard.peers.release(peer)


def _split(address: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT that DataPlaneConfig checked."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _advertised(advertise: str | None, port: int) -> tuple[str, int]:
    """(host, port) from `HOST`, `HOST:PORT` or `[IPV6]:PORT` (the listened port when none is given)."""
    if not advertise:
        return "", port
    return _split(advertise) if has_port(advertise) else (advertise.strip("[]"), port)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
