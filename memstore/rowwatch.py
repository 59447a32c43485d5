"""Row watching: the rows each push left, for clients' device caches to stay coherent (docs/cache.md).

A client that caches rows on its device while the table trains follows the table's pushes with
`WatchRows`: for every push past its version, the layer, the row ids (as lookups name them, so a
shard's own indices become the layer's ids again) and the rows after the push in the stored dtype.
Optimizer state and client ids stay on the daemon: a reader has no need for them, and a read
token may watch. The changes come from the same feed replicas follow (memstore.feed: memory, then
the write-ahead log); when neither holds the pushes after the watcher's version it gets
`RowWatchGapError` and starts over from the table's current version with an empty cache.

Each stream holds a thread of the daemon for its whole life, so watchers have an allowance of
their own (`row_watch_slots`, ServerConfig.max_row_watchers), apart from followers and calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from memstore.errors import InvalidArgumentError, ReplicationGapError
from memstore.guard import StreamSlots
from memstore.live import LiveTable
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.record import PushRecord

_POLL_S = 0.25  # how often a waiting watch checks that its stream is still wanted


class RowWatchGapError(ReplicationGapError):
    """The pushes after a watcher's version are no longer held: its cached rows cannot be brought up
    to date, so it drops them and watches again from the table's current version."""


@dataclass(frozen=True)
class RowChange:
    """One push's rows: `rows[i]` is row `ids[i]` of `layer_id` as the push of `version` left it."""

    version: int
    layer_id: int
    ids: np.ndarray  # int64 [N], the layer's row ids (not a shard's own indices)
    rows: np.ndarray  # [N, stored width] in the storage dtype


@dataclass(frozen=True)
class RowBatch:
    """The changes of the pushes up to `through` (those of the layers asked for), in version order."""

    changes: list[RowChange]
    through: int


def check_watch_layers(manifest: Manifest, layer_ids: Iterable[int]) -> frozenset[int] | None:
    """The layers a watcher asks for (None: all), or InvalidArgumentError naming one the table lacks."""
    wanted = frozenset(int(layer) for layer in layer_ids)
    unknown = wanted - set(manifest.layout.layer_ids)
    if unknown:
        raise InvalidArgumentError(
            f"WatchRows asks for layers {sorted(unknown)}; the table has layers {list(manifest.layout.layer_ids)}"
        )
    return wanted or None


def rows_after(
    live: LiveTable,
    version: int,
    layers: frozenset[int] | None,
    max_bytes: int,
    timeout_s: float,
    active: Callable[[], bool] = lambda: True,
) -> RowBatch:
    """The changes of the pushes after `version`, about max_bytes of records at most, waiting up to
    `timeout_s` for one when the watcher is up to date (then a batch with no changes, through `version`),
    or until `active()` turns False (checked every _POLL_S: a cancelled stream gives its thread back).
    RowWatchGapError when the table no longer holds them (or `version` is past the table's)."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            records = live.records_after(version, max_bytes, min(_POLL_S, max(0.0, deadline - time.monotonic())))
            if records or time.monotonic() >= deadline or not active():
                break
    except ReplicationGapError as exc:
        raise RowWatchGapError(
            f"a row watcher at version {version} cannot catch up: the table is at version {live.version} and "
            f"no longer holds every push after {version} ({exc}). The client drops its cached rows and "
            "watches from the current version; a larger --feed-bytes keeps slower watchers in reach"
        ) from None
    manifest = live.manifest
    changes = []
    for record in records:
        push = PushRecord.decode(record.payload, manifest)
        if layers is not None and push.layer_id not in layers:
            continue
        ids = push.ids
        if manifest.sharding is not None:  # a shard logs its own indices; lookups name the layer's rows
            ids = manifest.sharding.to_global(ids, manifest.layout.num_rows(push.layer_id))
        changes.append(RowChange(record.version, push.layer_id, np.asarray(ids, dtype=np.int64), push.rows))
    return RowBatch(changes, records[-1].version if records else version)


def row_watch_slots(limit: int) -> StreamSlots:
    """The WatchRows streams in progress, at most `limit` (--max-row-watchers) at once."""
    return StreamSlots(
        limit,
        lambda watcher, limit: (
            f"row watcher {watcher!r} refused: this daemon already streams row changes to {limit} watchers "
            "(--max-row-watchers); raise it, or cache fewer processes' rows (frozen tables and generation need "
            "no watcher)"
        ),
        retry_after_s=1.0,
    )
