"""What the memstore costs a training or inference process, as Prometheus metrics.

`import client` loads no prometheus_client: the metrics exist once asked for. `enable()` registers
them (in prometheus-client's default registry, next to the process's own metrics, unless given
another); expose them with `prometheus_client.start_http_server(PORT)`. `python -m model.train
--metrics-port PORT` does both. A process that imports prometheus_client itself gets them without
asking: they register at the first observation after that import, in the default registry.

`PrefetchStats` and `PushStats` count the same quantities whether the metrics are on or not.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

from memstore.errors import InvalidArgumentError

# Seconds: a prefetch that kept up costs microseconds; a cold fetch of a big batch, a second.
_BUCKETS = (1e-5, 1e-4, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class _Metrics:
    registry: Any
    prefetch_stall: Any
    prefetch_gpu_stall: Any
    prefetch_rows: Any
    push_wait: Any
    cache_hits: Any
    cache_misses: Any
    cache_bytes_saved: Any
    coherence_rows: Any
    coherence_bytes: Any
    coherence_waits: Any
    coherence_wait: Any
    coherence_from_store: Any
    coherence_resyncs: Any


_enabled: _Metrics | None = None
_lock = threading.Lock()


def enable(registry: Any = None) -> None:
    """Register the client's metrics in `registry` (prometheus-client's default when None).

    Idempotent; ImportError without prometheus-client, InvalidArgumentError when they are already
    registered in another registry.
    """
    global _enabled
    import prometheus_client

    registry = prometheus_client.REGISTRY if registry is None else registry
    with _lock:
        if _enabled is not None:
            if _enabled.registry is not registry:
                raise InvalidArgumentError(
                    "the client's metrics are already registered in another registry; enable them once per process"
                )
            return
        _enabled = _Metrics(
            registry,
            prometheus_client.Histogram(
                "memstore_client_prefetch_stall_seconds",
                "Time the model waited for a layer's prefetched rows (exposed stall; 0 when the fetch kept up)",
                ["layer"],
                buckets=_BUCKETS,
                registry=registry,
            ),
            prometheus_client.Histogram(
                "memstore_client_prefetch_gpu_stall_seconds",
                "Time a CUDA stream waited for a layer's prefetched rows to be copied to the device "
                "(0 when the copy kept up)",
                ["layer"],
                buckets=_BUCKETS,
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_prefetch_rows", "Rows fetched by prefetchers, per layer", ["layer"], registry=registry
            ),
            prometheus_client.Histogram(
                "memstore_client_push_wait_seconds",
                "Time a training step waited for earlier pushes to be acknowledged (the pusher's bound on steps "
                "in flight)",
                buckets=_BUCKETS,
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_hits",
                "Row accesses served by a client cache tier, per layer",
                ["layer", "tier"],
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_misses",
                "Row accesses a client cache tier missed (fetched from the store), per layer",
                ["layer", "tier"],
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_bytes_saved",
                "Bytes of rows a client cache tier served instead of the store, per layer",
                ["layer", "tier"],
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_rows_refreshed",
                "Cached rows a coherent device cache overwrote with a push's after-image",
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_coherence_bytes",
                "Bytes of row ids and rows a coherent device cache received from its row watch",
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_coherence_waits",
                "Steps that waited for the row watch to come within the cache's lag bound",
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_coherence_wait_seconds",
                "Time steps waited for the row watch to come within the cache's lag bound",
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_served_from_store",
                "Steps a coherent device cache left to the store because its row watch stayed too far behind",
                registry=registry,
            ),
            prometheus_client.Counter(
                "memstore_client_cache_resyncs",
                "Times a coherent device cache dropped every row (the daemon no longer held the pushes it missed)",
                registry=registry,
            ),
        )


def enabled() -> bool:
    """Whether the metrics are registered (explicitly, or because the process imported prometheus_client)."""
    return _current() is not None


def _current() -> _Metrics | None:
    if _enabled is None and "prometheus_client" in sys.modules:
        enable()
    return _enabled


def observe_prefetch_stall(layer_id: int, seconds: float) -> None:
    """One rows() wait of a prefetched layer."""
    if (metrics := _current()) is not None:
        metrics.prefetch_stall.labels(str(layer_id)).observe(seconds)


def observe_prefetch_gpu_stall(layer_id: int, seconds: float) -> None:
    """One wait of a consumer stream for a layer's copy to the device."""
    if (metrics := _current()) is not None:
        metrics.prefetch_gpu_stall.labels(str(layer_id)).observe(seconds)


def count_prefetch_rows(layer_id: int, rows: int) -> None:
    """Rows one prefetch lookup fetched."""
    if (metrics := _current()) is not None:
        metrics.prefetch_rows.labels(str(layer_id)).inc(rows)


def observe_push_wait(seconds: float) -> None:
    """One wait of a training step for earlier pushes to be acknowledged."""
    if (metrics := _current()) is not None:
        metrics.push_wait.observe(seconds)


def count_cache(layer_id: int, tier: str, hits: int, misses: int, bytes_saved: int) -> None:
    """One lookup through a cache tier: accesses hit and missed, bytes the store did not send."""
    if (metrics := _current()) is not None:
        labels = (str(layer_id), tier)
        metrics.cache_hits.labels(*labels).inc(hits)
        metrics.cache_misses.labels(*labels).inc(misses)
        metrics.cache_bytes_saved.labels(*labels).inc(bytes_saved)


def count_coherence(
    rows_refreshed: int, bytes_received: int, waits: int, wait_s: float, served_from_store: int, resyncs: int
) -> None:
    """What a coherent device cache's row watch did: rows refreshed, bytes received, waits, store steps, resyncs."""
    metrics = _current()
    if metrics is not None:
        metrics.coherence_rows.inc(rows_refreshed)
        metrics.coherence_bytes.inc(bytes_received)
        metrics.coherence_waits.inc(waits)
        metrics.coherence_wait.inc(wait_s)
        metrics.coherence_from_store.inc(served_from_store)
        metrics.coherence_resyncs.inc(resyncs)
