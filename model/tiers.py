"""The daemon's tier as the model's reports show it: rows served, and its row cache's hits and misses, read
from the daemon's Prometheus metrics (the Stats RPC, what `memstore stats` prints) before and after a run.

The daemon counts every client's reads: the figures are this run's only when nothing else reads the
daemon meanwhile, and the reports say so. A client on the daemon's host reads the row cache's hits in
place (shared memory): only its misses reach the daemon's counters, so its hit rate is not among them.
"""

from __future__ import annotations

from client import MemstoreClient
from client.cache import CacheStats
from memstore.errors import MemstoreError
from memstore.metrics import summarize

_COUNTERS = {
    "rows": "memstore_rows_served_total",
    "bytes": "memstore_bytes_served_total",
    "hits": "memstore_row_cache_hits_total",
    "misses": "memstore_row_cache_misses_total",
    "disk_bytes": "memstore_row_cache_disk_bytes_total",
}


def daemon_counters(client: object) -> dict[str, float]:
    """The daemon's served rows and bytes and, when it has a row cache, that cache's counters; {} for a
    client that is not one daemon's (a cluster, a table in process) or a daemon whose stats cannot be read."""
    if not isinstance(client, MemstoreClient):
        return {}
    try:
        values = summarize(client.stats()).values
    except MemstoreError:  # a report must not fail a finished run
        return {}
    return {key: values[name] for key, name in _COUNTERS.items() if name in values}


def daemon_tier(before: dict[str, float], after: dict[str, float], row_bytes: int) -> CacheStats | None:
    """The daemon row cache's counters between two daemon_counters readings (tier "daemon row"), or None
    when the daemon has none. Hits are rows served from its memory; misses, rows it read from the table's files."""
    if "hits" not in after or "hits" not in before:
        return None
    hits = int(after["hits"] - before["hits"])
    misses = int(after["misses"] - before["misses"])
    return CacheStats(
        tier="daemon row",
        hits=hits,
        misses=misses,
        rows_fetched=misses,
        bytes_fetched=int(after.get("disk_bytes", 0.0) - before.get("disk_bytes", 0.0)),
        rows_saved=hits,
        bytes_saved=hits * row_bytes,
    )
