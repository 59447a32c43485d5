"""The replication feed: what a table hands its followers (memstore.replica, docs/replication.md).

Every record a table applies (a push, or a record replicated from its own primary) also goes to a
bounded in-memory `Feed`, from which `records_after` hands a follower the records past its version:
waiting for the next push when it is up to date, reading the write-ahead log when the feed no longer
holds them, and raising ReplicationGapError when neither does (the follower must restart from a
snapshot). The records are the log's payloads, byte for byte (memstore.tabledir.record).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from memstore.errors import ReplicationGapError, UnavailableError
from memstore.wal import WalRecord, WriteAheadLog


class Feed:
    """The records applied since a version `base`, the oldest evicted past a byte bound, and a
    condition streaming readers wait on for the next one.

    Holds consecutive versions (base, base + len]. The newest record is always kept, so a
    follower that keeps up is fed from memory even when one record is larger than the bound.
    """

    def __init__(self, path: Path, base: int, max_bytes: int) -> None:
        self.path = path  # the table's, for messages
        self.base = base
        self.max_bytes = max_bytes
        self.changed = threading.Condition()
        self.closed = False
        self._records: deque[WalRecord] = deque()
        self._bytes = 0

    def reset(self, base: int) -> None:
        """Hold nothing, from `base` on (the table's version jumped: recovery accepted a loss)."""
        with self.changed:
            self.base = base
            self._records.clear()
            self._bytes = 0

    def append(self, version: int, payload: bytes) -> None:
        """Add the record of `version` (the one after the last held) and wake the waiting readers."""
        with self.changed:
            self._records.append(WalRecord(version, payload))
            self._bytes += len(payload)
            while self._bytes > self.max_bytes and len(self._records) > 1:
                evicted = self._records.popleft()
                self._bytes -= len(evicted.payload)
                self.base = evicted.version
            self.changed.notify_all()

    def after(self, version: int, max_bytes: int) -> list[WalRecord] | None:
        """The held records past `version`, at least one and about max_bytes at most ([] when none
        is newer yet), or None when the record after `version` is not held. The caller holds `changed`."""
        if version < self.base:
            return None
        batch: list[WalRecord] = []
        size = 0
        for record in itertools.islice(self._records, version - self.base, None):
            if batch and size + len(record.payload) > max_bytes:
                break
            batch.append(record)
            size += len(record.payload)
        return batch

    def close(self) -> None:
        """Wake every waiting reader for good: the table stops serving followers."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()


def records_after(
    feed: Feed,
    version: int,
    max_bytes: int,
    timeout_s: float,
    applied: Callable[[], int],
    log: Callable[[], WriteAheadLog | None],
) -> list[WalRecord]:
    """The records a follower at `version` applies next (see `LiveTable.records_after`): from `feed`,
    else from the log `log()` returns; `applied()` is the table's version (the last record applied)."""
    deadline = time.monotonic() + timeout_s
    with feed.changed:
        while True:
            if feed.closed:
                raise UnavailableError(f"{feed.path} stopped serving followers (the daemon is stopping)")
            if version > applied():
                raise ReplicationGapError(
                    f"the follower's table is at version {version}, past this table's version {applied()}: "
                    "it has pushes this one never made (trained on its own, or this table was restored from "
                    "an older snapshot); replace the follower's table with a snapshot of this one"
                )
            held = feed.after(version, max_bytes)
            if held is None:
                break  # older than the feed: try the log, outside the lock
            if held:
                return held
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            feed.changed.wait(remaining)
    return _logged_records_after(feed, version, max_bytes, applied(), log())


def _logged_records_after(
    feed: Feed, version: int, max_bytes: int, applied: int, wal: WriteAheadLog | None
) -> list[WalRecord]:
    """`records_after` from the write-ahead log, for a follower older than the feed."""
    batch: list[WalRecord] = []
    size = 0
    oldest = feed.base  # the version after which this table holds every push
    # A push is logged before it is applied: records past the applied version stay for the next
    # call, or a follower could ask from a version this table does not show yet.
    if wal is not None:
        # The log keeps the pushes since the last checkpoint; iteration sees segments opened at
        # its start, so a checkpoint deleting them meanwhile does not disturb it.
        for record in wal.records(version):
            if not batch and record.version != version + 1:
                oldest = min(oldest, record.version - 1)  # the one after `version` was checkpointed away
                break
            if record.version > applied or batch and size + len(record.payload) > max_bytes:
                break
            batch.append(record)
            size += len(record.payload)
    if batch:
        return batch
    raise ReplicationGapError(
        f"the follower's table is at version {version}, too far behind to catch up by streaming: this table "
        f"(version {applied}) holds pushes only after version {oldest} (its in-memory feed keeps the "
        f"last {feed.max_bytes / 2**20:g} MiB of records, its log the pushes since its last "
        "checkpoint). A follower served with --reseed auto (the default) re-seeds itself from this daemon "
        "over StreamSnapshot; otherwise run `memstore reseed DIR --from ADDRESS` with the follower stopped. "
        "A larger --feed-bytes here keeps followers further behind in reach"
    )
