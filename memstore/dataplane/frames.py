"""The data plane's frames: a 32-byte little-endian header, then `payload_bytes` of payload.

docs/format.md ("Data plane frames") is the specification; this module is its one implementation,
shared by the daemon and the client. A connection starts with HELLO (client, the ticket) answered
by READY or ERROR; then, one at a time, a LOOKUP (client, the ids) answered by ROWS frames that
cover its rows in order, or by an ERROR frame that ends the answer (rows sent before it are void).
"""

from __future__ import annotations

import enum
import socket
import ssl
import struct
from dataclasses import dataclass

import grpc
import numpy as np

from memstore.errors import DataLossError, MemstoreError, ResourceExhaustedError, error_from_status

MAGIC = b"MSDP"
PROTOCOL = 1
HEADER_BYTES = 32
# Largest payload a frame may announce (a HELLO's ticket, an ERROR's message, a LOOKUP's ids, a
# chunk of rows): a peer announcing more is broken or hostile, and the connection is closed.
MAX_PAYLOAD_BYTES = 1 << 30
# ERROR frames' retry hint when the refusal is not worth repeating.
NO_RETRY = 0xFFFFFFFF

_COMMON = struct.Struct("<4sBBHII")  # magic, kind, flags, status, payload_bytes, request_id
_HELLO = struct.Struct("<IIQ")  # protocol, reserved, reserved
_READY = struct.Struct("<IIQ")  # protocol, max_rows_per_request, reserved
_LOOKUP = struct.Struct("<IIII")  # layer_id, num_ids, timeout_ms, reserved
_ROWS = struct.Struct("<QII")  # version, row_offset, num_rows
_ERROR = struct.Struct("<IIQ")  # retry_after_ms (NO_RETRY: none), reserved, reserved
assert _COMMON.size + _LOOKUP.size == HEADER_BYTES


class Kind(enum.IntEnum):
    """What a frame is."""

    HELLO = 1  # client: protocol and ticket, first on a connection
    READY = 2  # daemon: the ticket is good
    LOOKUP = 3  # client: a layer's row ids
    ROWS = 4  # daemon: consecutive rows of the answer
    ERROR = 5  # daemon: the request (or the connection) failed; status and message


# LOOKUP flag: the ids are little-endian int32 (all in [0, 2**31)), else int64.
IDS_INT32 = 1


@dataclass(frozen=True)
class Header:
    """A parsed frame header; `fields` are the kind's own (see the pack_* functions)."""

    kind: Kind
    flags: int
    status: int
    payload_bytes: int
    request_id: int
    fields: tuple[int, ...]


def pack_hello(ticket: bytes) -> bytes:
    """HELLO with its ticket as payload."""
    return _common(Kind.HELLO, 0, 0, len(ticket), 0) + _HELLO.pack(PROTOCOL, 0, 0) + ticket


def pack_ready(max_rows_per_request: int) -> bytes:
    """READY: the daemon's protocol and its rows-per-request limit."""
    return _common(Kind.READY, 0, 0, 0, 0) + _READY.pack(PROTOCOL, max_rows_per_request, 0)


def pack_lookup(request_id: int, layer_id: int, ids: np.ndarray, timeout_s: float) -> tuple[bytes, np.ndarray]:
    """(LOOKUP header, the ids as they go on the wire): int32 when every id fits, halving what is sent."""
    narrow = len(ids) > 0 and int(ids.min()) >= 0 and int(ids.max()) < 2**31
    wire = ids.astype("<i4") if narrow else np.ascontiguousarray(ids, dtype="<i8")
    timeout_ms = min(max(1, round(timeout_s * 1000)), 0xFFFFFFFF)
    head = _common(Kind.LOOKUP, IDS_INT32 if narrow else 0, 0, wire.nbytes, request_id)
    return head + _LOOKUP.pack(layer_id, len(ids), timeout_ms, 0), wire


def pack_rows(request_id: int, version: int, row_offset: int, num_rows: int, payload_bytes: int) -> bytes:
    """ROWS header for `num_rows` rows from `row_offset` of the answer (the payload follows it)."""
    return _common(Kind.ROWS, 0, 0, payload_bytes, request_id) + _ROWS.pack(version, row_offset, num_rows)


def pack_error(request_id: int, exc: MemstoreError) -> bytes:
    """ERROR carrying `exc`'s status code, retry hint and message."""
    message = str(exc).encode("utf-8", "replace")[:65536]
    retry = getattr(exc, "retry_after_s", None)
    retry_ms = NO_RETRY if retry is None else min(round(retry * 1000), NO_RETRY - 1)
    head = _common(Kind.ERROR, 0, exc.code.value[0], len(message), request_id)
    return head + _ERROR.pack(retry_ms, 0, 0) + message


_TAILS = {
    Kind.HELLO: _HELLO,
    Kind.READY: _READY,
    Kind.LOOKUP: _LOOKUP,
    Kind.ROWS: _ROWS,
    Kind.ERROR: _ERROR,
}


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """A header from its 32 bytes; DataLossError for bad magic, an unknown kind or an absurd length."""
    magic, kind, flags, status, payload_bytes, request_id = _COMMON.unpack_from(data)
    if magic != MAGIC:
        raise DataLossError(f"data plane frame starts with {bytes(magic)!r}, not {MAGIC!r}: not a memstore data plane")
    try:
        kind = Kind(kind)
    except ValueError:
        raise DataLossError(f"data plane frame of unknown kind {kind}") from None
    if payload_bytes > MAX_PAYLOAD_BYTES:
        raise DataLossError(f"data plane frame announces {payload_bytes:,} bytes, above {MAX_PAYLOAD_BYTES:,}")
    return Header(kind, flags, status, payload_bytes, request_id, _TAILS[kind].unpack_from(data, _COMMON.size))


def lookup_ids(header: Header, payload: bytes | bytearray) -> np.ndarray:
    """A LOOKUP's ids as int64 [num_ids]; DataLossError when the payload's length disagrees with the header."""
    num_ids = header.fields[1]
    width = 4 if header.flags & IDS_INT32 else 8
    if len(payload) != num_ids * width:
        raise DataLossError(f"LOOKUP of {num_ids} ids carries {len(payload)} bytes, not {num_ids * width}")
    ids = np.frombuffer(payload, dtype="<i4" if width == 4 else "<i8")
    return ids.astype(np.int64, copy=False)  # int64 ids as they came, read-only like the gRPC path's


def error_of(header: Header, payload: bytes) -> MemstoreError:
    """The project exception an ERROR frame carries (with its retry hint)."""
    try:
        code = next(c for c in grpc.StatusCode if c.value[0] == header.status)
    except StopIteration:
        code = grpc.StatusCode.UNKNOWN
    exc = error_from_status(code, payload.decode("utf-8", "replace"))
    if isinstance(exc, ResourceExhaustedError):
        retry_ms = header.fields[0]
        exc.retry_after_s = None if retry_ms == NO_RETRY else retry_ms / 1000
    return exc


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; EOFError when the peer closes first, TimeoutError when the socket's
    timeout passes with nothing more received (other socket errors pass through)."""
    got, size = 0, len(view)
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL  # TLS takes no flags
    while got < size:
        try:
            count = sock.recv_into(view[got:], size - got, flags)
        except BlockingIOError:  # the kernel's receive timeout
            raise TimeoutError(f"nothing arrived in time after {got} of {size} bytes") from None
        if count == 0:
            raise EOFError(f"the peer closed the connection after {got} of {size} bytes")
        got += count


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound each following send and receive on `sock` by `seconds`.

    A plain socket stays blocking with the kernel's own timeouts (SO_RCVTIMEO/SO_SNDTIMEO): Python's
    timeouts make the socket non-blocking and poll before every call, and a large answer then
    arrives in many small reads (measured: several times slower). TLS sockets use Python's.
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    micros = max(1, round(seconds * 1e6))  # 0 would mean no timeout at all
    timeval = struct.pack("ll", micros // 1_000_000, micros % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def send_parts(sock: socket.socket, parts: tuple[bytes | np.ndarray, ...]) -> None:
    """Send the parts back to back in as few system calls as the kernel allows (no copy made here);
    TimeoutError when the peer does not take them within the socket's timeout."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    try:
        if isinstance(sock, ssl.SSLSocket):  # no sendmsg over TLS: each part is encrypted on its own anyway
            for view in views:
                sock.sendall(view)
            return
        while views:
            sent = sock.sendmsg(views)
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0], sent = views[0][sent:], 0
    except BlockingIOError:  # the kernel's send timeout
        raise TimeoutError("the peer did not take the data in time") from None


def recv_frame(sock: socket.socket) -> tuple[Header, bytes]:
    """One whole frame (header, payload); for frames whose payload is small (not ROWS)."""
    head = bytearray(HEADER_BYTES)
    recv_exact(sock, memoryview(head))
    header = parse_header(head)
    payload = bytearray(header.payload_bytes)
    recv_exact(sock, memoryview(payload))
    return header, bytes(payload)


def close_socket(sock: socket.socket) -> None:
    """Shut a connection down both ways (a thread blocked on it wakes) and close it; errors are moot then."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _common(kind: Kind, flags: int, status: int, payload_bytes: int, request_id: int) -> bytes:
    return _COMMON.pack(MAGIC, kind, flags, status, payload_bytes, request_id & 0xFFFFFFFF)
