"""The PyTorch-side client of the Engram memstore."""

from client.client import MemstoreClient
from client.config import ClientConfig
from client.prefetch import PrefetchConfig, Prefetcher, PrefetchHandle, PrefetchStats, TableFetcher
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
    "Prefetcher",
    "PrefetchConfig",
    "PrefetchHandle",
    "PrefetchStats",
    "TableFetcher",
    "MemstoreError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "UnavailableError",
    "DeadlineExceededError",
    "LayoutMismatchError",
]
