"""The daemon's Prometheus metrics (prometheus-client), and the summary `memstore stats` prints.

Each daemon keeps its own registry (several daemons may share a process in tests and
benchmarks); `memstore serve --metrics-port` exposes it over HTTP for Prometheus, and the
`Stats` RPC returns the same text, so `memstore stats ADDRESS` works wherever gRPC does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from memstore.limits import InFlightBudget
    from memstore.live import LiveTable
    from memstore.replica import Follower
    from memstore.rowcache import RowCache
    from memstore.sync import SyncAcks

# Latency buckets (seconds): a 1k-row lookup takes ~1 ms, a 256k-row one ~100 ms.
log = logging.getLogger("memstore.metrics")

# The metrics endpoint serves this many connections at once and closes the others at once; each
# gets this many seconds per read or write (a half-open connection used to hold a thread forever).
METRICS_MAX_CONNECTIONS = 8
METRICS_TIMEOUT_S = 5.0
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class DaemonMetrics:
    """Counters, gauges and histograms of one daemon, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http_servers: list[_BoundedServer] = []
        r = self.registry
        self.requests = Counter(
            "memstore_requests", "RPCs finished, by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "memstore_request_seconds", "RPC latency, by method", ["method"], buckets=_BUCKETS, registry=r
        )
        self.rows_served = Counter("memstore_rows_served", "Rows returned by lookups", registry=r)
        self.bytes_served = Counter("memstore_bytes_served", "Row bytes returned by lookups", registry=r)
        self.pushes = Counter("memstore_pushes_applied", "Pushes applied to the table", registry=r)
        self.pushed_rows = Counter("memstore_pushed_rows", "Row updates applied by pushes", registry=r)
        self.rejected = Counter(
            "memstore_rejected",
            "Calls the daemon refused with RESOURCE_EXHAUSTED: too_large (over a limit by itself) or busy",
            ["reason"],
            registry=r,
        )
        self.auth_refused = Counter(
            "memstore_auth_refused",
            "Calls refused by the token check, by method and reason (missing, invalid or scope)",
            ["method", "reason"],
            registry=r,
        )
        self.metrics_connections_refused = Counter(
            "memstore_metrics_connections_refused",
            f"Metrics HTTP connections closed unserved: {METRICS_MAX_CONNECTIONS} were being served",
            registry=r,
        )
        self.in_flight = Gauge("memstore_in_flight_requests", "RPCs being served now", registry=r)
        self.data_plane_connections = Gauge(
            "memstore_data_plane_connections",
            "Data plane connections open now (their lookups: DataPlaneLookup)",
            registry=r,
        )
        self.in_flight_bytes = Gauge(
            "memstore_in_flight_bytes", "Memory reserved by the calls being served now (memstore.limits)", registry=r
        )
        self.version = Gauge("memstore_table_version", "Pushes applied to the table since creation", registry=r)
        self.sync_wait = Histogram(
            "memstore_sync_wait_seconds",
            "Seconds acknowledged or failed pushes waited for replicas to hold them (--sync-replicas)",
            buckets=_BUCKETS,
            registry=r,
        )
        self.replica_lag = Gauge(
            "memstore_replica_lag_versions",
            "Versions this replica trails its primary by (0 if not a replica)",
            registry=r,
        )

    def track(self, live: LiveTable, budget: InFlightBudget, replica: Follower | None = None) -> None:
        """Read the gauges off the served table, the in-flight budget and the replica when scraped."""
        self.version.set_function(lambda: live.version)
        self.in_flight_bytes.set_function(lambda: budget.reserved)
        if replica is not None:
            self.replica_lag.set_function(lambda: replica.status().lag)
        if live.row_cache is not None:
            self.registry.register(_RowCacheCollector(live.row_cache))
        self.registry.register(_SyncCollector(live.sync))

    def counts(self) -> dict[str, float]:
        """Running totals for the daemon's periodic log line."""
        return {
            "lookups": self.total("memstore_requests_total", method="Lookup")
            + self.total("memstore_requests_total", method="DataPlaneLookup"),
            "rows served": self.total("memstore_rows_served_total"),
            "pushes": self.total("memstore_pushes_applied_total"),
            "rows pushed": self.total("memstore_pushed_rows_total"),
            "errors": self.total("memstore_requests_total") - self.total("memstore_requests_total", code="OK"),
            "refused by limits": self.total("memstore_rejected_total"),
        }

    @contextlib.contextmanager
    def observe(self, method: str) -> Iterator[_CallOutcome]:
        """Time one RPC and count it by its final status (the caller sets `outcome.code` on failure)."""
        outcome = _CallOutcome()
        self.in_flight.inc()
        start = time.perf_counter()
        try:
            yield outcome
        except BaseException:
            if outcome.code is grpc.StatusCode.OK:
                outcome.code = grpc.StatusCode.UNKNOWN  # an abort sets its own code first
            raise
        finally:
            self.in_flight.dec()
            self.latency.labels(method).observe(time.perf_counter() - start)
            self.requests.labels(method, outcome.code.name).inc()

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def total(self, name: str, **labels: str) -> float:
        """The current value of a counter or gauge (summed over unnamed labels); 0 if never set."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def auth_refused_call(self, method: str, reason: str) -> None:
        """Count one call the token check refused (memstore.auth.TokenInterceptor's `on_refusal`)."""
        self.auth_refused.labels(method, reason).inc()

    def serve_http(self, port: int, address: str = "127.0.0.1") -> int:
        """Expose the metrics at http://address:port/metrics (0: a free port) on a daemon thread,
        at most METRICS_MAX_CONNECTIONS connections at once; returns the port."""
        if not _loopback(address):
            log.warning(
                "metrics served over plain HTTP without tokens on %s: anyone who can reach port %d there reads the "
                "daemon's counters; keep --metrics-host on 127.0.0.1 unless the network is trusted",
                address,
                port,
            )
        server_class = type("_MetricsServer", (_BoundedServer,), {})
        server_class.address_family, host = _get_best_family(address, port)
        server = server_class((host, port), _TimedHandler, self.metrics_connections_refused)
        server.set_app(make_wsgi_app(self.registry))
        threading.Thread(target=server.serve_forever, name="memstore-metrics", daemon=True).start()
        self._http_servers.append(server)
        return server.server_port

    def close_http(self) -> None:
        """Stop serving the metrics over HTTP (every endpoint `serve_http` started)."""
        while self._http_servers:
            server = self._http_servers.pop()
            server.shutdown()
            server.server_close()


class _RowCacheCollector(Collector):
    """The row cache's counters (memstore.rowcache), read when scraped."""

    def __init__(self, cache: RowCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        stats = self._cache.snapshot()
        for name, doc, value in (
            ("hits", "Rows read from the row cache", stats.hits),
            ("misses", "Rows the row cache did not hold, read from the store", stats.misses),
            ("admitted", "Rows put into the row cache", stats.admitted),
            ("evictions", "Rows the row cache dropped for others", stats.evictions),
            ("stale_skipped", "Rows read while a push of their layer was applied, not admitted", stats.stale_skipped),
            ("disk_reads", "Reads (runs of blocks) the row cache's misses took", stats.disk_reads),
            ("disk_bytes", "Bytes read from disk for the row cache's misses", stats.disk_bytes),
        ):
            yield CounterMetricFamily(f"memstore_row_cache_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "memstore_row_cache_resident_bytes", "Row bytes the row cache holds now", value=stats.resident_bytes
        )
        yield GaugeMetricFamily(
            "memstore_row_cache_capacity_bytes", "Memory the row cache takes (its budget)", value=stats.capacity_bytes
        )
        yield GaugeMetricFamily(
            "memstore_row_cache_direct_io",
            "1 when misses are read with O_DIRECT (out of the page cache), 0 when buffered",
            value=float(stats.direct_io),
        )


class _SyncCollector(Collector):
    """Synchronous replication (memstore.sync): what was acknowledged, what replicas hold, timeouts."""

    def __init__(self, sync: SyncAcks) -> None:
        self._sync = sync

    def collect(self) -> Iterator[Metric]:
        stats = self._sync.stats()
        yield GaugeMetricFamily(
            "memstore_sync_replicas_required",
            "Replicas a push waits for (--sync-replicas; 0: asynchronous)",
            value=self._sync.config.replicas,
        )
        yield GaugeMetricFamily(
            "memstore_acknowledged_version",
            "The highest version acknowledged to a client",
            value=stats.acknowledged_version,
        )
        yield GaugeMetricFamily(
            "memstore_sync_confirmed_version",
            "The highest version --sync-replicas replicas (at least one) reported holding durably",
            value=stats.confirmed_version,
        )
        yield GaugeMetricFamily(
            "memstore_sync_replicas_reporting",
            "Replicas that reported their durable version within the last 10 s",
            value=stats.reporting,
        )
        yield GaugeMetricFamily(
            "memstore_sync_degraded",
            "1 while pushes are acknowledged without waiting for replicas after a timeout (--sync-timeout-policy "
            "degrade)",
            value=float(stats.degraded),
        )
        yield CounterMetricFamily(
            "memstore_sync_timeouts",
            "Pushes fewer than --sync-replicas replicas confirmed within --sync-timeout-s",
            value=stats.timeouts,
        )
        yield CounterMetricFamily(
            "memstore_sync_degradations",
            "Times pushes went asynchronous after a timeout (--sync-timeout-policy degrade)",
            value=stats.degradations,
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _TimedHandler(_SilentHandler):
    timeout = METRICS_TIMEOUT_S  # socketserver sets it on the connection: a silent peer times out


class _BoundedServer(ThreadingWSGIServer):
    """A WSGI server with a thread per connection, up to METRICS_MAX_CONNECTIONS; beyond that a
    connection is closed at once (and counted) instead of getting a thread of its own."""

    request_queue_size = 64  # connections waiting for accept, so a burst is refused rather than left hanging

    def __init__(self, address: tuple[str, int], handler: type, refused: Counter) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)
        self._refused = refused

    def process_request(self, request: socket.socket, client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            self._refused.inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


@dataclass
class _CallOutcome:
    code: grpc.StatusCode = grpc.StatusCode.OK


@dataclass
class MethodStats:
    """One RPC method's calls, errors and latency, as `memstore stats` shows them."""

    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    p50_s: float = 0.0
    p99_s: float = 0.0


@dataclass
class StatsSummary:
    """What `memstore stats` prints, read back from the exposition text."""

    methods: dict[str, MethodStats]
    values: dict[str, float]  # every other sample: memstore_rows_served_total, memstore_rejected_total{reason=busy}

    def lines(self) -> list[str]:
        out = []
        for name, value in sorted(self.values.items()):
            out.append(f"{name:<40} {value:,.0f}")
        out.append(f"{'method':<16} {'calls':>10} {'p50 ms':>9} {'p99 ms':>9}  errors")
        for method, stats in sorted(self.methods.items()):
            errors = ", ".join(f"{code} {count}" for code, count in sorted(stats.errors.items())) or "-"
            out.append(f"{method:<16} {stats.calls:>10,} {stats.p50_s * 1e3:>9.2f} {stats.p99_s * 1e3:>9.2f}  {errors}")
        return out


def summarize(text: str) -> StatsSummary:
    """Calls, errors and latency quantiles (from histogram buckets) per method, and plain totals."""
    methods: dict[str, MethodStats] = {}
    values: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "memstore_requests_total":
                stats = methods.setdefault(sample.labels["method"], MethodStats())
                stats.calls += int(sample.value)
                if sample.labels["code"] != "OK":
                    stats.errors[sample.labels["code"]] = int(sample.value)
            elif sample.name == "memstore_request_seconds_bucket":
                buckets.setdefault(sample.labels["method"], []).append((float(sample.labels["le"]), sample.value))
            elif not sample.name.endswith("_created") and not sample.name.startswith("memstore_request_seconds"):
                labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    for method, counts in buckets.items():
        stats = methods.setdefault(method, MethodStats())
        stats.p50_s, stats.p99_s = _quantile(counts, 0.5), _quantile(counts, 0.99)
    return StatsSummary(methods, values)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Upper bound of the bucket holding quantile q (what the histogram can say; 0 without calls)."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if not total:
        return 0.0
    for bound, count in buckets:
        if count >= q * total:
            return bound if bound != float("inf") else buckets[-2][0]
    return buckets[-1][0]
