"""The benchmarks' delay proxy on loopback, and the client-namespace harness where `ip netns` is permitted."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.delay_proxy import DelayProxy
from benchmarks.netns import NetnsConfig, _serve_bytes, client_namespace, netns_unavailable

DELAY_S = 0.05


def _recv_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 16):
        parts.append(chunk)
    return b"".join(parts)


class _Server:
    """A loopback server whose accepted connections are handed to the test (with a deadline)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        return conn


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    try:
        yield s
    finally:
        s.sock.close()


@pytest.fixture(params=[False, True], ids=["threads", "fork"])
def fork(request: pytest.FixtureRequest) -> bool:
    """Connections served by threads of the proxy's process, or each by a process of its own."""
    return request.param


def _proxy(server: _Server, fork: bool, delay_s: float = DELAY_S) -> DelayProxy:
    return DelayProxy("127.0.0.1", "127.0.0.1", [0], delay_s, target_ports=[server.port], fork=fork)


def _connect(proxy: DelayProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.ports[0]), timeout=10)
    return sock


def test_a_round_trip_takes_at_least_twice_the_delay(server: _Server, fork: bool) -> None:
    with _proxy(server, fork) as proxy, _connect(proxy) as client:
        upstream = server.accept()
        with upstream:
            start = time.monotonic()
            client.sendall(b"x")
            assert upstream.recv(1) == b"x"
            one_way = time.monotonic() - start
            upstream.sendall(b"y")
            assert client.recv(1) == b"y"
            round_trip = time.monotonic() - start
    # Lower bounds only: nothing is forwarded before it is due (how much later depends on the machine).
    assert one_way >= DELAY_S
    assert round_trip >= 2 * DELAY_S


def test_bytes_and_order_are_kept_both_ways(server: _Server, fork: bool) -> None:
    payload = os.urandom(3 << 20)  # several chunks, so order across chunks is exercised
    messages = [f"{i:06d};".encode() for i in range(2000)]  # many small writes
    with _proxy(server, fork, delay_s=0.002) as proxy, _connect(proxy) as client:
        upstream = server.accept()
        with upstream:
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(_recv_all(upstream)))
            reader.start()
            for m in messages:
                client.sendall(m)
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            reader.join(30)
            assert received == [b"".join(messages) + payload]
            upstream.sendall(payload[::-1])
            upstream.shutdown(socket.SHUT_WR)
            assert _recv_all(client) == payload[::-1]


def test_a_client_that_closes_closes_the_upstream_side(server: _Server, fork: bool) -> None:
    with _proxy(server, fork) as proxy:
        client = _connect(proxy)
        upstream = server.accept()
        with upstream:
            client.sendall(b"last words")
            client.close()
            assert _recv_all(upstream) == b"last words"  # then EOF


def test_a_server_that_closes_closes_the_client_side(server: _Server, fork: bool) -> None:
    with _proxy(server, fork) as proxy, _connect(proxy) as client:
        client.settimeout(10)
        upstream = server.accept()
        upstream.sendall(b"bye")
        upstream.close()
        assert _recv_all(client) == b"bye"


def test_a_reset_closes_the_other_side_at_once(server: _Server, fork: bool) -> None:
    with _proxy(server, fork, delay_s=0.0) as proxy, _connect(proxy) as client:
        client.settimeout(10)
        upstream = server.accept()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        upstream.close()  # linger 0: an RST, not a FIN
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass


def test_nothing_to_reach_closes_the_client() -> None:
    spare = socket.create_server(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()  # nothing listens there any more
    with DelayProxy("127.0.0.1", "127.0.0.1", [0], 0.0, target_ports=[port]) as proxy, _connect(proxy) as client:
        client.settimeout(10)
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass


def test_stop_closes_live_connections(server: _Server, fork: bool) -> None:
    proxy = _proxy(server, fork).start()
    with _connect(proxy) as client:
        client.settimeout(10)
        upstream = server.accept()
        with upstream:
            proxy.stop()
            assert client.recv(1) == b""
            assert upstream.recv(1) == b""


# ---- the client namespace (needs root: skipped where `ip netns` is not permitted)

_WHY_NOT = netns_unavailable()
needs_netns = pytest.mark.skipif(_WHY_NOT is not None, reason=f"no network namespaces here: {_WHY_NOT}")

_CLIENT = """
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((host, port), timeout=10) as s:
    s.sendall(b"ping"); s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(4096): reply += chunk
print(json.dumps({"reply": reply.decode()}))
"""


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


@needs_netns
def test_the_namespace_reaches_this_side_through_the_proxy_and_is_removed() -> None:
    with client_namespace(NetnsConfig(mtu=1400)) as ns:
        assert ns.name in _namespaces() and ns.host_veth in _links()
        inside = subprocess.run(ns.command(["ip", "-o", "link"]), capture_output=True, text=True, check=True).stdout
        assert ns.ns_veth in inside and "mtu 1400" in inside
        listener = socket.create_server((ns.host_ip, 0))
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def echo() -> None:
            with listener:
                conn, peer = listener.accept()
                with conn:
                    conn.sendall(_recv_all(conn) + f" from {peer[0]}".encode())

        thread = threading.Thread(target=echo)
        thread.start()
        # The proxy listens on the second address with the same port number, as for a daemon.
        with DelayProxy(ns.proxy_ip, ns.host_ip, [port], 0.001):
            done = subprocess.run(
                ns.command([sys.executable, "-c", _CLIENT, ns.proxy_ip, str(port)]),
                capture_output=True,
                text=True,
                timeout=60,
            )
        thread.join(10)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["reply"] == f"ping from {ns.host_ip}"  # the proxy's upstream side
    assert ns.name not in _namespaces() and ns.host_veth not in _links()


@needs_netns
@pytest.mark.parametrize("streams", [1, 3])
def test_run_json_receives_what_this_side_sent(streams: int) -> None:
    payload = os.urandom(1 << 20)
    with client_namespace() as ns:
        server, thread = _serve_bytes(ns.host_ip, payload, streams)
        port = server.getsockname()[1]
        args = ["--mib", "1", "--streams", str(streams), "--receive", f"{ns.host_ip}:{port}"]
        got = ns.run_json("benchmarks.netns", args, timeout_s=60)
        thread.join(10)
    assert got["bytes"] == len(payload)
    assert got["sha256"] == hashlib.sha256(payload).hexdigest()


@needs_netns
def test_the_namespace_is_removed_when_the_block_raises() -> None:
    with pytest.raises(KeyError):
        with client_namespace() as ns:
            raise KeyError("boom")
    assert ns.name not in _namespaces() and ns.host_veth not in _links()
