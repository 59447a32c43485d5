"""The data plane: its frames on their own, its tickets, and its daemon and client together.

The client's contract tests (test_client.py) run over the data plane too (conftest's transports);
these cover what is the data plane's own: framing, tickets, TLS, refusals, fallback, broken and
stalled connections, limits and metrics.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import MemstoreClient
from memstore.daemon_config import DataPlaneConfig, ServerConfig
from memstore.dataplane import frames
from memstore.dataplane.tickets import TICKET_BYTES, TicketIssuer
from memstore.errors import (
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from memstore.limits import lookup_cost
from memstore.table import Table
from memstore.wire import memstore_pb2 as pb
from tests.helpers import DEADLINE_S, FAST_FAIL, join_all, wait_until

DATA_PLANE = replace(FAST_FAIL, same_host=False, data_plane=True)
# Every id on the wire, repeats too (the small table has few rows): large answers from it.
ALL_ROWS = replace(DATA_PLANE, dedup_min_saving=0.999)


# -- frames ----------------------------------------------------------------------------------


def test_every_frame_is_a_32_byte_header_and_its_payload() -> None:
    head, ids = frames.pack_lookup(7, 3, np.array([5, 1, 2**31 - 1]), 2.5)
    header = frames.parse_header(head)
    assert len(head) == frames.HEADER_BYTES
    assert (header.kind, header.request_id, header.fields) == (frames.Kind.LOOKUP, 7, (3, 3, 2500, 0))
    assert header.flags & frames.IDS_INT32 and header.payload_bytes == 12 == ids.nbytes
    assert frames.lookup_ids(header, ids.tobytes()).tolist() == [5, 1, 2**31 - 1]
    rows = frames.parse_header(frames.pack_rows(7, 11, 64, 4, 512))
    assert (rows.kind, rows.fields, rows.payload_bytes) == (frames.Kind.ROWS, (11, 64, 4), 512)
    hello = frames.pack_hello(b"t" * 48)
    assert frames.parse_header(hello).fields[0] == frames.PROTOCOL and hello[frames.HEADER_BYTES :] == b"t" * 48
    assert frames.parse_header(frames.pack_ready(1000)).fields[:2] == (frames.PROTOCOL, 1000)


@pytest.mark.parametrize("ids", [[2**31], [-1], [0, 2**40]], ids=["past-int32", "negative", "large"])
def test_ids_that_do_not_fit_int32_travel_as_int64(ids: list[int]) -> None:
    head, wire = frames.pack_lookup(1, 1, np.array(ids, dtype=np.int64), 1.0)
    header = frames.parse_header(head)
    assert not header.flags & frames.IDS_INT32 and wire.dtype == np.dtype("<i8")
    assert frames.lookup_ids(header, wire.tobytes()).tolist() == ids


def test_an_error_frame_carries_the_status_retry_hint_and_message() -> None:
    busy = frames.pack_error(3, ResourceExhaustedError("busy: retry", retry_after_s=0.05))
    header = frames.parse_header(busy)
    exc = frames.error_of(header, busy[frames.HEADER_BYTES :])
    assert isinstance(exc, ResourceExhaustedError) and exc.retry_after_s == 0.05 and str(exc) == "busy: retry"
    too_big = frames.pack_error(3, ResourceExhaustedError("split it"))
    assert frames.error_of(frames.parse_header(too_big), b"split it").retry_after_s is None
    bad = frames.pack_error(4, InvalidArgumentError("row id 9 is out of range"))
    assert frames.parse_header(bad).status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert isinstance(frames.error_of(frames.parse_header(bad), b"x"), InvalidArgumentError)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda h: b"HTTP" + h[4:], "not a memstore data plane"),
        (lambda h: h[:4] + bytes([99]) + h[5:], "unknown kind"),
        (lambda h: h[:8] + (2**31).to_bytes(4, "little") + h[12:], "announces"),
    ],
    ids=["magic", "kind", "length"],
)
def test_a_malformed_header_is_data_loss(mangle, message: str) -> None:
    with pytest.raises(DataLossError, match=message):
        frames.parse_header(mangle(frames.pack_rows(1, 0, 0, 0, 0)))


def test_ids_whose_length_disagrees_with_the_header_are_data_loss() -> None:
    head, wire = frames.pack_lookup(1, 1, np.arange(4), 1.0)
    with pytest.raises(DataLossError, match="carries 12 bytes"):
        frames.lookup_ids(frames.parse_header(head), wire.tobytes()[:12])


def test_parts_and_exact_reads_survive_a_small_socket_buffer() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = np.arange(1 << 18, dtype=np.int32)  # 1 MiB: many partial sends
        received = bytearray(frames.HEADER_BYTES + payload.nbytes)
        reader = threading.Thread(target=frames.recv_exact, args=(right, memoryview(received)))
        reader.start()
        frames.send_parts(left, (frames.pack_rows(1, 0, 0, 1, payload.nbytes), payload))
        join_all([reader])
        assert np.array_equal(np.frombuffer(received[frames.HEADER_BYTES :], np.int32), payload)


def test_exact_reads_end_at_the_peers_close_and_at_the_timeout() -> None:
    left, right = socket.socketpair()
    with left, right:
        frames.set_timeout(right, 0.05)
        with pytest.raises(TimeoutError):
            frames.recv_exact(right, memoryview(bytearray(8)))
        left.sendall(b"abc")
        left.close()
        with pytest.raises(EOFError, match="after 3 of 8 bytes"):
            frames.recv_exact(right, memoryview(bytearray(8)))


# -- tickets ---------------------------------------------------------------------------------


def test_a_ticket_is_accepted_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = TicketIssuer(lifetime_s=60)
    ticket = issuer.issue()
    assert len(ticket) == TICKET_BYTES and issuer.check(ticket) > time.monotonic()
    later = time.monotonic() + 61
    monkeypatch.setattr(time, "monotonic", lambda: later)
    with pytest.raises(UnauthenticatedError, match="expired"):
        issuer.check(ticket)


def test_a_ticket_altered_or_from_another_daemon_is_refused() -> None:
    issuer = TicketIssuer(lifetime_s=60)
    ticket = bytearray(issuer.issue())
    ticket[3] ^= 1  # a later expiry, say
    with pytest.raises(UnauthenticatedError, match="not issued by this daemon"):
        issuer.check(bytes(ticket))
    with pytest.raises(UnauthenticatedError, match="not issued by this daemon"):
        TicketIssuer(lifetime_s=60).check(issuer.issue())
    with pytest.raises(UnauthenticatedError, match="bytes"):
        issuer.check(b"short")


# -- daemon and client -----------------------------------------------------------------------


class _Link:
    """A TCP path between clients and a daemon's data plane that the test breaks: the first connection
    is cut (`cut_after`) or stalls (`stall_after`) once that many bytes came from the daemon."""

    def __init__(self, cut_after: int | None = None, stall_after: int | None = None) -> None:
        self.cut_after, self.stall_after = cut_after, stall_after
        self.target = 0  # the daemon's data plane port, set once it is known
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            faulty = self.connections == 1
            daemon = socket.create_connection(("127.0.0.1", self.target))
            for source, sink, limit in ((client, daemon, None), (daemon, client, faulty)):
                pump = threading.Thread(target=self._pump, args=(source, sink, limit), daemon=True)
                pump.start()
                self._threads.append(pump)

    def _pump(self, source: socket.socket, sink: socket.socket, faulty: bool | None) -> None:
        moved = 0
        try:
            while not self._stop.is_set():
                data = source.recv(4096)
                if not data:
                    break
                if faulty and self.stall_after is not None and moved + len(data) > self.stall_after:
                    self._stop.wait()  # the network stops delivering; nothing is closed
                    break
                if faulty and self.cut_after is not None and moved + len(data) > self.cut_after:
                    sink.sendall(data[: self.cut_after - moved])
                    break
                sink.sendall(data)
                moved += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.fixture
def link() -> Iterator:
    made: list[_Link] = []

    def make(**faults: int) -> _Link:
        made.append(_Link(**faults))
        return made[-1]

    yield make
    for each in made:
        each.close()


def _served_through(daemon_factory, table: Table, link: _Link, **config: object):
    """A daemon whose data plane clients reach through `link`."""
    daemon = daemon_factory(
        table, ServerConfig(data_plane=DataPlaneConfig(advertise=f"127.0.0.1:{link.port}"), **config)
    )
    link.target = daemon.server.data_plane.port
    return daemon


def _raw_connection(daemon, ticket: bytes | None = None) -> socket.socket:
    """A data plane connection made by hand, past HELLO (with a real ticket unless one is given)."""
    if ticket is None:
        with MemstoreClient(daemon.address, DATA_PLANE) as client:
            ticket = _ticket(client)
    sock = socket.create_connection(("127.0.0.1", daemon.server.data_plane.port), timeout=DEADLINE_S)
    sock.sendall(frames.pack_hello(ticket))
    return sock


def _ticket(client: MemstoreClient) -> bytes:
    """A ticket from the daemon's OpenDataPlane, as the client asks for one (its exceptions, its token)."""
    return client._call(client._stub.OpenDataPlane, pb.OpenDataPlaneRequest(), DEADLINE_S).ticket


def _frame(sock: socket.socket) -> tuple[frames.Header, bytes]:
    return frames.recv_frame(sock)


def test_lookups_spanning_many_frames_come_back_in_order(daemon_factory, table: Table) -> None:
    daemon = daemon_factory(table, ServerConfig(data_plane=DataPlaneConfig(chunk_bytes=4096)))  # 128 rows a frame
    ids = np.random.default_rng(0).integers(0, table.manifest.layout.num_rows(1), 5000)
    with MemstoreClient(daemon.address, DATA_PLANE) as client:
        rows = client.lookup(1, ids)
        assert client.transport == "data-plane"
    assert np.array_equal(rows.numpy(), table.gather(1, ids))


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_large_lookups_are_striped_over_connections(daemon_factory, table: Table, streams: int) -> None:
    daemon = daemon_factory(table)
    ids = np.random.default_rng(1).integers(0, table.manifest.layout.num_rows(1), 200_000)  # 6.4 MB of rows
    with MemstoreClient(daemon.address, replace(ALL_ROWS, data_plane_streams=streams)) as client:
        assert np.array_equal(client.lookup(1, ids).numpy(), table.gather(1, ids))
        assert len(client._route.current.planes[0]._idle) == streams  # one connection per part, all back in the pool


def test_a_striped_lookup_whose_part_breaks_is_repeated_whole(daemon_factory, table: Table, link) -> None:
    ids = np.random.default_rng(2).integers(0, table.manifest.layout.num_rows(1), 200_000)
    daemon = _served_through(daemon_factory, table, link(cut_after=100_000))
    with MemstoreClient(daemon.address, replace(ALL_ROWS, max_attempts=2)) as client:
        assert np.array_equal(client.lookup(1, ids).numpy(), table.gather(1, ids))


def test_without_a_data_plane_clients_use_grpc_or_say_why_not(daemon_factory, table: Table) -> None:
    daemon = daemon_factory(table, ServerConfig(data_plane=None))
    with MemstoreClient(daemon.address, replace(DATA_PLANE, data_plane=None)) as client:
        assert np.array_equal(client.lookup(1, [3, 4]).numpy(), table.gather(1, np.array([3, 4])))
        assert client.transport == "grpc"
    with MemstoreClient(daemon.address, DATA_PLANE) as client, pytest.raises(UnavailableError, match="no data plane"):
        client.lookup(1, [3])


def test_an_unreachable_data_plane_falls_back_to_grpc(daemon_factory, table: Table) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = closed.getsockname()[1]
    daemon = daemon_factory(table, ServerConfig(data_plane=DataPlaneConfig(advertise=f"127.0.0.1:{nowhere}")))
    with MemstoreClient(daemon.address, replace(DATA_PLANE, data_plane=None)) as client:
        assert np.array_equal(client.lookup(1, [3, 4]).numpy(), table.gather(1, np.array([3, 4])))
        assert client.transport == "grpc"
    with MemstoreClient(daemon.address, DATA_PLANE) as client, pytest.raises(UnavailableError, match="cannot connect"):
        client.lookup(1, [3])


def test_a_connection_cut_mid_answer_is_repeated_or_fails_whole(daemon_factory, table: Table, link) -> None:
    ids = np.arange(table.manifest.layout.num_rows(1))
    broken = link(cut_after=5000)
    daemon = _served_through(daemon_factory, table, broken)
    with MemstoreClient(daemon.address, replace(DATA_PLANE, max_attempts=2)) as client:
        assert np.array_equal(client.lookup(1, ids).numpy(), table.gather(1, ids))  # the repeat, on a new connection
    assert broken.connections == 2
    once = link(cut_after=5000)
    daemon = _served_through(daemon_factory, table, once)
    with MemstoreClient(daemon.address, replace(DATA_PLANE, max_attempts=1)) as client:
        with pytest.raises(UnavailableError, match="broke"):
            client.lookup(1, ids)


def test_a_stalled_connection_fails_the_call_at_its_deadline(daemon_factory, table: Table, link) -> None:
    stalled = link(stall_after=5000)
    daemon = _served_through(daemon_factory, table, stalled)
    with MemstoreClient(daemon.address, DATA_PLANE) as client:
        client.lookup(1, [0])  # a small answer: the (faulty) connection goes back to the pool
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.lookup(1, np.arange(table.manifest.layout.num_rows(1)), timeout=1.0)
        assert time.monotonic() - start < 1.0 + 2.0  # its deadline, plus scheduling on a loaded machine


def test_limits_hold_on_the_data_plane(daemon_factory, table: Table) -> None:
    daemon = daemon_factory(table, ServerConfig(max_rows_per_request=10))
    with MemstoreClient(daemon.address, DATA_PLANE) as client:
        with pytest.raises(ResourceExhaustedError, match="at most 10 per request") as caught:
            client.lookup(1, np.arange(11))
        assert caught.value.retry_after_s is None  # the request itself is too big: not repeated
        assert client.lookup(1, np.arange(10)).shape == (10, 16)  # the connection is still in step
    tight = daemon_factory(table, ServerConfig(max_in_flight_bytes=64 << 10))
    with MemstoreClient(tight.address, DATA_PLANE) as client:
        with pytest.raises(ResourceExhaustedError, match="whole in-flight budget"):
            client.lookup(1, np.arange(4000))


def _held_lookup(daemon, ids: np.ndarray) -> socket.socket:
    """A data plane lookup nobody reads: the daemon stops mid-answer, holding its reservation."""
    sock = _raw_connection(daemon)
    assert _frame(sock)[0].kind is frames.Kind.READY
    head, wire = frames.pack_lookup(1, 1, ids, DEADLINE_S)
    frames.send_parts(sock, (head, wire))
    return sock


def test_a_busy_daemon_refuses_and_the_client_retries_once_it_has_room(daemon_factory, table: Table) -> None:
    held_ids = np.tile(np.arange(table.manifest.layout.num_rows(1)), 200)  # 31 MB of rows: more than socket buffers
    chunk_rows, row_bytes = DataPlaneConfig().chunk_bytes // 32, 32
    held_cost = lookup_cost(len(held_ids), row_bytes, chunk_rows, 0, 4 * len(held_ids))
    budget = held_cost + lookup_cost(3000, row_bytes, chunk_rows, 0, 4 * 3000) - 1  # not both at once
    daemon = daemon_factory(table, ServerConfig(max_in_flight_bytes=budget))
    held = _held_lookup(daemon, held_ids)
    assert _frame_header(held).kind is frames.Kind.ROWS  # its answer has started: its bytes are reserved
    result: dict[str, object] = {}

    def lookup() -> None:
        try:
            with MemstoreClient(daemon.address, replace(DATA_PLANE, timeout_s=DEADLINE_S)) as client:
                result["rows"] = client.lookup(1, np.arange(3000))
        except BaseException as exc:  # reported below
            result["error"] = exc

    worker = threading.Thread(target=lookup)
    worker.start()
    try:
        time.sleep(0.5)
        assert worker.is_alive(), result  # refused as busy and retrying, not failed
    finally:
        held.close()  # the held lookup ends: its bytes come back, the retry gets in
    join_all([worker])
    assert np.array_equal(result["rows"].numpy(), table.gather(1, np.arange(3000))), result


def test_a_client_gone_mid_answer_gives_back_what_it_held(table: Table) -> None:
    from tests.helpers import InProcessDaemon

    daemon = InProcessDaemon(table, ServerConfig())
    daemon.port = int(daemon.address.rsplit(":", 1)[1])
    try:
        held = _held_lookup(daemon, np.tile(np.arange(table.manifest.layout.num_rows(1)), 200))
        assert _frame_header(held).kind is frames.Kind.ROWS  # the answer has started
        held.close()  # the client dies mid-answer
        wait_until(lambda: daemon.calls("DataPlaneLookup", "CANCELLED") == 1, "the lookup ended as cancelled")
        wait_until(lambda: daemon.server.data_plane.connections == 0, "the connection was closed")
        assert daemon.metrics.total("memstore_in_flight_bytes") == 0
    finally:
        assert daemon.server.stop(None).wait(DEADLINE_S)


def _frame_header(sock: socket.socket) -> frames.Header:
    head = bytearray(frames.HEADER_BYTES)
    frames.recv_exact(sock, memoryview(head))
    return frames.parse_header(head)


def test_a_ticket_the_daemon_did_not_issue_is_refused_at_hello(daemon) -> None:
    with _raw_connection(daemon, ticket=TicketIssuer(60).issue()) as sock:
        header, message = _frame(sock)
        assert header.kind is frames.Kind.ERROR and header.status == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert b"not issued by this daemon" in message
        assert sock.recv(1) == b""  # and the connection is closed


def test_a_connection_ends_with_its_ticket_and_the_client_renews_it(daemon_factory, table: Table) -> None:
    daemon = daemon_factory(table, ServerConfig(data_plane=DataPlaneConfig(ticket_s=1)))
    with _raw_connection(daemon) as sock:
        assert _frame(sock)[0].kind is frames.Kind.READY
        time.sleep(1.2)
        assert sock.recv(1) == b""  # closed once idle past the ticket's expiry
    with MemstoreClient(daemon.address, DATA_PLANE) as client:
        client.lookup(1, [1])
        time.sleep(1.2)
        assert np.array_equal(client.lookup(1, [2]).numpy(), table.gather(1, np.array([2])))


def test_connections_past_the_limit_are_refused_as_busy(daemon_factory, table: Table) -> None:
    daemon = daemon_factory(table, ServerConfig(data_plane=DataPlaneConfig(max_connections=1)))
    with _raw_connection(daemon) as first:
        assert _frame(first)[0].kind is frames.Kind.READY
        with _raw_connection(daemon) as second:
            header, message = _frame(second)
            assert header.kind is frames.Kind.ERROR and b"--data-plane-max-connections" in message
            assert isinstance(frames.error_of(header, message), ResourceExhaustedError)
            assert frames.error_of(header, message).retry_after_s is not None  # load: worth repeating


def test_a_request_that_is_not_a_lookup_ends_the_connection(daemon) -> None:
    with _raw_connection(daemon) as sock:
        assert _frame(sock)[0].kind is frames.Kind.READY
        sock.sendall(frames.pack_ready(1))  # nonsense from a client
        assert sock.recv(1) == b""


def test_tokens_gate_the_tickets(daemon_factory, table: Table, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("read a-read-token-of-length\n")
    tokens.chmod(0o600)
    daemon = daemon_factory(table, ServerConfig(token_file=tokens))
    with MemstoreClient(daemon.address, DATA_PLANE) as client, pytest.raises(UnauthenticatedError):
        _ticket(client)
    with MemstoreClient(daemon.address, replace(DATA_PLANE, token="a-read-token-of-length")) as client:
        assert np.array_equal(client.lookup(1, [5]).numpy(), table.gather(1, np.array([5])))
        assert client.transport == "data-plane"


def test_with_tls_the_data_plane_is_encrypted_with_the_daemons_certificate(daemon_factory, table: Table, pki) -> None:
    from memstore.auth import ClientTls, TlsConfig

    daemon = daemon_factory(table, ServerConfig(tls=TlsConfig(pki["server_cert"], pki["server_key"])))
    config = replace(DATA_PLANE, tls=ClientTls(ca=pki["ca"]))
    with MemstoreClient(daemon.address, config) as client:
        ids = np.arange(3000)
        assert np.array_equal(client.lookup(1, ids).numpy(), table.gather(1, ids))
        assert client.transport == "data-plane" and client._describe(None).data_plane.tls
    with _raw_connection(daemon, ticket=b"x" * TICKET_BYTES) as plain:  # plaintext to a TLS port
        plain.settimeout(DEADLINE_S)
        try:
            answer = plain.recv(64)  # a TLS alert, or the connection closed
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(frames.MAGIC)
    other = replace(DATA_PLANE, tls=ClientTls(ca=pki["other_ca"]))
    with pytest.raises(UnavailableError):  # a daemon whose certificate the client does not trust
        with MemstoreClient(daemon.address, other) as client:
            client.lookup(1, [1])


def test_a_draining_daemon_finishes_lookups_and_refuses_new_ones(daemon_factory, table: Table) -> None:
    daemon = daemon_factory(table)
    with MemstoreClient(daemon.address, replace(DATA_PLANE, max_attempts=1)) as client:
        client.lookup(1, [1])  # a connection in the pool
        daemon.server.data_plane.drain()
        with pytest.raises(UnavailableError, match="stopping"):
            client.lookup(1, [2])
    with pytest.raises(OSError):  # no new connections either
        socket.create_connection(("127.0.0.1", daemon.server.data_plane.port), timeout=DEADLINE_S)


def test_a_data_plane_port_in_use_is_refused_with_what_to_change(table: Table) -> None:
    from memstore.service import create_server

    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(InvalidArgumentError, match="--data-plane-listen"):
            create_server(table, "127.0.0.1:0", ServerConfig(data_plane=DataPlaneConfig(listen=busy)))


@pytest.mark.parametrize(
    "setting",
    [{"listen": "unix:/run/x.sock"}, {"listen": "h:99999"}, {"advertise": "h:0"}, {"advertise": ""}],
    ids=["unix", "listen-port", "advertise-port", "advertise-empty"],
)
def test_data_plane_addresses_are_checked_when_configured(setting: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        DataPlaneConfig(**setting)
