"""The daemon over real gRPC on loopback: lookups, status codes, health, reflection, SIGTERM."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memstore.codec import check_request_rows, encode_row_ids
from memstore.daemon_config import DaemonConfig, ObservabilityConfig, ServerConfig
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, ResourceExhaustedError
from memstore.launch import start_daemon, stop_daemon
from memstore.service import SERVICE_NAME
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc


@pytest.fixture
def channel(daemon):
    with grpc.insecure_channel(daemon.address, options=[("grpc.max_receive_message_length", -1)]) as ch:
        yield ch


@pytest.fixture
def stub(channel) -> pb_grpc.MemstoreStub:
    return pb_grpc.MemstoreStub(channel)


def raw_lookup(stub: pb_grpc.MemstoreStub, layer_id: int, row_ids: bytes) -> tuple[list[pb.LookupResponse], np.ndarray]:
    """All response messages of one Lookup and the rows they carry, without the client."""
    messages = list(stub.Lookup(pb.LookupRequest(layer_id=layer_id, row_ids=row_ids), timeout=30))
    dtype = DType.from_wire(messages[0].dtype)
    rows = np.frombuffer(b"".join(m.rows for m in messages), dtype=dtype.numpy).reshape(-1, messages[0].dim)
    return messages, rows


def status_of(stub: pb_grpc.MemstoreStub, layer_id: int, row_ids: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        raw_lookup(stub, layer_id, row_ids)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("batch", [1, 1000, 1_000_000])
def test_lookup_equals_direct_gather_of_the_file(stub, table: Table, batch: int) -> None:
    layer_id = 4
    ids = np.random.default_rng(batch).integers(0, table.manifest.layout.num_rows(layer_id), batch)
    messages, rows = raw_lookup(stub, layer_id, encode_row_ids(ids))
    direct = np.fromfile(table.path / table.manifest.layer_file(layer_id), dtype="<f2").reshape(-1, 16)[ids]
    np.testing.assert_array_equal(rows, direct)
    assert [m.row_offset for m in messages] == sorted({m.row_offset for m in messages})
    assert all(m.num_rows == batch and m.dim == 16 for m in messages)
    if batch == 1_000_000:  # 32 MB of rows: far above gRPC's 4 MiB default, so streamed in chunks
        assert len(messages) > 8 and max(len(m.rows) for m in messages) <= ServerConfig().chunk_bytes


def test_empty_lookup_returns_no_rows(stub) -> None:
    messages, rows = raw_lookup(stub, 1, b"")
    assert rows.shape == (0, 16) and messages[0].num_rows == 0


def test_describe_returns_manifest_and_limits(stub, table: Table) -> None:
    response = stub.Describe(pb.DescribeRequest(), timeout=5)
    assert Manifest.from_json(response.manifest_json) == table.manifest
    assert response.fingerprint == table.manifest.fingerprint
    assert response.limits.max_rows_per_request == ServerConfig().max_rows_per_request


@pytest.mark.parametrize(
    ("layer_id", "payload", "message"),
    [
        (2, encode_row_ids(np.array([0])), "unknown Engram layer 2"),
        (1, encode_row_ids(np.array([0, 10**9])), "row id 1000000000 is out of range"),
        (1, encode_row_ids(np.array([5, -1])), "row id -1 is out of range"),
        (1, b"\x00" * 12, "not a multiple of 8"),
    ],
)
def test_bad_requests_get_invalid_argument_and_the_daemon_keeps_serving(stub, layer_id, payload, message) -> None:
    code, details = status_of(stub, layer_id, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    _, rows = raw_lookup(stub, 1, encode_row_ids(np.arange(3)))
    assert rows.shape == (3, 16)


def test_too_many_rows_is_resource_exhausted(daemon_factory, table: Table) -> None:
    daemon = daemon_factory(table, ServerConfig(max_rows_per_request=100))
    with grpc.insecure_channel(daemon.address) as ch:
        stub = pb_grpc.MemstoreStub(ch)
        code, details = status_of(stub, 1, encode_row_ids(np.zeros(101, dtype=np.int64)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 100" in details
        assert raw_lookup(stub, 1, encode_row_ids(np.zeros(100, dtype=np.int64)))[1].shape == (100, 16)


def test_check_request_rows_without_grpc() -> None:
    check_request_rows(10, 10)
    with pytest.raises(ResourceExhaustedError, match="split it"):
        check_request_rows(11, 10)


def test_many_concurrent_clients_get_their_own_rows(daemon, table: Table) -> None:
    errors: list[BaseException] = []

    def replica(seed: int) -> None:
        try:
            with grpc.insecure_channel(daemon.address, options=[("grpc.max_receive_message_length", -1)]) as ch:
                stub = pb_grpc.MemstoreStub(ch)
                rng = np.random.default_rng(seed)
                for _ in range(20):
                    layer_id = int(rng.choice([1, 4]))
                    ids = rng.integers(0, table.manifest.layout.num_rows(layer_id), int(rng.integers(1, 5000)))
                    np.testing.assert_array_equal(
                        raw_lookup(stub, layer_id, encode_row_ids(ids))[1], table.gather(layer_id, ids)
                    )
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def test_health_reports_serving(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_sigterm_drains_in_flight_calls_and_exits_zero(table_path: Path) -> None:
    process, address = start_daemon(table_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as ch:
            stub = pb_grpc.MemstoreStub(ch)
            ids = np.random.default_rng(0).integers(0, 1000, 2_000_000)
            stream = stub.Lookup(pb.LookupRequest(layer_id=1, row_ids=encode_row_ids(ids)), timeout=60)
            first = next(stream)  # the call is in flight when the signal arrives
            process.send_signal(signal.SIGTERM)
            received = len(first.rows) + sum(len(m.rows) for m in stream)
        assert received == len(ids) * 16 * 2
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "serving" in output and "stopped" in output
    finally:
        stop_daemon(process)


def test_stop_daemon_drains_a_stopped_daemon_instead_of_killing_it(table_path: Path) -> None:
    """A SIGSTOPped daemon acts on SIGTERM only once continued: stop_daemon waited out its timeout,
    then SIGKILLed it undrained."""
    process, _ = start_daemon(table_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        process.send_signal(signal.SIGSTOP)
        assert stop_daemon(process, timeout_s=30) == 0  # drained and exited, not killed (-9)
        assert "stopped" in process.communicate(timeout=30)[0]
    finally:
        process.kill()
        process.wait()


_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


@pytest.mark.skipif(_TGKILL is None or not Path("/proc/self/task").is_dir(), reason="needs Linux tgkill")
def test_sigterm_that_lands_on_a_grpc_thread_stops_the_daemon(table_path: Path) -> None:
    """The kernel may hand a process's SIGTERM to any thread (it did after a SIGSTOP/SIGCONT); Python
    runs the handler in the main thread only once that thread wakes, which the serving loop did
    once per log interval (a minute). Sent here to one of the daemon's other threads on purpose."""
    process, _ = start_daemon(table_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{process.pid}/task") if int(tid) != process.pid]
        assert threads, "the daemon runs gRPC's threads"
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(_TGKILL, process.pid, threads[0], signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
        assert process.wait(timeout=30) == 0  # drained and exited well before the log interval
        assert "stopped" in process.communicate(timeout=30)[0]
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("text", [True, False], ids=["text", "bytes"])
def test_start_daemon_reports_why_the_daemon_did_not_start(tmp_path: Path, text: bool) -> None:
    """The daemon's error goes to stderr; start_daemon reported only stdout ("see its log"), losing
    the captured reason."""
    with pytest.raises(RuntimeError, match=r"did not start: exit code 2: memstore serve: error: .*no_table"):
        start_daemon(tmp_path / "no_table", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)


@pytest.mark.parametrize(
    ("config", "field", "value"),
    [
        (ObservabilityConfig, "log_interval_s", 0.0),
        (ObservabilityConfig, "log_interval_s", -1.0),
        (ObservabilityConfig, "log_interval_s", float("nan")),
        (partial(DaemonConfig, Path("t")), "grace_s", -5.0),
    ],
)
def test_intervals_a_daemon_cannot_keep_are_refused(config: Callable[..., object], field: str, value: float) -> None:
    """`--log-interval 0` spun the serving loop (15,000 log lines a second); `--grace -5` was taken."""
    with pytest.raises(InvalidArgumentError, match=rf"Config\.{field} must be in"):
        config(**{field: value})
