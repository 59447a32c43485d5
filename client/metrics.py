"""What the memstore costs a training or inference process, as Prometheus metrics.

They live in prometheus-client's default registry, next to the process's own metrics: expose
them with `prometheus_client.start_http_server(PORT)` (scripts/train.py --metrics-port does).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Seconds: a prefetch that kept up costs microseconds; a cold fetch of a big batch, a second.
_BUCKETS = (1e-5, 1e-4, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

PREFETCH_STALL = Histogram(
    "memstore_client_prefetch_stall_seconds",
    "Time the model waited for a layer's prefetched rows (exposed stall; 0 when the fetch kept up)",
    ["layer"],
    buckets=_BUCKETS,
)
PREFETCH_GPU_STALL = Histogram(
    "memstore_client_prefetch_gpu_stall_seconds",
    "Time a CUDA stream waited for a layer's prefetched rows to be copied to the device (0 when the copy kept up)",
    ["layer"],
    buckets=_BUCKETS,
)
PREFETCH_ROWS = Counter("memstore_client_prefetch_rows", "Rows fetched by prefetchers, per layer", ["layer"])
PUSH_WAIT = Histogram(
    "memstore_client_push_wait_seconds",
    "Time a training step waited for earlier pushes to be acknowledged (the pusher's bound on steps in flight)",
    buckets=_BUCKETS,
)
