"""The PyTorch-side client of the Engram memstore."""

from client.client import MemstoreClient
from client.config import ClientConfig
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
    "MemstoreError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "UnavailableError",
    "DeadlineExceededError",
    "LayoutMismatchError",
]
