"""The daemon's Prometheus metrics (prometheus-client), and the summary `memstore stats` prints.

Each daemon keeps its own registry (several daemons may share a process in tests and
benchmarks); `memstore serve --metrics-port` exposes it over HTTP for Prometheus, and the
`Stats` RPC returns the same text, so `memstore stats ADDRESS` works wherever gRPC does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from memstore.limits import InFlightBudget
    from memstore.live import LiveTable
    from memstore.replica import Follower

# Latency buckets (seconds): a 1k-row lookup takes ~1 ms, a 256k-row one ~100 ms.
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class DaemonMetrics:
    """Counters, gauges and histograms of one daemon, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.in_flight = Gauge("memstore_in_flight_requests", "RPCs being served now", registry=r)
        self.in_flight_bytes = Gauge(
            "memstore_in_flight_bytes", "Memory reserved by the calls being served now (memstore.limits)", registry=r
        )
        self.version = Gauge("memstore_table_version", "Pushes applied to the table since creation", registry=r)
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

    def counts(self) -> dict[str, float]:
        """Running totals for the daemon's periodic log line."""
        return {
            "lookups": self.total("memstore_requests_total", method="Lookup"),
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

    def serve_http(self, port: int, address: str = "127.0.0.1") -> int:
        """Expose the metrics at http://address:port/metrics (0: a free port); returns the port."""
        server, _ = start_http_server(port, address, registry=self.registry)
        return server.server_port


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
        out.append(f"{'method':<12} {'calls':>10} {'p50 ms':>9} {'p99 ms':>9}  errors")
        for method, stats in sorted(self.methods.items()):
            errors = ", ".join(f"{code} {count}" for code, count in sorted(stats.errors.items())) or "-"
            out.append(f"{method:<12} {stats.calls:>10,} {stats.p50_s * 1e3:>9.2f} {stats.p99_s * 1e3:>9.2f}  {errors}")
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
