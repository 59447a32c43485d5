"""The memory budget of the calls a daemon serves at once: backpressure instead of growth.

Every Lookup and Push reserves what it will hold (its request, the rows it gathers or the
optimizer's working arrays) before doing any work, and gives it back when it ends. A call
that would take the daemon past its budget fails at once with RESOURCE_EXHAUSTED and a retry
hint; one that could never fit, even alone, says so and is not worth retrying.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from memstore.errors import ResourceExhaustedError

# Milliseconds a client should wait before retrying a call refused for load (gRPC's pushback).
BUSY_RETRY_MS = 50


def lookup_cost(num_ids: int, row_bytes: int, chunk_rows: int, window_bytes: int, request_bytes: int = 0) -> int:
    """Bytes a Lookup holds: its request as it came off the wire (`request_bytes`), its ids (as
    parsed and as local ids), the chunk being gathered and the one being sent, and what HTTP/2
    flow control lets queue up for a slow reader."""
    rows = 2 * min(num_ids, chunk_rows) * row_bytes + min(num_ids * row_bytes, window_bytes)
    return request_bytes + 16 * num_ids + rows


def push_cost(num_ids: int, dim: int, state_width: int, request_bytes: int = 0) -> int:
    """Bytes a Push holds: its request as it came off the wire (`request_bytes`), its ids and float32
    gradients (as parsed and decoded), and the optimizer's float32 rows and state (`state_width`
    floats a row) before and after the update."""
    return request_bytes + num_ids * (8 + 8 * dim + 8 * (dim + state_width))


class InFlightBudget:
    """Bytes reserved by the calls in progress, at most `limit` in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._reserved = 0

    @property
    def reserved(self) -> int:
        """Bytes reserved now."""
        return self._reserved

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold `nbytes` for the duration of the block, or raise ResourceExhaustedError."""
        if nbytes > self.limit:
            raise ResourceExhaustedError(
                f"{what} needs {nbytes:,} bytes of memory, more than this daemon's whole in-flight budget "
                f"(--max-in-flight-bytes {self.limit:,}): split it, or raise the budget"
            )
        with self._lock:
            if self._reserved + nbytes > self.limit:
                raise ResourceExhaustedError(
                    f"{what} needs {nbytes:,} bytes and the calls in progress hold {self._reserved:,} of this "
                    f"daemon's {self.limit:,} (--max-in-flight-bytes): retry shortly, or send smaller batches",
                    retry_after_s=BUSY_RETRY_MS / 1000,
                )
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= nbytes
