"""Coherence of the device cache under training: resident rows follow the table's pushes.

Every row a training step reads is pushed right after, so a cache that only dropped pushed rows
would never hit while training. Instead a `CoherentRows` follows the daemon's `WatchRows` stream on
a thread of its own and writes each push's rows (their after-images, in the stored dtype) into the
slots where they are resident, in version order. Its `applied` version is the last push it has
taken in. The guarantee (docs/cache.md):

    every row a step is served from the cache shows the table at a version >= applied, and a step is
    served from the cache only once applied >= known - cache_max_lag,

where `known` is the newest version the client had heard of when the step began: the answers to its
own pushes and lookups, and the stream's heartbeats (so other processes' pushes count as soon as any
of those carries them). A step that cannot get there within `CacheConfig.coherence_wait_s` is served
from the store instead, and counted.

Why the rows are never older than `applied`: a missed row is fetched while the layer's lock is held,
so no change is applied to the layer meanwhile, and the lookup's version f is at least `applied` (the
stream only carries pushes the table had already applied). The admitted row's slot remembers f; a
later change of version v overwrites the slot only when v > f (a record older than the fetched row
never undoes it). A change touches only the rows it names, and the others did not change at v, so
after the change of version v every resident row shows the table at a version >= v.

When the daemon no longer holds the pushes after `applied` (its feed and log moved on, or it was
restored from an older snapshot) the watch fails with FAILED_PRECONDITION: the cache drops every row
and starts over from the table's current version (a resync, counted). A stream that breaks is
reopened from `applied`; one silent for `coherence_silence_s` is presumed dead and reopened too.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from memstore.errors import LayoutMismatchError, MemstoreError

if TYPE_CHECKING:
    from client.cache import CacheConfig, DeviceCache
    from client.client import WatchedBatch

log = logging.getLogger("client.coherence")

_BACKOFF_S = (0.05, 2.0)  # reconnecting a broken stream: first and longest wait


class CoherentRows:
    """Keeps a `DeviceCache`'s resident rows within `config.cache_max_lag` versions of what `client` knows.

    `client` is a MemstoreClient (anything with `version()`, `seen_version`, `note_version()` and
    `watch_rows()`). Starts following at once; `close()` stops the thread.
    """

    def __init__(self, client: Any, cache: DeviceCache, config: CacheConfig, timeout: float | None = None) -> None:
        self._client = client
        self._cache = cache
        self._config = config
        self._layers = tuple(cache.layers)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._stream: Any = None
        self._last_contact = time.monotonic()
        self.failed: MemstoreError | None = None  # why following stopped for good (steps then use the store)
        self._down = False  # the watch broke and is being reopened: steps use the store meanwhile, no waiting
        self.applied = client.version(timeout)  # the cache is empty: it is coherent with this version
        self._thread = threading.Thread(target=self._run, name="engram-cache-coherence", daemon=True)
        self._thread.start()

    def ready(self) -> bool:
        """Whether a step may be served from the cache: wait (up to `coherence_wait_s`) until applied is
        within cache_max_lag of the newest version the client knows; False when it did not get there."""
        target = self._client.seen_version - self._config.cache_max_lag
        if self.applied >= target:
            return True
        start = time.monotonic()
        deadline = start + self._config.coherence_wait_s
        with self._cond:
            while self.applied < target and self.failed is None and not self._down and not self._stop.is_set():
                now = time.monotonic()
                if now >= deadline:
                    break
                self._check_silence(now)
                self._cond.wait(min(deadline - now, 0.1))
        ok = self.applied >= target
        self._cache.count_coherence(waits=1, wait_s=time.monotonic() - start, served_from_store=0 if ok else 1)
        return ok

    def _check_silence(self, now: float) -> None:
        """Cancel a stream silent for too long (a dead connection looks idle): the thread reopens it."""
        stream = self._stream
        if stream is not None and now - self._last_contact > self._config.coherence_silence_s:
            log.warning("the row watch was silent for over %gs: reopening it", self._config.coherence_silence_s)
            self._last_contact = now
            stream.cancel()

    def _run(self) -> None:
        backoff = _BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                stream = self._client.watch_rows(self.applied, self._layers, self._config.coherence_heartbeat_s)
                self._stream = stream
                if self._stop.is_set():  # close() came before the stream was published
                    stream.cancel()
                    return
                for batch in stream:
                    self._last_contact = time.monotonic()
                    self._down = False
                    self._apply(batch)
                    backoff = _BACKOFF_S[0]
            except LayoutMismatchError as exc:  # FAILED_PRECONDITION: the pushes after `applied` are gone
                if self._stop.is_set():
                    return
                self._set_down()
                log.warning("device cache resync: %s", exc)
                try:
                    self._resync()
                except MemstoreError as retry:  # the daemon went away meanwhile: try again shortly
                    log.warning("device cache resync failed: %s", retry)
                    self._stop.wait(backoff)
                    backoff = min(2 * backoff, _BACKOFF_S[1])
                continue
            except MemstoreError as exc:
                if self._stop.is_set():
                    return
                if exc.code.name not in ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"):
                    self._fail(exc)  # refused for good (permission, a bad layer): steps use the store from now on
                    return
                log.info("the row watch stopped (%s): reopening it from version %d", exc, self.applied)
                self._set_down()
            except BaseException as exc:  # never die silently: steps would wait for nothing
                self._fail(MemstoreError(f"the row watch failed: {exc!r}"))
                raise
            self._stop.wait(backoff)
            backoff = min(2 * backoff, _BACKOFF_S[1])

    def _set_down(self) -> None:
        with self._cond:
            self._down = True
            self._cond.notify_all()

    def _apply(self, batch: WatchedBatch) -> None:
        for change in batch.changes:
            refreshed = self._cache.apply_change(change.layer_id, change.version, change.ids, change.rows)
            self._cache.count_coherence(rows_refreshed=refreshed, bytes_received=change.rows.nbytes + change.ids.nbytes)
        self._client.note_version(batch.table_version)
        with self._cond:
            self.applied = max(self.applied, batch.through_version)
            self._cond.notify_all()

    def _resync(self) -> None:
        """Drop every cached row and follow from the table's current version."""
        version = self._client.version()
        self._cache.invalidate()  # under every layer's lock: no lookup runs meanwhile
        with self._cond:
            self.applied = version
            self._cond.notify_all()
        self._cache.count_coherence(resyncs=1)

    def _fail(self, exc: MemstoreError) -> None:
        log.error("device cache coherence stopped, every step is served from the store from now on: %s", exc)
        with self._cond:
            self.failed = exc
            self._cond.notify_all()

    def close(self) -> None:
        """Stop following (idempotent)."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(10.0)
