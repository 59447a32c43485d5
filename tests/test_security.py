"""Calls that try to hold the daemon: headers without a request, health Watch streams, reflection
streams that never speak, lookups nobody reads, one peer's many calls. Real daemons on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memstore.daemon_config import ServerConfig
from memstore.errors import InvalidArgumentError
from memstore.guard import Watchdog, peer_host
from memstore.service import SERVICE_NAME
from memstore.table import Table
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc
from tests.helpers import InProcessDaemon, wait_until

TOKEN = "s3cret-token-for-the-tests"
BEARER = (("authorization", f"Bearer {TOKEN}"),)
DESCRIBE = f"/{SERVICE_NAME}/Describe"
LAYER = 1
# Silent calls opened at once: more than the daemon's worker and follower threads (8 + 4).
MANY = 20
# A bound for what must happen, generous: failing tests wait this long, passing ones far less.
WAIT_S = 15.0


@pytest.fixture
def served(table: Table, tmp_path: Path) -> Iterator:
    started: list[InProcessDaemon] = []

    def start(tokens: bool = False, **settings: object) -> InProcessDaemon:
        token_file = None
        if tokens:
            token_file = tmp_path / "tokens"
            token_file.write_text(f"write {TOKEN}\n")
            token_file.chmod(0o600)
        started.append(InProcessDaemon(table, ServerConfig(same_host=False, token_file=token_file, **settings)))
        return started[-1]

    yield start
    for daemon in started:
        assert daemon.server.stop(None).wait(WAIT_S)


@pytest.fixture
def channels() -> Iterator:
    opened: list[grpc.Channel] = []

    def open_channel(address: str, **options: int | str) -> grpc.Channel:
        opened.append(grpc.insecure_channel(address, options=list(options.items())))
        return opened[-1]

    yield open_channel
    for channel in opened:
        channel.close()


def _header_only(channel: grpc.Channel, method: str, metadata: tuple = ()) -> tuple[grpc.Future, threading.Event]:
    """A call that sends its headers and never its request message (until `gate` is set)."""
    gate = threading.Event()

    def nothing() -> Iterator[bytes]:
        gate.wait(WAIT_S)
        return
        yield  # a generator that yields nothing

    return channel.stream_unary(method).future(nothing(), metadata=metadata), gate


def _code(future: grpc.Future) -> grpc.StatusCode:
    return future.exception(timeout=WAIT_S).code()


def _describe_ok(address: str, channels, metadata: tuple = ()) -> None:
    """A valid client on its own connection answers within its deadline."""
    stub = pb_grpc.MemstoreStub(channels(address))
    assert stub.Describe(pb.DescribeRequest(), timeout=WAIT_S / 2, metadata=metadata).fingerprint


def test_unauthenticated_header_only_calls_are_refused_unread(served, channels) -> None:
    """Tokens on: calls without a token that never send their request get UNAUTHENTICATED at once
    (they used to hold a worker each until the message came) and a valid client still answers."""
    daemon = served(tokens=True)
    attacker = channels(daemon.address)
    calls = [_header_only(attacker, DESCRIBE) for _ in range(MANY)]
    try:
        _describe_ok(daemon.address, channels, BEARER)
        assert [_code(future) for future, _ in calls] == [grpc.StatusCode.UNAUTHENTICATED] * MANY
    finally:
        for _, gate in calls:
            gate.set()


def test_unauthenticated_health_checks_without_a_request_do_not_hold_the_workers(served, channels) -> None:
    """The health service answers without a token: header-only Check calls are the attacker's other
    way in. They wait on threads of their own, never the workers, and a valid client answers."""
    daemon = served(tokens=True)
    attacker = channels(daemon.address)
    calls = [_header_only(attacker, "/grpc.health.v1.Health/Check") for _ in range(MANY)]
    try:
        _describe_ok(daemon.address, channels, BEARER)
    finally:
        for _, gate in calls:
            gate.set()


def test_slow_header_only_calls_are_cancelled_at_the_read_deadline(served, channels) -> None:
    """With a valid token the call is admitted, but its request must come within request_timeout_s:
    a call that never sends it is cancelled, and what it held comes back."""
    daemon = served(tokens=True, request_timeout_s=0.3)
    attacker = channels(daemon.address)
    calls = [_header_only(attacker, DESCRIBE, BEARER) for _ in range(MANY)]
    calls += [_header_only(attacker, "/grpc.health.v1.Health/Check") for _ in range(MANY)]
    try:
        _describe_ok(daemon.address, channels, BEARER)
        assert [_code(future) for future, _ in calls] == [grpc.StatusCode.CANCELLED] * 2 * MANY
    finally:
        for _, gate in calls:
            gate.set()
    guard = daemon.server.guard
    assert guard.watchdog.fired >= 2 * MANY
    wait_until(lambda: guard.calls == 0 and guard.peers.held("ipv4:127.0.0.1") == 0, "silent calls released", WAIT_S)


def test_slow_reflection_stream_that_never_asks_is_cancelled(served, channels) -> None:
    """Reflection is a bidirectional stream: one that never sends a request is cancelled at the read
    deadline instead of holding its thread until the client leaves."""
    daemon = served(request_timeout_s=0.3)
    gate = threading.Event()

    def nothing() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        gate.wait(WAIT_S)
        return
        yield

    stub = reflection_pb2_grpc.ServerReflectionStub(channels(daemon.address))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(nothing(), timeout=WAIT_S / 2))
    finally:
        gate.set()
    assert caught.value.code() is grpc.StatusCode.CANCELLED


def test_unauthenticated_watch_streams_stay_off_the_workers_and_are_bounded(served, channels) -> None:
    """Health Watch streams (round_robin clients open one per connection) hold no thread once
    started; past max_watch_streams they are refused, and a valid client still answers."""
    daemon = served(max_watch_streams=16)
    health = health_pb2_grpc.HealthStub(channels(daemon.address))
    streams = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S) for _ in range(30)]
    try:
        answers = []
        for stream in streams:
            try:
                answers.append(next(stream).status)
            except grpc.RpcError as exc:
                answers.append(exc.code())
        assert answers.count(health_pb2.HealthCheckResponse.SERVING) == 16
        assert answers.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 14
        _describe_ok(daemon.address, channels)
    finally:
        for stream in streams:
            stream.cancel()
    wait_until(lambda: daemon.server.guard.watch_streams == 0, "cancelled Watch streams released", WAIT_S)


def _unread_lookup(channels, address: str, table: Table) -> Iterator[pb.LookupResponse]:
    """A lookup whose stream nobody reads past the first message: flow control stops the daemon
    mid-stream (BDP probing off: it would grow the window until the whole response fits)."""
    channel = channels(address, **{"grpc.http2.lookahead_bytes": 1 << 16, "grpc.http2.bdp_probe": 0})
    ids = np.tile(np.arange(table.manifest.layout.num_rows(LAYER), dtype=np.int64), 8)
    stream = pb_grpc.MemstoreStub(channel).Lookup(pb.LookupRequest(layer_id=LAYER, row_ids=ids.tobytes()))
    next(stream)  # the daemon has reserved its bytes and sent the first chunk
    return stream


def test_slow_reader_is_cancelled_and_its_budget_returned(served, channels, table: Table) -> None:
    daemon = served(chunk_bytes=4096, send_timeout_s=0.3)
    stream = _unread_lookup(channels, daemon.address, table)
    assert daemon.metrics.total("memstore_in_flight_bytes") > 0
    wait_until(lambda: daemon.metrics.total("memstore_in_flight_bytes") == 0, "the stalled lookup's budget", WAIT_S)
    assert daemon.server.guard.watchdog.fired >= 1
    with pytest.raises(grpc.RpcError) as caught:
        list(stream)
    assert caught.value.code() is grpc.StatusCode.CANCELLED
    wait_until(
        lambda: daemon.metrics.total("memstore_requests_total", method="Lookup", code="CANCELLED") == 1,
        "the stalled lookup counted as cancelled",
        WAIT_S,
    )


def test_slow_readers_past_the_per_peer_limit_are_refused(served, channels, table: Table) -> None:
    daemon = served(chunk_bytes=4096, max_calls_per_peer=2)
    held = [_unread_lookup(channels, daemon.address, table) for _ in range(2)]
    stub = pb_grpc.MemstoreStub(channels(daemon.address))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Describe(pb.DescribeRequest(), timeout=WAIT_S)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max-calls-per-peer" in caught.value.details()
    assert daemon.metrics.total("memstore_rejected_total", reason="busy") == 1
    for stream in held:
        stream.cancel()
    wait_until(lambda: daemon.server.guard.peers.held("ipv4:127.0.0.1") == 0, "the held lookups released", WAIT_S)
    assert stub.Describe(pb.DescribeRequest(), timeout=WAIT_S).fingerprint


def test_peer_host_drops_the_port_only() -> None:
    assert peer_host("ipv4:10.0.0.1:5555") == "ipv4:10.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


@pytest.mark.parametrize(
    "setting", [{"request_timeout_s": 0}, {"send_timeout_s": float("nan")}, {"max_calls_per_peer": -1}]
)
def test_slow_limits_out_of_range_are_refused(setting: dict) -> None:
    with pytest.raises(InvalidArgumentError, match=next(iter(setting))):
        ServerConfig(**setting)


def test_slow_watchdog_fires_once_and_leaves_no_thread() -> None:
    watchdog = Watchdog(poll_s=0.01)
    fired = threading.Event()
    watchdog.arm("a", 0.0, fired.set)
    watchdog.arm("b", 0.0, lambda: pytest.fail("disarmed, yet fired"))
    watchdog.disarm("b")
    assert fired.wait(WAIT_S)
    wait_until(lambda: not watchdog.running, "the idle watchdog's thread ends", WAIT_S)
    assert watchdog.fired == 1
