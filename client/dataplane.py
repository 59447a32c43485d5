"""Lookups over a daemon's data plane: raw rows read straight into the caller's buffer.

The daemon offers the data plane in Describe (memstore.dataplane); the client asks for a ticket
over gRPC (OpenDataPlane, which checks its token) and presents it on each connection it opens.
A connection carries one lookup at a time; the calls of a thread pool each take an idle one or
open another. Frames are memstore.dataplane.frames (docs/format.md).

What the caller sees is what a gRPC lookup gives: rows in request order with the version the
first chunk showed, the project's exceptions (an ERROR frame carries the daemon's status code and
message; a broken connection is UnavailableError, a deadline DeadlineExceededError), and nothing
half-filled presented as an answer.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import numpy as np

from client.config import seconds_left
from memstore.auth import ClientTls
from memstore.dataplane import frames
from memstore.errors import (
    DataLossError,
    DeadlineExceededError,
    MemstoreError,
    UnauthenticatedError,
    UnavailableError,
)
from memstore.wire import memstore_pb2 as pb

# A ticket is renewed, and a connection retired, this long before the daemon would refuse it.
_EXPIRY_MARGIN_S = 5.0
# A lookup of at least twice this many row bytes is striped over connections (DataPlane.lookup).
_STRIPE_MIN_BYTES = 1 << 20
# Receive buffer asked for (capped by net.core.rmem_max): room for chunks while the caller copies.
_SOCKET_BUFFER_BYTES = 4 << 20

# (ticket, seconds it is good for), asked of the daemon over gRPC within `timeout` seconds.
TicketSource = Callable[[float], tuple[bytes, float]]


class DataPlaneUnavailable(UnavailableError):
    """This data plane cannot serve now: no connection could be made (a firewall, a stale port), or its
    daemon declined (a replica past its lag bound). gRPC, or another daemon behind it, may still."""


@dataclass
class _Connection:
    sock: socket.socket
    expiry: float  # time.monotonic() past which it is not used (a little before the daemon would refuse it)
    requests: int = 0


class DataPlane:
    """One daemon's data plane, as a pool of connections. Thread-safe; `close()` ends every connection."""

    def __init__(
        self,
        host: str,
        offer: pb.DataPlaneOffer,
        tickets: TicketSource,
        row_bytes: int,
        tls: ClientTls | None = None,
        streams: int = 2,
        max_idle: int = 8,
    ) -> None:
        if offer.protocol != frames.PROTOCOL:
            raise UnavailableError(
                f"the daemon's data plane speaks protocol {offer.protocol}, this client {frames.PROTOCOL}: "
                "looking rows up over gRPC"
            )
        if offer.tls and tls is None:
            raise UnavailableError("the daemon's data plane requires TLS and this client has no TLS settings")
        self.address = (offer.host or host, offer.port)
        self._tickets = tickets
        self._row_bytes = row_bytes
        self._tls = tls.ssl_context() if offer.tls and tls is not None else None
        self._server_name = None if tls is None else (tls.server_name or self.address[0])
        self._streams = streams
        self._max_idle = max(max_idle, streams)
        self._pool: futures.ThreadPoolExecutor | None = None  # receives a striped lookup's other parts
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._ticket: tuple[bytes, float] | None = None  # (ticket, expiry)
        self._closed = False

    def lookup(self, layer_id: int, ids: np.ndarray, deadline: float, out: np.ndarray) -> int:
        """Rows of `ids` into `out` ([len(ids), stored width], C-contiguous); the version they show (at least).

        A large lookup is striped over `streams` connections, each carrying a consecutive part of the ids
        into its own part of `out`: one TCP stream is bound by the one core that copies its bytes (measured
        here over veth: 3.6 GB/s on one, 6.1 GB/s on two), and the daemon gathers the parts in parallel.
        """
        parts = min(self._streams, len(ids) * self._row_bytes // _STRIPE_MIN_BYTES)
        if parts < 2:
            return self._lookup_part(layer_id, ids, deadline, out)
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = futures.ThreadPoolExecutor(self._streams - 1, thread_name_prefix="memstore-stripe")
        bounds = [len(ids) * part // parts for part in range(parts + 1)]
        others = [
            self._pool.submit(self._lookup_part, layer_id, ids[a:b], deadline, out[a:b])
            for a, b in zip(bounds[1:-1], bounds[2:])
        ]
        try:
            versions = [self._lookup_part(layer_id, ids[: bounds[1]], deadline, out[: bounds[1]])]
        finally:
            futures.wait(others)  # none may still write into `out` once this returns, nor fail unseen
        versions += [other.result() for other in others]  # the first part's failure, or the first other's
        return min(versions)  # every row shows at least the oldest part's version

    def _lookup_part(self, layer_id: int, ids: np.ndarray, deadline: float, out: np.ndarray) -> int:
        connection = self._take(deadline)
        try:
            answer = self._exchange(connection, layer_id, ids, deadline, out)
        except BaseException:
            frames.close_socket(connection.sock)  # broken, or cut mid-answer: the stream is out of step
            raise
        if isinstance(answer, UnauthenticatedError):  # its ticket ran out between our check and the daemon's
            frames.close_socket(connection.sock)
            self._ticket = None
            raise UnavailableError("the data plane ticket expired during the call; it is repeated")
        self._give_back(connection)  # an ERROR frame ends an answer cleanly: the connection stays in step
        if isinstance(answer, UnavailableError):
            raise DataPlaneUnavailable(str(answer))
        if isinstance(answer, MemstoreError):
            raise answer
        return answer

    def _exchange(
        self, connection: _Connection, layer_id: int, ids: np.ndarray, deadline: float, out: np.ndarray
    ) -> int | MemstoreError:
        """The version of the rows now in `out`, or the error the daemon answered with."""
        sock = connection.sock
        connection.requests += 1
        request_id = connection.requests
        wanted = len(ids)
        view = memoryview(out.reshape(-1).view(np.uint8))  # [N * row bytes]
        if len(view) != wanted * self._row_bytes:
            raise DataLossError(f"the output buffer has {len(view)} bytes for {wanted} rows of {self._row_bytes}")
        try:
            frames.set_timeout(sock, seconds_left(deadline))
            head, wire_ids = frames.pack_lookup(request_id, layer_id, ids, deadline - time.monotonic())
            frames.send_parts(sock, (head, wire_ids))
            received, version = 0, None
            header_bytes = bytearray(frames.HEADER_BYTES)
            while version is None or received < wanted:
                frames.set_timeout(sock, seconds_left(deadline))
                frames.recv_exact(sock, memoryview(header_bytes))
                header = frames.parse_header(header_bytes)
                if header.request_id != request_id & 0xFFFFFFFF:
                    raise DataLossError(f"data plane answer for request {header.request_id}, not {request_id}")
                if header.kind is frames.Kind.ERROR:
                    payload = bytearray(header.payload_bytes)
                    frames.recv_exact(sock, memoryview(payload))
                    return frames.error_of(header, bytes(payload))
                if header.kind is not frames.Kind.ROWS:
                    raise DataLossError(f"data plane sent {header.kind.name} where ROWS were due")
                chunk_version, offset, count = header.fields
                end = (offset + count) * self._row_bytes
                if offset != received or offset + count > wanted or header.payload_bytes != count * self._row_bytes:
                    raise DataLossError(
                        f"data plane ROWS frame of {count} rows at {offset} ({header.payload_bytes} bytes) does not "
                        f"continue the {received} of {wanted} rows of {self._row_bytes} bytes received"
                    )
                frames.recv_exact(sock, view[offset * self._row_bytes : end])
                version = chunk_version if version is None else version
                received += count
            return version
        except DeadlineExceededError:
            raise
        except TimeoutError:
            raise DeadlineExceededError(f"the lookup's deadline passed on the data plane to {self._where()}") from None
        except (OSError, EOFError) as exc:
            raise UnavailableError(f"the data plane connection to {self._where()} broke: {exc}") from None

    def _take(self, deadline: float) -> _Connection:
        """An idle connection with time left on its ticket, or a new one."""
        now = time.monotonic()
        with self._lock:
            if self._closed:
                raise UnavailableError("the client is closed")
            while self._idle:
                connection = self._idle.pop()
                if connection.expiry > now:
                    return connection
                frames.close_socket(connection.sock)
        return self._connect(deadline)

    def _connect(self, deadline: float) -> _Connection:
        ticket, expiry = self._current_ticket(deadline)
        try:
            raw = socket.create_connection(self.address, timeout=seconds_left(deadline))
        except DeadlineExceededError:
            raise
        except TimeoutError:
            raise DeadlineExceededError(
                f"connecting to the data plane at {self._where()} took the whole deadline"
            ) from None
        except OSError as exc:
            raise DataPlaneUnavailable(
                f"cannot connect to the data plane at {self._where()}: {exc.strerror or exc}"
            ) from None
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_hostname=self._server_name)
            frames.set_timeout(sock, seconds_left(deadline))
            sock.sendall(frames.pack_hello(ticket))
            header, payload = frames.recv_frame(sock)
            if header.kind is frames.Kind.ERROR:
                raise frames.error_of(header, payload)
            if header.kind is not frames.Kind.READY:
                raise DataLossError(f"the data plane answered HELLO with {header.kind.name}")
        except UnauthenticatedError:
            frames.close_socket(sock)
            self._ticket = None  # the daemon restarted (new key): the next attempt asks for a new ticket
            raise UnavailableError(
                f"the data plane at {self._where()} refused this client's ticket; retrying"
            ) from None
        except (TimeoutError, ssl.SSLError, OSError, EOFError) as exc:
            frames.close_socket(sock)
            if isinstance(exc, DeadlineExceededError):
                raise
            if isinstance(exc, TimeoutError):
                raise DeadlineExceededError(f"the data plane at {self._where()} did not answer HELLO in time") from None
            raise UnavailableError(f"the data plane at {self._where()} failed at HELLO: {exc}") from None
        except BaseException:
            frames.close_socket(sock)
            raise
        return _Connection(sock, expiry)

    def _current_ticket(self, deadline: float) -> tuple[bytes, float]:
        held = self._ticket
        if held is not None and held[1] > time.monotonic():
            return held
        asked = time.monotonic()
        ticket, lifetime = self._tickets(seconds_left(deadline))
        # Retired a little early (a quarter of its life, at most the margin), so no lookup starts on a
        # connection the daemon is about to refuse.
        self._ticket = (ticket, asked + lifetime - min(_EXPIRY_MARGIN_S, lifetime / 4))
        return self._ticket

    def _give_back(self, connection: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        frames.close_socket(connection.sock)

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def close(self) -> None:
        """Close the idle connections now; those in use close when their call ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            frames.close_socket(connection.sock)
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class DataPlanes:
    """The data planes of the daemons a client's target names (a shard's replicas, or one daemon).

    Lookups take them in turn, so reads spread over replicas as gRPC's round robin spreads them; one that
    cannot serve (DataPlaneUnavailable: unreachable, or a replica past its lag bound) is passed over for
    `rest_s` and the lookup goes to the next; after its rest it is described anew (`reopen`: a restarted
    daemon listens on another port) before it is tried. When none can serve, the last refusal is raised
    (the client then falls back to gRPC, whose balancing knows each daemon's health).
    """

    def __init__(
        self,
        planes: list[DataPlane],
        reopen: list[Callable[[float], DataPlane | None]],  # describes one anew within a deadline
        rest_s: float,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.planes = planes
        self._reopen = reopen
        self._rest_s = rest_s
        self._on_close = on_close
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._resting_until = [0.0] * len(planes)
        self._stale = [False] * len(planes)

    def lookup(self, layer_id: int, ids: np.ndarray, deadline: float, out: np.ndarray) -> int:
        """As `DataPlane.lookup`, on the next daemon that can serve."""
        first, now = next(self._turn), time.monotonic()
        order = [(first + step) % len(self.planes) for step in range(len(self.planes))]
        refused: DataPlaneUnavailable | None = None
        for index in [i for i in order if self._resting_until[i] <= now] or order:  # all resting: try them all
            try:
                return self._plane(index, deadline).lookup(layer_id, ids, deadline, out)
            except DataPlaneUnavailable as exc:
                with self._lock:
                    self._resting_until[index] = time.monotonic() + self._rest_s
                    self._stale[index] = True
                refused = exc
        assert refused is not None
        raise refused

    def _plane(self, index: int, deadline: float) -> DataPlane:
        """The data plane of daemon `index`, described anew if it failed before."""
        if not self._stale[index]:
            return self.planes[index]
        try:
            fresh = self._reopen[index](deadline)
        except UnavailableError as exc:
            raise DataPlaneUnavailable(str(exc)) from None
        if fresh is None:
            raise DataPlaneUnavailable("the daemon offers no data plane now")
        with self._lock:
            old, self.planes[index] = self.planes[index], fresh
            self._stale[index] = False
        old.close()
        return fresh

    def close(self) -> None:
        """Close every data plane."""
        for plane in self.planes:
            plane.close()
        self._on_close()
