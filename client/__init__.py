"""The PyTorch-side client of the Engram memstore."""

from client.client import MemstoreClient, PushAck, sum_duplicate_rows
from client.cluster import ClusterClient
from client.cluster_spec import ClusterSpec
from client.config import ClientConfig, LoadBalancing
from client.prefetch import PrefetchConfig, Prefetcher, PrefetchHandle, PrefetchStats, TableFetcher
from client.push import PushConfig, Pusher, PushStats
from memstore.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    LayoutMismatchError,
    MemstoreError,
    ResourceExhaustedError,
    UnavailableError,
)

__all__ = [
    "MemstoreClient",
    "ClientConfig",
    "LoadBalancing",
    "ClusterClient",
    "ClusterSpec",
    "Prefetcher",
    "PrefetchConfig",
    "PrefetchHandle",
    "PrefetchStats",
    "TableFetcher",
    "Pusher",
    "PushConfig",
    "PushStats",
    "PushAck",
    "sum_duplicate_rows",
    "MemstoreError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "UnavailableError",
    "DeadlineExceededError",
    "LayoutMismatchError",
]
