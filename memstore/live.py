"""A table being served and trained: consistent reads, optimizer pushes, a version, recovery, snapshots.

Push (one layer's gradients for distinct row ids), one at a time under the push lock:
1. gather the rows and their optimizer state, run the optimizer (memstore.optim): the after-image;
2. append the after-image to the write-ahead log (memstore.wal), durable per `Durability`;
3. apply it to the memory-mapped files inside the sequence lock (odd while writing);
4. outside the push lock, with synchronous replication (`LiveConfig.sync`, memstore.sync), wait
   until enough replicas hold it durably;
5. acknowledge with the new table version (the count of pushes applied since creation).
A push that fails validation changes nothing. Since a log record holds after-images, replaying
it is idempotent: recovery (on open) and snapshots simply re-write records in order.

Reads check the sequence lock (memstore.tabledir.seqlock, a file same-host clients map too)
around their gather and retry if a push overlapped (falling back to the push lock after a few
tries), so a row is seen before or after a push, never torn.

Durable state on disk: the row and state files, `checkpoint.json` (the version and per-layer
optimizer steps the files hold at least), and `wal/`. A checkpoint msyncs the files, records
the version, and drops log segments at or below it; recovery replays records above it.

A log record is a `PushRecord` (memstore.tabledir.record documents its bytes). Replication
(memstore.replica, docs/replication.md): every applied record also goes to a bounded in-memory
feed (memstore.feed, `LiveConfig.feed_bytes`) from which `records_after` hands followers the
records past their version. A table opened with `primary=` is a read replica: it refuses pushes
and takes its primary's records through `apply_replicated`, which logs and applies them exactly
as `push` does, so its files, versions and optimizer steps stay identical. Snapshots:
memstore.snapshots; the optimizer state and a push's checks: memstore.training.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memstore.errors import (
    DataLossError,
    InternalError,
    InvalidArgumentError,
    ReadOnlyError,
    TableFormatError,
    permission_message,
)
from memstore.feed import Feed, records_after
from memstore.integrity import IntegrityConfig, TableIntegrity
from memstore.optim import apply_update
from memstore.recovery import (
    Recovery,
    acknowledged_version,
    logged_after,
    pending_recovery,
    read_checkpoint,
    settle,
)
from memstore.rowcache import RowCache, RowCacheConfig
from memstore.snapshots import copy_table, publishing, replay_onto_copy, stage_snapshot
from memstore.space import DiskFullError
from memstore.storage import RowStore
from memstore.sync import SyncAcks, SyncConfig
from memstore.table import Table, read_manifest
from memstore.tabledir.checkpoint import Checkpoint, PushResult
from memstore.tabledir.lock import lock_reader, lock_writer
from memstore.tabledir.names import SEQLOCK_NAME, WAL_DIR
from memstore.tabledir.record import PushRecord
from memstore.tabledir.seqlock import SeqLock, consistent_gather
from memstore.training import checked_push, open_state, storable
from memstore.wal import Durability, WalRecord, WriteAheadLog

log = logging.getLogger("memstore.live")


@dataclass(frozen=True)
class LiveConfig:
    """Durability and checkpointing of a writable table."""

    durability: Durability = Durability.FSYNC
    checkpoint_every: int = 1000  # pushes between automatic checkpoints (0: only on close)
    # Bytes of the most recent records kept in memory for followers (the newest is always kept);
    # a follower further behind is served from the log, which holds the pushes since the last
    # checkpoint, and past that must restart from a snapshot.
    feed_bytes: int = 64 << 20
    # Serve even when acknowledged pushes cannot be accounted for on open (memstore.recovery), logging
    # what was lost, at a version past every one acknowledged before; without it such a table refuses to open.
    accept_data_loss: bool = False
    # Row checksums checked on read and by a background scrub (memstore.integrity).
    integrity: IntegrityConfig = field(default_factory=IntegrityConfig)
    # A DRAM cache of rows over the layer files (memstore.rowcache); RowCacheConfig.bytes 0: none.
    row_cache: RowCacheConfig = field(default_factory=RowCacheConfig)
    # Replicas that must hold a push durably before it is acknowledged (memstore.sync); 0: asynchronous.
    sync: SyncConfig = field(default_factory=SyncConfig)

    def __post_init__(self) -> None:
        if self.feed_bytes < 0:
            raise InvalidArgumentError(f"feed_bytes must be 0 or more; got {self.feed_bytes}")
        if not isinstance(self.row_cache, RowCacheConfig):
            kind = type(self.row_cache).__name__
            raise InvalidArgumentError(f"LiveConfig.row_cache takes RowCacheConfig, not {kind}")
        if not isinstance(self.sync, SyncConfig):
            raise InvalidArgumentError(f"LiveConfig.sync takes SyncConfig, not {type(self.sync).__name__}")


class LiveTable:
    """A table opened for serving: frozen (no optimizer, or read-only) or trainable.

    Use as a context manager, or call close() (which checkpoints a trainable table).
    """

    def __init__(
        self, table: Table, config: LiveConfig | None = None, writer_lock: Any = None, primary: str | None = None
    ) -> None:
        """Serve an open table: trainable when it has an optimizer and is open writable (then
        `writer_lock` is the flock from `open`, released on close). With `primary` (its address)
        the table is a read replica: it refuses pushes and applies the primary's records instead."""
        self.table: Table | None = table
        self.path = table.path
        self.manifest = table.manifest
        self.config = config or LiveConfig()
        self.trainable = self.manifest.optimizer is not None and not table.read_only
        self.primary = primary
        if primary is not None and not self.trainable:
            table.close()
            if writer_lock is not None:
                writer_lock.close()
            raise InvalidArgumentError(
                f"{self.path} cannot follow {primary}: "
                + (
                    "it has no optimizer, so it never changes; serve the copy without --follow"
                    if self.manifest.optimizer is None
                    else "a replica applies its primary's pushes, so it must be opened writable; drop --read-only"
                )
            )
        self._lock_file = writer_lock
        self._push_lock = threading.Lock()
        # One checkpoint at a time, in version order: two pushes can both find one due, and
        # interleaved checkpoints would share the temp file and could record an older version last.
        self._checkpoint_lock = threading.Lock()
        self._snapshots = 0  # snapshots in progress: the log must keep their records
        # Why this table can no longer take pushes safely (None: it can), and who wants to know.
        self.failure: str | None = None
        self._failure_listeners: list[Any] = []
        self._pushes_since_checkpoint = 0
        self._state: dict[int, dict[str, RowStore]] = {}
        self.seqlock: SeqLock | None = None
        self._wal: WriteAheadLog | None = None
        self.integrity: TableIntegrity | None = None  # None: checksums off (or the table has none, read-only)
        self.row_cache: RowCache | None = None
        # Replicas' durable versions, and the wait of a push for them (memstore.sync).
        self.sync = SyncAcks(self.config.sync, self.path)
        # Leader election (memstore.election): raises unless this daemon may commit a push now, called
        # under the push lock before each commit; and the leader epoch it serves under (0: no election).
        self.fence: Callable[[], None] | None = None
        self.epoch = 0
        self.election_state = ""  # where this daemon stands in the election (LeaderState's value; "": none)
        try:
            if self.config.row_cache.enabled:
                row_bytes = self.manifest.dtype.row_bytes(self.manifest.layout.dim)
                self.row_cache = RowCache(self.config.row_cache, row_bytes)
                table.cache_rows(self.row_cache)
                log.info("%s: %s", self.path, self.row_cache.describe())
            checkpoint = read_checkpoint(self.path, self.trainable and self.config.accept_data_loss)
            self.version = checkpoint.version
            self.layer_steps = {layer: checkpoint.layer_steps.get(layer, 0) for layer in self.manifest.layout.layer_ids}
            self._last_push = checkpoint.last_push  # (client, layer) -> (last step id, its ack)
            self._feed = Feed(self.path, self.version, self.config.feed_bytes)  # what followers stream (recovery adds)
            if self.trainable:
                self._state = open_state(self.path, self.manifest)
                log_missing = not (self.path / WAL_DIR).is_dir()
                acknowledged = acknowledged_version(self.path / SEQLOCK_NAME)  # before anything resets it
                self._wal = WriteAheadLog(self.path / WAL_DIR, self.config.durability)
                self._open_integrity(untrained=self.version == 0 and not self._wal.last_version)
                self._recover(log_missing, acknowledged)
                if self.integrity is not None:  # files ahead of the log (a host crash with --durability os)
                    self.integrity.check_not_ahead(self.version, checkpoint.version, self.config.accept_data_loss)
                self.seqlock = SeqLock(self.path / SEQLOCK_NAME, create=True)
                self.seqlock.set(2 * self.version)
            elif self.manifest.optimizer is not None:
                pending = pending_recovery(self.path, self.path / WAL_DIR, self.version, self.path / SEQLOCK_NAME)
                if pending is not None:
                    raise TableFormatError(
                        f"{pending}; open it writable once to recover (start its daemon without --read-only, then "
                        "stop it), or serve a snapshot read-only"
                    )
            if not self.trainable:
                self._open_integrity(untrained=False)
            if self.integrity is not None:
                self.integrity.start_scrub(self.config.integrity.scrub_period_s)
        except BaseException:
            self._close_files()
            raise

    def _open_integrity(self, untrained: bool) -> None:
        self.integrity = TableIntegrity.open(
            self.path,
            self.manifest,
            self._stores_by_name(uncached=True),  # checksums verify the files, and scrubs never fill the cache
            self.trainable,
            self._push_lock,
            self.config.integrity,
            untrained,
        )

    @classmethod
    def open(
        cls, path: str | Path, read_only: bool = False, config: LiveConfig | None = None, primary: str | None = None
    ) -> LiveTable:
        """Open a table directory for serving; writable (one writer per table) unless read_only or frozen.

        With `primary`, a read replica of the daemon at that address (see `apply_replicated`).
        """
        path = Path(path)
        manifest = read_manifest(path)
        writable = not read_only and manifest.optimizer is not None
        try:
            lock = lock_writer(path) if writable else lock_reader(path, manifest.optimizer is not None)
        except PermissionError as exc:
            raise TableFormatError(permission_message(Path(exc.filename or path))) from None
        try:
            table = Table.open(path, read_only=not writable)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        try:
            return cls(table, config, lock, primary)
        except PermissionError as exc:  # the log or the optimizer state (the files are closed already)
            raise TableFormatError(permission_message(Path(exc.filename or path))) from None

    @property
    def accepts_pushes(self) -> bool:
        """Whether `push` may succeed: trainable and not a replica."""
        return self.trainable and self.primary is None

    # -- reads -------------------------------------------------------------------------------

    def gather(self, layer_id: int, row_ids: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Rows [len(row_ids), dim] (storage dtype) none of them torn by a push, and the version they show."""
        ids = self.table.local_ids(layer_id, row_ids)
        return self._gather_checked(layer_id, self.table.store(layer_id), ids, out)

    def gather_chunks(
        self, layer_id: int, row_ids: np.ndarray, chunk_rows: int, buffer: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, int]]:
        """`gather` in consecutive chunks of at most chunk_rows rows, each with its version; every id
        is checked before the first chunk. With `buffer` ([>= chunk_rows, stored width], the stored
        dtype) every chunk is gathered into it: a chunk is valid until the next one is asked for."""
        if chunk_rows < 1:
            raise InvalidArgumentError(f"chunk_rows is {chunk_rows}; it must be at least 1")
        store = self.table.store(layer_id)
        ids = self.table.local_ids(layer_id, row_ids)
        for start in range(0, len(ids), chunk_rows):
            chunk = ids[start : start + chunk_rows]
            out = None if buffer is None else buffer[: len(chunk)]
            yield self._gather_checked(layer_id, store, chunk, out)

    def _gather_checked(
        self, layer_id: int, store: RowStore, ids: np.ndarray, out: np.ndarray | None
    ) -> tuple[np.ndarray, int]:
        if self.integrity is not None:
            self.integrity.check_rows(layer_id, ids)  # DataLossError for rows in damaged blocks
        got = consistent_gather(store, self.seqlock, ids, out, self.version)
        if got is None:  # pushes kept overlapping: exclude them for one read
            with self._push_lock:
                return store.gather(ids, out), self.version
        return got

    # -- writes ------------------------------------------------------------------------------

    def push(
        self,
        layer_id: int,
        row_ids: np.ndarray,
        grads: np.ndarray,
        *,
        lr_scale: float = 1.0,
        step_id: int = 0,
        client_id: str = "",
        acknowledge: bool = True,
    ) -> PushResult:
        """Apply the table's optimizer to distinct rows with their summed float32 gradients [N, dim].

        Returns once the update is durable (per `LiveConfig.durability`) and visible to readers, and
        with `LiveConfig.sync` once enough replicas hold it (`SyncAcks.acknowledge`: UnavailableError
        when they do not in time, the push applied all the same). A repeat of the last step id this
        client pushed to this layer is answered without applying anything, after the same wait.
        `acknowledge=False` returns after the commit: the caller then calls
        `self.sync.acknowledge(result.version)` itself before acknowledging (the gRPC servicer, which
        gives its work slot back while waiting).
        Bad input (unknown layer, ids out of range or repeated, wrong shape, non-finite values,
        a non-positive lr_scale, a client_id over 65535 bytes, an update that overflows float32 or
        the storage dtype) raises InvalidArgumentError and changes nothing.
        """
        if self.primary is not None:
            raise ReadOnlyError(
                f"pushes are refused: this daemon is a read replica of {self.primary}; push to the primary at "
                f"{self.primary}"
            )
        if not self.trainable:
            reason = (
                "it has no optimizer (create it with --optimizer)"
                if self.manifest.optimizer is None
                else "it is served read-only"
            )
            raise ReadOnlyError(f"pushes are refused: {reason}")
        assert self._wal is not None and self.seqlock is not None and self.manifest.optimizer is not None
        store = self.table.store(layer_id)
        ids = self.table.local_ids(layer_id, row_ids)  # the log and the files are in the shard's own row indices
        grads, optimizer = checked_push(self.manifest, ids, grads, lr_scale, client_id)
        dtype = self.manifest.dtype
        states = self._state[layer_id]
        due = False
        with self._push_lock:
            if self.fence is not None:  # before anything is logged or shown to readers
                self.fence()
            repeat = self._last_push.get((client_id, layer_id)) if step_id > 0 else None
            if repeat is not None and step_id <= repeat[0]:
                # A retry of a push already applied: apply nothing, answer it again (once its replicas hold it).
                result = repeat[1]
            else:
                step = self.layer_steps[layer_id] + 1
                if self.integrity is not None:  # never compute (log, replicate) an update from damaged rows or state
                    self.integrity.check_layer(layer_id, ids, locked=True)
                rows = dtype.to_float32(store.gather(ids))
                state = {slot: s.gather(ids) for slot, s in states.items()}
                new_rows, new_state = apply_update(optimizer, rows, state, grads, step)  # rejects NaN/Inf first
                record = PushRecord(layer_id, step, step_id, client_id, ids, storable(dtype, new_rows), new_state)
                payload = record.encode()
                result, due = self._commit(record, self.version + 1, payload)
        if due:
            self._checkpoint_due()
        if acknowledge:
            self.sync.acknowledge(result.version)  # outside the push lock: later pushes commit meanwhile
        return result

    def promote(self) -> None:
        """A replica becomes the primary (an election made it the leader): it takes pushes from now on,
        at its version, with its log and per-client step ids. Its follower must have stopped."""
        with self._push_lock:
            self.primary = None

    def add_failure_listener(self, listener: Any) -> None:
        """Call `listener(message)` once if the table fails so that it can no longer take pushes safely
        (a failed fsync of the log, a failed write after logging): the daemon turns NOT_SERVING."""
        self._failure_listeners.append(listener)
        if self.failure is not None:
            listener(self.failure)

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.error("%s", message)
            for listener in self._failure_listeners:
                listener(message)

    def _commit(self, record: PushRecord, version: int, payload: bytes) -> tuple[PushResult, bool]:
        """Reserve disk space, log, apply, feed (the caller holds the push lock); and whether a checkpoint
        is due. A full disk refuses the push before anything is logged (DiskFullError, and the next push
        may succeed); an I/O error after that leaves the table unable to take pushes until a restart,
        which replays the log."""
        if self.failure is not None:
            raise InternalError(self.failure)
        assert self._wal is not None
        # A full disk: DiskFullError with nothing logged or applied.
        record.reserve(self.table.store(record.layer_id), self._state[record.layer_id])
        if self.integrity is not None:  # and the pages of the rows' checksums (a sparse checksum file)
            self.integrity.reserve(record.layer_id, record.ids)
        try:
            self._wal.append(version, payload)  # a full disk: DiskFullError with the log as it was
        except OSError as exc:
            self._fail(
                f"{self.path}: the write-ahead log failed to write or sync the push of version {version} ({exc}); "
                "pushes acknowledged before may not be durable, so this daemon takes no more: restart it (it "
                "recovers from the log)"
            )
            raise InternalError(self.failure) from None
        try:
            result = self._apply(record, version)
        except BaseException as exc:
            self._fail(
                f"{self.path}: the push of version {version} was logged but writing it into the table failed "
                f"({exc!r}); this daemon takes no more pushes: restart it (it replays the log)"
            )
            raise
        self._feed.append(version, payload)  # after the apply: followers never pass this table
        self._pushes_since_checkpoint += 1
        every = self.config.checkpoint_every
        return result, bool(every and self._pushes_since_checkpoint >= every)

    def _checkpoint_due(self) -> None:
        """A checkpoint after a push: one that fails (a full disk) is retried later, never fails the push,
        which is logged and applied already."""
        try:
            self.checkpoint()
        except (OSError, DiskFullError) as exc:
            log.warning("%s: checkpoint failed (%s); the log keeps the pushes since the last one", self.path, exc)

    # -- replication ---------------------------------------------------------------------------

    def apply_replicated(self, version: int, payload: bytes) -> PushResult:
        """Apply one record streamed from the primary (a replica only): the push of `version`, as
        the primary logged it. Logged with this table's durability, then applied under the same
        sequence lock as a push (readers never see a torn row); the optimizer steps and each
        client's last step move exactly as on the primary. `version` must be the next one
        (DataLossError otherwise, and for a malformed record; nothing is applied then)."""
        if self.primary is None:
            raise ReadOnlyError(
                "apply_replicated is for read replicas; open the table with primary= (memstore serve --follow)"
            )
        assert self._wal is not None
        try:
            record = PushRecord.decode(payload, self.manifest)  # checked against this table: a bad one changes nothing
        except DataLossError as exc:
            raise DataLossError(f"the record of version {version} from {self.primary} is refused: {exc}") from None
        with self._push_lock:
            if version != self.version + 1:
                raise DataLossError(
                    f"the record of version {version} does not follow this replica's version {self.version}; "
                    f"follow {self.primary} again from version {self.version}"
                )
            result, due = self._commit(record, version, payload)  # a replica feeds replicas of its own too
        if due:
            self._checkpoint_due()
        return result

    def records_after(self, version: int, max_bytes: int, timeout_s: float) -> list[WalRecord]:
        """The records a follower at `version` applies next (consecutive, at least one, about
        max_bytes at most), waiting up to timeout_s for the next push; [] when none came (a
        heartbeat is due). From the feed, else the log; ReplicationGapError when neither holds
        them or `version` is past this table's, UnavailableError after `close_feed` (memstore.feed)."""
        return records_after(self._feed, version, max_bytes, timeout_s, lambda: self.version, lambda: self._wal)

    def close_feed(self) -> None:
        """Stop serving followers: wake every `records_after` waiting, which then raises
        UnavailableError (a stopping daemon must not wait for its streams' heartbeats), and every push
        waiting for its replicas, which fails UNAVAILABLE (they can no longer stream it from here)."""
        self._feed.close()
        self.sync.close()

    def _apply(self, record: PushRecord, version: int) -> PushResult:
        """Write an after-image into the files inside the sequence lock (caller holds the push lock)."""
        if self.seqlock is not None:
            self.seqlock.set(2 * self.version + 1)
        record.write_to(self.table.store(record.layer_id), self._state[record.layer_id])
        if self.integrity is not None:
            self.integrity.record_push(record.layer_id, record.ids, record.rows, record.state, version)
        self.layer_steps[record.layer_id] = record.layer_step
        self.version = version
        if self.seqlock is not None:
            self.seqlock.set(2 * version)
        result = PushResult(version, record.layer_step, len(record.ids))
        if record.step_id > 0:
            self._last_push[(record.client_id, record.layer_id)] = (record.step_id, result)
        return result

    # -- durability ----------------------------------------------------------------------------

    def _recover(self, log_missing: bool, acknowledged: int | None) -> None:
        """Replay logged pushes past the checkpoint (after-images: idempotent), account for every
        acknowledged push (memstore.recovery: logs what the log's recovery cut, refuses to open when
        acknowledged pushes are missing unless `accept_data_loss`), then checkpoint."""
        assert self._wal is not None
        checkpointed = self.version
        replayed = 0
        for record in logged_after(self._wal, self.path / WAL_DIR, self.version, self.config.accept_data_loss):
            if record.version != self.version + 1:  # a gap, accepted (and logged)
                self.version = record.version - 1
                self._feed.reset(self.version)
            self._apply(PushRecord.decode(record.payload, self.manifest), record.version)
            self._feed.append(record.version, record.payload)  # followers behind the crash can still catch up
            replayed += 1
        found = Recovery(
            self.path,
            checkpointed,
            self.version,
            self._wal.last_version,
            acknowledged,
            self._wal.tail_cut,
            log_missing,
            self.config.durability,
        )
        version = settle(found, self.config.accept_data_loss)
        if version != self.version:  # accepted: checkpoint.json was behind the log, whose version the files hold
            self.version = version
            self._feed.reset(version)
        if replayed or version != checkpointed or found.losses()[1]:
            self.checkpoint()  # records what was accepted, so the next open does not ask again

    def checkpoint(self) -> int:
        """Make the files durable at the current version, record it, and drop the log below it."""
        if not self.trainable:
            return self.version
        assert self._wal is not None
        with self._checkpoint_lock:
            with self._push_lock:
                checkpoint = Checkpoint(self.version, dict(self.layer_steps), dict(self._last_push))
                self._pushes_since_checkpoint = 0
            # Flushing outside the push lock may also flush later pushes: harmless, replay rewrites them.
            for store in self._stores_by_name().values():
                store.flush()
            if self.integrity is not None:
                self.integrity.flush()
            checkpoint.write(self.path)
            if not self._snapshots:
                self._wal.truncate_through(checkpoint.version)
        return checkpoint.version

    def snapshot(self, dest: str | Path) -> int:
        """A consistent copy (rows, optimizer state, manifest) at one version, taken while pushes go on.

        Files are copied without stopping pushes, then the pushes logged during the copy are
        replayed onto it, which brings every row to the version read at the end. Returns it.
        """
        dest = Path(dest)
        tmp = stage_snapshot(dest, sum(store.bytes_on_disk for store in self._stores_by_name().values()))
        if self.integrity is not None:
            self.integrity.refuse_if_damaged("a snapshot")
        with self._push_lock:
            start = self.version
            self._snapshots += 1
        try:
            with publishing(tmp, dest):
                copy_table(tmp, self.manifest, self._stores_by_name(), self.integrity)
                with self._push_lock:
                    end = Checkpoint(self.version, dict(self.layer_steps))
                replay_onto_copy(tmp, self.manifest, self._wal, self.integrity, start, end.version, self.path)
                end.write(tmp)
        finally:
            with self._push_lock:
                self._snapshots -= 1
        return end.version

    def _stores_by_name(self, uncached: bool = False) -> dict[str, RowStore]:
        """Every store of the table (rows, then optimizer state) by its name in the table directory
        (`uncached`: the stores under the row cache's)."""
        stores = {self.manifest.layer_file(layer): self.table.store(layer) for layer in self.manifest.layout.layer_ids}
        if uncached:
            stores = {name: getattr(store, "inner", store) for name, store in stores.items()}
        for layer, states in self._state.items():
            for slot, store in states.items():
                stores[self.manifest.state_files(layer)[slot][0]] = store
        return stores

    def close(self) -> None:
        """Checkpoint (trainable tables) and release the files. Idempotent."""
        if self.table is None:
            return
        self.close_feed()
        if self.trainable and self._wal is not None and self.failure is None:  # after a failure: the restart replays
            self.checkpoint()
        self._close_files()

    def _close_files(self) -> None:
        if self.integrity is not None:
            self.integrity.close()  # stops the scrub before the stores it reads close
            self.integrity = None
        for states in self._state.values():
            for store in states.values():
                store.close()
        self._state = {}
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        if self.seqlock is not None:
            self.seqlock.close()
            self.seqlock = None
        if self.table is not None:
            self.table.close()
            self.table = None
        if self.row_cache is not None:
            self.row_cache.close()
            self.row_cache = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def __enter__(self) -> LiveTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
