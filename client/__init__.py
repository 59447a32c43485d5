"""The PyTorch-side client of the Engram memstore."""

from client.cache import CacheConfig, CachedReader, CachePolicy, CacheStats, DeviceCache
from client.client import MemstoreClient, PushAck, sum_duplicate_rows
from client.cluster import ClusterClient
from client.cluster_spec import ClusterSpec
from client.config import ClientConfig, LoadBalancing
from client.embedding import RemoteEmbedding
from client.prefetch import PrefetchConfig, Prefetcher, PrefetchHandle, PrefetchStats, TableFetcher
from client.protocol import RowReader, RowWriter, TableClient
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
    "TableClient",
    "RowReader",
    "RowWriter",
    "RemoteEmbedding",
    "Prefetcher",
    "PrefetchConfig",
    "PrefetchHandle",
    "PrefetchStats",
    "TableFetcher",
    "CacheConfig",
    "CachePolicy",
    "CacheStats",
    "CachedReader",
    "DeviceCache",
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
