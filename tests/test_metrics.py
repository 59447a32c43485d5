"""Metrics: the daemon's Prometheus registry (calls, errors by code, latency, rows, pushes, gauges),
its summary for `memstore stats`, the client's prefetch-stall metric, and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

import memstore.metrics
from client import MemstoreClient, PrefetchConfig, Prefetcher
from memstore.daemon_config import ServerConfig
from memstore.errors import InvalidArgumentError
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveConfig, LiveTable
from memstore.logs import JsonFormatter, LogFormat, configure_logging
from memstore.metrics import METRICS_MAX_CONNECTIONS, DaemonMetrics, summarize
from memstore.service import create_server
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from tests.helpers import DEADLINE_S, FAST_FAIL, SMALL_LAYOUT, make_table, wait_until

LAYER = 1
DIM = SMALL_LAYOUT.dim
GRPC = replace(FAST_FAIL, same_host=False)


def test_calls_are_counted_by_method_and_code_and_timed() -> None:
    metrics = DaemonMetrics()
    with metrics.observe("Lookup"):
        pass
    with pytest.raises(KeyError):
        with metrics.observe("Lookup") as outcome:
            outcome.code = grpc.StatusCode.INVALID_ARGUMENT
            raise KeyError("refused")
    with pytest.raises(RuntimeError):
        with metrics.observe("Push"):
            raise RuntimeError("no code set: counted as UNKNOWN")
    assert metrics.total("memstore_requests_total", method="Lookup", code="OK") == 1
    assert metrics.total("memstore_requests_total", method="Lookup", code="INVALID_ARGUMENT") == 1
    assert metrics.total("memstore_requests_total", method="Push", code="UNKNOWN") == 1
    assert metrics.total("memstore_request_seconds_count", method="Lookup") == 2
    assert metrics.total("memstore_in_flight_requests") == 0


def test_summary_reads_calls_errors_and_quantiles_back_from_the_text() -> None:
    metrics = DaemonMetrics()
    for _ in range(99):
        metrics.latency.labels("Lookup").observe(0.0008)  # bucket <= 1 ms
        metrics.requests.labels("Lookup", "OK").inc()
    metrics.latency.labels("Lookup").observe(0.3)  # bucket <= 500 ms
    metrics.requests.labels("Lookup", "INVALID_ARGUMENT").inc()
    metrics.rows_served.inc(1234)
    summary = summarize(metrics.text().decode())
    lookup = summary.methods["Lookup"]
    assert lookup.calls == 100 and lookup.errors == {"INVALID_ARGUMENT": 1}
    assert lookup.p50_s == 0.001 and lookup.p99_s == 0.001
    assert summary.values["memstore_rows_served_total"] == 1234
    assert any(line.startswith("Lookup") and "INVALID_ARGUMENT 1" in line for line in summary.lines())


@pytest.fixture
def trainable(tmp_path):
    path = make_table(tmp_path / "t", seed=1, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0))
    live = LiveTable.open(path, config=LiveConfig(durability=Durability.OS))
    yield live
    live.close()


@pytest.mark.parametrize(("data_plane", "method"), [(False, "Lookup"), (True, "DataPlaneLookup")])
def test_a_daemon_counts_what_it_serves_and_refuses(trainable, data_plane: bool, method: str) -> None:
    metrics = DaemonMetrics()
    server, port = create_server(trainable, "127.0.0.1:0", ServerConfig(same_host=False), metrics=metrics)
    server.start()
    try:
        with MemstoreClient(f"127.0.0.1:{port}", replace(GRPC, data_plane=data_plane)) as client:
            for _ in range(3):
                client.lookup(LAYER, np.arange(10))
            with pytest.raises(InvalidArgumentError):
                client.lookup(LAYER, np.array([-1]))
            client.push(LAYER, np.arange(5), np.ones((5, DIM), np.float32))
            with pytest.raises(InvalidArgumentError):
                client.push(LAYER, np.arange(2), np.full((2, DIM), np.nan, np.float32))
            text = client.stats()
    finally:
        assert server.stop(None).wait(DEADLINE_S)
    summary = summarize(text)
    assert summary.methods[method].calls == 4
    assert summary.methods[method].errors == {"INVALID_ARGUMENT": 1}
    assert summary.methods["Push"].errors == {"INVALID_ARGUMENT": 1}
    assert summary.values["memstore_rows_served_total"] == 30
    assert summary.values["memstore_bytes_served_total"] == 30 * DIM * 2
    assert summary.values["memstore_pushes_applied_total"] == 1
    assert summary.values["memstore_pushed_rows_total"] == 5
    assert summary.values["memstore_table_version"] == 1  # read off the table when scraped
    assert summary.values["memstore_in_flight_bytes"] == 0
    counts = metrics.counts()  # the daemon's periodic log line
    assert counts["lookups"] == 4 and counts["errors"] == 2 and counts["pushes"] == 1 and counts["rows served"] == 30


def test_metrics_over_http(trainable) -> None:
    metrics = DaemonMetrics()
    server, _ = create_server(trainable, "127.0.0.1:0", metrics=metrics)  # binds the version gauge to the table
    try:
        port = metrics.serve_http(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        assert server.stop(None).wait(DEADLINE_S)
        metrics.close_http()
    with pytest.raises(OSError):  # stopped: nothing is left listening after the test
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert "memstore_table_version 0.0" in text and "# TYPE memstore_request_seconds histogram" in text


def test_prefetch_stall_is_a_client_metric(table) -> None:
    from client import TableFetcher

    def sample(name: str) -> float:
        # The process-wide registry: other tests count too, so only this test's increase is checked.
        return REGISTRY.get_sample_value(name, {"layer": str(LAYER)}) or 0

    stalls_before = sample("memstore_client_prefetch_stall_seconds_count")
    rows_before = sample("memstore_client_prefetch_rows_total")
    ids = {LAYER: np.arange(20).reshape(2, 10)}
    with Prefetcher(TableFetcher(table), lambda _: ids, (LAYER,), PrefetchConfig(overlap=False)) as prefetcher:
        for step in range(3):
            with prefetcher.submit(step) as handle:
                handle.rows(LAYER)
    assert sample("memstore_client_prefetch_stall_seconds_count") == stalls_before + 3
    assert sample("memstore_client_prefetch_rows_total") == rows_before + 3 * 20


_CLIENT_STEPS = """
import sys
import numpy as np
from client import PrefetchConfig, Prefetcher, TableFetcher, metrics
from memstore.table import Table
if sys.argv[2] == "own-registry":
    import prometheus_client
    registry = prometheus_client.CollectorRegistry()
    metrics.enable(registry)
with Table.open(sys.argv[1]) as table, Prefetcher(
    TableFetcher(table), lambda _: {1: np.arange(20).reshape(2, 10)}, (1,), PrefetchConfig(overlap=False)
) as prefetcher:
    for step in range(3):
        with prefetcher.submit(step) as handle:
            handle.rows(1)
print(prefetcher.stats.requests, prefetcher.stats.rows, metrics.enabled(), "prometheus_client" in sys.modules)
if sys.argv[2] == "own-registry":
    print(registry.get_sample_value("memstore_client_prefetch_rows_total", {"layer": "1"}))
    print(prometheus_client.REGISTRY.get_sample_value("memstore_client_prefetch_rows_total", {"layer": "1"}))
    try:
        metrics.enable(prometheus_client.CollectorRegistry())
    except Exception as exc:
        print(type(exc).__name__)
"""


def _client_steps(table_path: Path, mode: str) -> list[str]:
    """The output lines of three prefetched steps in a fresh interpreter (`mode`: plain or own-registry)."""
    result = subprocess.run(
        [sys.executable, "-c", _CLIENT_STEPS, str(table_path), mode],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S * 4,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_client_metrics_are_off_without_prometheus_and_the_stats_still_count(table_path) -> None:
    # 3 rows() waits and 60 rows counted, no metrics registered, prometheus_client never imported.
    assert _client_steps(table_path, "plain") == ["3 60 False False"]


def test_client_metrics_go_to_the_registry_they_are_enabled_in(table_path) -> None:
    counted, rows, default, again = _client_steps(table_path, "own-registry")
    assert counted == "3 60 True True" and rows == "60.0" and default == "None"
    assert again == "InvalidArgumentError"  # registered once per process


def test_json_logs_are_one_object_per_line_with_extras_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("memstore.test_json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("lag %d versions", 7, extra={"replica": "b:1"})
        try:
            raise ValueError("broken")
        except ValueError:
            log.exception("it failed")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "lag 7 versions" and first["level"] == "WARNING" and first["replica"] == "b:1"
    assert first["logger"] == "memstore.test_json" and first["time"].endswith("+00:00")
    assert "ValueError: broken" in second["exception"]


def test_configure_logging_replaces_the_handlers(capsys) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(LogFormat.JSON)
        logging.getLogger("memstore.x").info("hello")
        assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["message"] == "hello"
        configure_logging(LogFormat.TEXT)
        logging.getLogger("memstore.x").info("hello")
        assert capsys.readouterr().err.rstrip().endswith("INFO memstore.x: hello")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _silent_connections(port: int, count: int) -> list[socket.socket]:
    """Connections that send nothing: half-open requests, as a scanner or attacker leaves them."""
    return [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) for _ in range(count)]


def test_the_metrics_endpoint_bounds_its_connections() -> None:
    """A thread per connection, unbounded: 1,000 half-open connections made 1,000 threads."""
    metrics = DaemonMetrics()
    port = metrics.serve_http(0)
    threads_before = threading.active_count()
    held = _silent_connections(port, METRICS_MAX_CONNECTIONS)
    extra = _silent_connections(port, 20)
    try:
        wait_until(
            lambda: metrics.total("memstore_metrics_connections_refused_total") == len(extra),
            "the connections beyond the bound to be refused",
        )
        for sock in extra:  # closed by the daemon at once, without a thread of their own
            assert sock.recv(1) == b""
        assert threading.active_count() <= threads_before + METRICS_MAX_CONNECTIONS
        for sock in held:
            sock.close()
        wait_until(lambda: threading.active_count() <= threads_before, "the held connections' threads to end")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE_S) as response:
            assert b"memstore_metrics_connections_refused_total 20.0" in response.read()
    finally:
        for sock in held + extra:
            sock.close()
        metrics.close_http()


def test_a_silent_metrics_connection_is_closed(monkeypatch) -> None:
    """A connection that never sends its request held its thread forever: now it times out."""
    monkeypatch.setattr(memstore.metrics._TimedHandler, "timeout", 0.2)  # METRICS_TIMEOUT_S, shortened for the test
    metrics = DaemonMetrics()
    port = metrics.serve_http(0)
    try:
        (sock,) = _silent_connections(port, 1)
        with sock:
            assert sock.recv(1) == b""  # the daemon hung up (the socket's own timeout is DEADLINE_S)
    finally:
        metrics.close_http()


def test_metrics_listen_on_loopback_unless_asked(table_path, tmp_path) -> None:
    """The metrics endpoint took the --listen host: plain HTTP on every interface beside a TLS daemon."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    args = ["--listen", "0.0.0.0:0", "--metrics-port", "0"]
    process, _ = start_daemon(table_path, args, env=env, stderr=subprocess.PIPE, text=True)
    assert stop_daemon(process) == 0
    said = process.stderr.read()
    assert re.search(r"metrics at http://127\.0\.0\.1:\d+/metrics", said), said
