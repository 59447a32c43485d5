"""A table being served and trained: consistent reads, optimizer pushes, a version, recovery, snapshots.

Push (one layer's gradients for distinct row ids), one at a time under the push lock:
1. gather the rows and their optimizer state, run the optimizer (memstore.optim): the after-image;
2. append the after-image to the write-ahead log (memstore.wal), durable per `Durability`;
3. apply it to the memory-mapped files inside the sequence lock (odd while writing);
4. acknowledge with the new table version (the count of pushes applied since creation).
A push that fails validation changes nothing. Since a log record holds after-images, replaying
it is idempotent: recovery (on open) and snapshots simply re-write records in order.

Reads check the sequence lock around their gather and retry if a push overlapped (falling back
to the push lock after a few tries), so a row is seen before or after a push, never torn. The
sequence word lives in a small shared file (`seqlock`) that same-host clients map too: they use
the same protocol, so in-place reads stay consistent while the daemon trains. The protocol
relies on the CPU keeping stores in order and loads in order (x86-64's TSO does); same-host
reads of a trained table are refused on other architectures (memstore.same_host).

Durable state on disk: the row and state files, `checkpoint.json` (the version and per-layer
optimizer steps the files hold at least), and `wal/`. A checkpoint msyncs the files, records
the version, and drops log segments at or below it; recovery replays records above it.

Replication (memstore.replica, docs/replication.md): every applied record also goes to a
bounded in-memory feed (`LiveConfig.feed_bytes`), from which `records_after` hands followers the
records past their version (waiting for the next push when they are up to date; reading the
log when the feed no longer holds them). A table opened with `primary=` is a read replica: it
refuses pushes and takes its primary's records through `apply_replicated`, which logs and
applies them exactly as `push` does, so its files, versions and optimizer steps stay identical.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from memstore.dtypes import DType
from memstore.errors import (
    DataLossError,
    InternalError,
    InvalidArgumentError,
    ReadOnlyError,
    ReplicationGapError,
    TableFormatError,
    UnavailableError,
    permission_message,
)
from memstore.integrity import IntegrityConfig, TableIntegrity
from memstore.optim import apply_update, listed_positions
from memstore.recovery import Recovery, acknowledged_version, pending_recovery, settle
from memstore.space import DiskFullError, check_free, disk_full_error, is_disk_full
from memstore.storage import RowStore
from memstore.table import Table, open_store, read_manifest
from memstore.tabledir.checkpoint import Checkpoint, PushResult
from memstore.tabledir.lock import TableInUseError, TableLock, lock_table, record_writer_pid
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import SEQLOCK_NAME, WAL_DIR
from memstore.tabledir.seqlock import SeqLock, consistent_gather
from memstore.tabledir.staging import publish_dir, staging_dir
from memstore.wal import Durability, WalRecord, WriteAheadLog, inspect_log

_RECORD_HEADER = struct.Struct("<IQqQH")  # layer id, layer step, client's step id, rows, client id length
_MAX_CLIENT_ID_BYTES = (1 << 16) - 1  # the record header's client id length is 16 bits

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

    def __post_init__(self) -> None:
        if self.feed_bytes < 0:
            raise InvalidArgumentError(f"feed_bytes must be 0 or more; got {self.feed_bytes}")


class _Feed:
    """The records applied since a version `base`, the oldest evicted past a byte bound, and a
    condition streaming readers wait on for the next one.

    Holds consecutive versions (base, base + len]. The newest record is always kept, so a
    follower that keeps up is fed from memory even when one record is larger than the bound.
    """

    def __init__(self, base: int, max_bytes: int) -> None:
        self.base = base
        self.max_bytes = max_bytes
        self.changed = threading.Condition()
        self.closed = False
        self._records: deque[WalRecord] = deque()
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
        try:
            checkpoint = self._read_checkpoint()
            self.version = checkpoint.version
            self.layer_steps = {layer: checkpoint.layer_steps.get(layer, 0) for layer in self.manifest.layout.layer_ids}
            self._last_push = checkpoint.last_push  # (client, layer) -> (last step id, its ack)
            self._feed = _Feed(self.version, self.config.feed_bytes)  # what followers stream (recovery adds to it)
            if self.trainable:
                self._state = _open_state(self.path, self.manifest)
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

    def _read_checkpoint(self) -> Checkpoint:
        """checkpoint.json; a damaged one is refused, unless `accept_data_loss` (then the log's version is
        adopted by recovery, and the optimizer steps and clients' last steps start again from zero)."""
        try:
            return Checkpoint.read(self.path)
        except TableFormatError as exc:
            if not (self.trainable and self.config.accept_data_loss):
                raise TableFormatError(
                    f"{exc}, or start it with --accept-data-loss to serve it at the version its log records (its "
                    "optimizer steps and the clients' last steps are then lost)"
                ) from None
            log.error(
                "%s: ACCEPTING DATA LOSS (--accept-data-loss): %s; starting from an empty checkpoint",
                self.path,
                exc,
            )
            return Checkpoint()

    def _open_integrity(self, untrained: bool) -> None:
        self.integrity = TableIntegrity.open(
            self.path,
            self.manifest,
            self._stores_by_name(),
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
            lock = lock_writer(path) if writable else _lock_reader(path, manifest)
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

    def gather_chunks(self, layer_id: int, row_ids: np.ndarray, chunk_rows: int) -> Iterator[tuple[np.ndarray, int]]:
        """`gather` in consecutive chunks of at most chunk_rows rows, each with its version; every id
        is checked before the first chunk."""
        if chunk_rows < 1:
            raise InvalidArgumentError(f"chunk_rows is {chunk_rows}; it must be at least 1")
        store = self.table.store(layer_id)
        ids = self.table.local_ids(layer_id, row_ids)
        for start in range(0, len(ids), chunk_rows):
            yield self._gather_checked(layer_id, store, ids[start : start + chunk_rows], None)

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
    ) -> PushResult:
        """Apply the table's optimizer to distinct rows with their summed float32 gradients [N, dim].

        Returns once the update is durable (per `LiveConfig.durability`) and visible to readers.
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
        grads = np.asarray(grads)
        dim = self.manifest.layout.dim
        if grads.dtype != np.float32 or grads.shape != (len(ids), dim):
            raise InvalidArgumentError(
                f"gradients must be float32 [{len(ids)}, {dim}] (one row per id); got {grads.dtype} {grads.shape}"
            )
        if len(np.unique(ids)) != len(ids):
            raise InvalidArgumentError("row ids of a push must be distinct; sum the gradients of repeated ids first")
        if not (np.isfinite(lr_scale) and lr_scale > 0):
            raise InvalidArgumentError(f"lr_scale must be a positive finite number; got {lr_scale}")
        if len(client_id.encode()) > _MAX_CLIENT_ID_BYTES:
            # The log record stores the id with a 16-bit length: a longer one would be cut, maybe inside a
            # UTF-8 character, and the record could then never be replayed (recovery, snapshots, replicas).
            raise InvalidArgumentError(
                f"client_id is {len(client_id.encode())} bytes of UTF-8; at most {_MAX_CLIENT_ID_BYTES}: "
                "name the client more briefly"
            )
        optimizer = self.manifest.optimizer
        if lr_scale != 1.0:
            lr = optimizer.lr * lr_scale
            try:
                optimizer = replace(optimizer, lr=lr)
            except InvalidArgumentError:  # checked in float32, where the update is computed
                raise InvalidArgumentError(
                    f"lr_scale {lr_scale!r} times the table's lr {optimizer.lr!r} gives a learning rate of {lr!r}, "
                    "which is not a positive finite float32 (the update is computed in float32): scale it less"
                ) from None
        dtype = self.manifest.dtype
        states = self._state[layer_id]
        with self._push_lock:
            repeat = self._last_push.get((client_id, layer_id)) if step_id > 0 else None
            if repeat is not None and step_id <= repeat[0]:
                return repeat[1]  # a retry of a push already applied: answer it again, apply nothing
            step = self.layer_steps[layer_id] + 1
            if self.integrity is not None:  # never compute (log, replicate) an update from damaged rows or state
                self.integrity.check_layer(layer_id, ids, locked=True)
            rows = dtype.to_float32(store.gather(ids))
            state = {slot: s.gather(ids) for slot, s in states.items()}
            new_rows, new_state = apply_update(optimizer, rows, state, grads, step)  # rejects NaN/Inf first
            record = _Record(layer_id, step, step_id, client_id, ids, _storable(dtype, new_rows), new_state)
            payload = record.encode()
            result = self._log_and_apply(record, self.version + 1, payload)
            self._feed.append(result.version, payload)  # after the apply: followers never pass this table
            self._pushes_since_checkpoint += 1
            due = self.config.checkpoint_every and self._pushes_since_checkpoint >= self.config.checkpoint_every
        if due:
            self._checkpoint_due()
        return result

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

    def _log_and_apply(self, record: _Record, version: int, payload: bytes) -> PushResult:
        """Reserve disk space, log, apply (the caller holds the push lock). A full disk refuses the push
        before anything is logged (DiskFullError, and the next push may succeed); an I/O error after that
        leaves the table unable to take pushes until a restart, which replays the log."""
        if self.failure is not None:
            raise InternalError(self.failure)
        assert self._wal is not None
        record.reserve(self.table, self._state)  # a full disk: DiskFullError with nothing logged or applied
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
            return self._apply(record, version)
        except BaseException as exc:
            self._fail(
                f"{self.path}: the push of version {version} was logged but writing it into the table failed "
                f"({exc!r}); this daemon takes no more pushes: restart it (it replays the log)"
            )
            raise

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
        record = self._decode_replicated(version, payload)
        with self._push_lock:
            if version != self.version + 1:
                raise DataLossError(
                    f"the record of version {version} does not follow this replica's version {self.version}; "
                    f"follow {self.primary} again from version {self.version}"
                )
            result = self._log_and_apply(record, version, payload)
            self._feed.append(version, payload)  # a replica can feed replicas of its own
            self._pushes_since_checkpoint += 1
            due = self.config.checkpoint_every and self._pushes_since_checkpoint >= self.config.checkpoint_every
        if due:
            self._checkpoint_due()
        return result

    def _decode_replicated(self, version: int, payload: bytes) -> _Record:
        """A streamed record decoded and checked against this table, so a bad one changes nothing."""
        try:
            record = _Record.decode(payload, self.manifest)
        except (struct.error, ValueError, InvalidArgumentError) as exc:  # truncated, bad layer, bad client id
            raise DataLossError(f"the record of version {version} from {self.primary} is malformed: {exc}") from None
        stored = self.manifest.stored_rows(record.layer_id)
        if len(record.ids) and not (0 <= int(record.ids.min()) and int(record.ids.max()) < stored):
            raise DataLossError(
                f"the record of version {version} from {self.primary} writes rows outside layer "
                f"{record.layer_id}'s {stored} rows"
            )
        return record

    def records_after(self, version: int, max_bytes: int, timeout_s: float) -> list[WalRecord]:
        """The records a follower at `version` applies next (consecutive, at least one, about
        max_bytes at most), waiting up to timeout_s for the next push; [] when none came (a
        heartbeat is due).

        From the in-memory feed, else from the write-ahead log while it still holds them.
        Raises ReplicationGapError when neither does, or when `version` is past this table's
        (the follower's table has pushes this one never made), and UnavailableError once the
        table stopped feeding followers (`close_feed`).
        """
        deadline = time.monotonic() + timeout_s
        feed = self._feed
        with feed.changed:
            while True:
                if feed.closed:
                    raise UnavailableError(f"{self.path} stopped serving followers (the daemon is stopping)")
                if version > self.version:
                    raise ReplicationGapError(
                        f"the follower's table is at version {version}, past this table's version {self.version}: "
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
        return self._logged_records_after(version, max_bytes, feed.base)

    def _logged_records_after(self, version: int, max_bytes: int, feed_base: int) -> list[WalRecord]:
        """`records_after` from the write-ahead log, for a follower older than the feed."""
        batch: list[WalRecord] = []
        size = 0
        oldest = feed_base  # the version after which this table holds every push
        # A push is logged before it is applied: records past the applied version stay for the next
        # call, or a follower could ask from a version this table does not show yet.
        applied = self.version
        if self._wal is not None:
            # The log keeps the pushes since the last checkpoint; iteration sees segments opened at
            # its start, so a checkpoint deleting them meanwhile does not disturb it.
            for record in self._wal.records(version):
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
            f"(version {self.version}) holds pushes only after version {oldest} (its in-memory feed keeps the "
            f"last {self.config.feed_bytes / 2**20:g} MiB of records, its log the pushes since its last "
            "checkpoint). Take a snapshot on this daemon (`memstore snapshot ADDRESS NAME`), copy it to the "
            "follower's table directory and restart the follower; a larger --feed-mb here keeps followers "
            "further behind in reach"
        )

    def close_feed(self) -> None:
        """Stop serving followers: wake every `records_after` waiting, which then raises
        UnavailableError (a stopping daemon must not wait for its streams' heartbeats)."""
        self._feed.close()

    def _apply(self, record: _Record, version: int) -> PushResult:
        """Write an after-image into the files inside the sequence lock (caller holds the push lock)."""
        if self.seqlock is not None:
            self.seqlock.set(2 * self.version + 1)
        record.write_to(self.table, self._state)
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
        for record in self._wal.records(self.version):
            if record.version != self.version + 1:
                gap = (
                    f"{self.path / WAL_DIR} jumps from version {self.version} (checkpoint.json's) to "
                    f"{record.version}: pushes {self.version + 1}..{record.version - 1} are missing"
                )
                if not self.config.accept_data_loss:
                    raise DataLossError(
                        f"{gap}; restore the table from a snapshot, or start with --accept-data-loss to replay the "
                        f"log from version {record.version} on (the missing pushes are lost)"
                    )
                log.error("%s: ACCEPTING DATA LOSS (--accept-data-loss): %s", self.path, gap)
                self.version = record.version - 1
                self._feed = _Feed(self.version, self.config.feed_bytes)
            self._apply(_Record.decode(record.payload, self.manifest), record.version)
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
            self._feed = _Feed(version, self.config.feed_bytes)
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

    def _check_space_for_snapshot(self, dest: Path) -> None:
        """DiskFullError before copying when the snapshot's file system lacks room for the table's files."""
        needed = sum(store.bytes_on_disk for store in self._stores_by_name().values())
        check_free(
            dest.parent,
            needed,
            f"the snapshot {dest.name}",
            f"free space there (delete old snapshots in {dest.parent}), or snapshot to another file system",
        )

    def snapshot(self, dest: str | Path) -> int:
        """A consistent copy (rows, optimizer state, manifest) at one version, taken while pushes go on.

        Files are copied without stopping pushes, then the pushes logged during the copy are
        replayed onto it, which brings every row to the version read at the end. Returns it.
        """
        dest = Path(dest)
        if "\0" in str(dest):  # the OS refuses such paths with a ValueError: the caller's mistake, not ours
            raise InvalidArgumentError(f"snapshot path {str(dest)!r} contains a NUL character; pick a plain name")
        try:
            if os.path.lexists(dest):  # a dangling symlink too: the rename would fail on it after the copy
                raise InvalidArgumentError(f"{dest} exists; snapshots never overwrite: pick a new path")
            self._check_space_for_snapshot(dest)
            tmp = staging_dir(dest, f"snapshot-{threading.get_ident()}")
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            # The copy is staged as ".<name>.snapshot-<thread>-<pid>" first: ~40 bytes more than the name.
            raise InvalidArgumentError(
                f"snapshot name {dest.name[:40]!r}... ({len(os.fsencode(dest.name))} bytes) is too long for the "
                "file system (255 bytes per name, including a ~40-byte staging suffix): pick a shorter name"
            ) from None
        if self.integrity is not None:
            self.integrity.refuse_if_damaged("a snapshot")
        with self._push_lock:
            start = self.version
            self._snapshots += 1
        try:
            for name, store in self._stores_by_name().items():
                store.copy_to(tmp / name)
            if self.integrity is not None:
                self.integrity.copy_sums_to(tmp)
            self.manifest.write(tmp)
            with self._push_lock:
                end = Checkpoint(self.version, dict(self.layer_steps))
            self._complete_copy(tmp, start, end.version)
            end.write(tmp)
            publish_dir(tmp, dest)  # private; whatever appeared at dest during the copy is never replaced
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):
                raise disk_full_error(dest.parent, f"the snapshot {dest.name}", exc) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with self._push_lock:
                self._snapshots -= 1
        return end.version

    def _complete_copy(self, tmp: Path, start: int, end: int) -> None:
        """Replay the pushes start+1..end onto a snapshot's copied files (and their checksums), then
        verify every copied row against its checksum: a snapshot never copies damage silently."""
        if self._wal is None and self.integrity is None:
            return
        with Table.open(tmp, read_only=self._wal is None) as copy:
            states = _open_state(tmp, self.manifest) if self._wal is not None else {}
            stores = {self.manifest.layer_file(layer): copy.store(layer) for layer in self.manifest.layout.layer_ids}
            for layer, slots in states.items():
                stores.update({self.manifest.state_files(layer)[slot][0]: store for slot, store in slots.items()})
            checks = None
            try:
                if self.integrity is not None:
                    config = IntegrityConfig(scrub_period_s=0)
                    writable = self._wal is not None
                    checks = TableIntegrity.open(tmp, self.manifest, stores, writable, threading.Lock(), config, False)
                for record in self._wal.records(start) if self._wal is not None else ():
                    if record.version > end:
                        break
                    decoded = _Record.decode(record.payload, self.manifest)
                    decoded.write_to(copy, states)
                    if checks is not None:
                        checks.record_push(decoded.layer_id, decoded.ids, decoded.rows, decoded.state, record.version)
                if checks is not None and checks.verify_all(locked=True):
                    assert self.integrity is not None
                    self.integrity.confirm_copy_damage(checks.damage)  # the source's blocks, checked again
                    raise DataLossError(
                        f"the snapshot of {self.path} copied damaged rows: "
                        + "; ".join(d.describe() for d in checks.damage)
                        + ": no snapshot was written; restore the table from an older snapshot"
                    )
            finally:
                if checks is not None:
                    checks.close()
                for layer_states in states.values():
                    for store in layer_states.values():
                        store.close()

    def _stores_by_name(self) -> dict[str, RowStore]:
        """Every store of the table (rows, then optimizer state) by its name in the table directory."""
        stores = {self.manifest.layer_file(layer): self.table.store(layer) for layer in self.manifest.layout.layer_ids}
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
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def __enter__(self) -> LiveTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _storable(dtype: DType, rows: np.ndarray) -> np.ndarray:
    """Updated float32 rows [N, dim] in the storage dtype; InvalidArgumentError when a value is finite in
    float32 but past the range of a 16-bit storage type (it would be stored as Inf)."""
    if dtype not in (DType.FLOAT16, DType.BFLOAT16):
        return dtype.from_float64(rows)  # float32 holds any finite update; quantized rows keep a float32 scale
    with np.errstate(over="ignore"):  # an overflow is reported below, precisely
        stored = dtype.from_float64(rows)
    bad = ~np.isfinite(dtype.to_float32(stored)).all(axis=1)
    if bad.any():
        raise InvalidArgumentError(
            f"the updated rows at positions {listed_positions(bad)} (of {len(rows)} in the push) exceed the range of "
            f"the table's {dtype.value} storage (largest |value| {float(np.abs(rows[bad]).max()):.3g}); the push "
            "is rejected and nothing changed: clip or scale down the gradients (or the lr_scale)"
        )
    return stored


def _open_state(table_dir: Path, manifest: Manifest) -> dict[int, dict[str, RowStore]]:
    """The optimizer state stores of every layer (the rows' backend): slot -> float32 rows of the slot's width."""
    return {
        layer: {
            slot: open_store(
                manifest.backend, table_dir / name, manifest.stored_rows(layer), width, DType.FLOAT32, False
            )
            for slot, (name, width) in manifest.state_files(layer).items()
        }
        for layer in manifest.layout.layer_ids
    }


def lock_writer(table_dir: Path) -> TableLock:
    """One writer per table: a second daemon opening it writable fails instead of corrupting it, and so
    does a writer while a read-only daemon serves it (memstore.tabledir.lock). Returns the lock; closing it
    releases it. Records this process's pid in ``writer.lock`` for other processes' messages."""
    try:
        lock = lock_table(
            table_dir,
            exclusive=True,
            advice="one writer per table: stop that daemon, or serve a snapshot of it "
            "(`memstore snapshot ADDRESS NAME`, then `memstore serve SNAPSHOT --read-only`)",
        )
    except TableInUseError as exc:
        if exc.writer:
            raise
        raise UnavailableError(
            f"{table_dir} is served read-only (or read offline) by another process: a writer would change its rows "
            "under that reader; stop it first"
        ) from None
    try:
        record_writer_pid(table_dir)
    except OSError:
        pass  # only messages use the pid: a read-only file system must not stop a writer
    return lock


def _lock_reader(table_dir: Path, manifest: Manifest) -> TableLock:
    """The shared lock a read-only or frozen daemon holds: no writer trains the table while it serves
    (it does not follow a writer's sequence lock), and no --overwrite replaces it."""
    advice = (
        "a read-only daemon does not see a writer's pushes consistently: serve a snapshot of it read-only "
        "(`memstore snapshot ADDRESS NAME`, then `memstore serve SNAPSHOT --read-only`), follow it "
        "(`memstore serve COPY --follow ADDRESS`), or stop that daemon"
        if manifest.optimizer is not None
        else "stop that process first"
    )
    return lock_table(table_dir, exclusive=False, advice=advice)


def has_records_after(wal_dir: Path, version: int) -> bool:
    """Whether the log in `wal_dir` holds pushes past `version` (a writer stopped before checkpointing
    them). Changes nothing: a torn tail is left for the writer's recovery to cut."""
    last = inspect_log(wal_dir).last_version
    return last is not None and last > version


@dataclass
class _Record:
    """One push's after-image, as logged."""

    layer_id: int
    layer_step: int
    step_id: int
    client_id: str
    ids: np.ndarray
    rows: np.ndarray  # storage dtype
    state: dict[str, np.ndarray]

    def reserve(self, table: Table, states: dict[int, dict[str, RowStore]]) -> None:
        """Disk space for `write_to` (DiskFullError when there is none); writes nothing."""
        table.store(self.layer_id).reserve(self.ids)
        for slot in self.state:
            states[self.layer_id][slot].reserve(self.ids)

    def write_to(self, table: Table, states: dict[int, dict[str, RowStore]]) -> None:
        """Write the after-image: the rows into the table, the optimizer state into `states`."""
        table.store(self.layer_id).update(self.ids, self.rows)
        for slot, values in self.state.items():
            states[self.layer_id][slot].update(self.ids, values)

    def encode(self) -> bytes:
        client = self.client_id.encode()[:65535]
        header = _RECORD_HEADER.pack(self.layer_id, self.layer_step, self.step_id, len(self.ids), len(client))
        parts = [header, client, self.ids.astype("<i8").tobytes(), np.ascontiguousarray(self.rows).tobytes()]
        parts += [np.ascontiguousarray(self.state[slot], dtype="<f4").tobytes() for slot in sorted(self.state)]
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes, manifest: Manifest) -> _Record:
        layer_id, step, step_id, count, client_len = _RECORD_HEADER.unpack_from(payload)
        offset = _RECORD_HEADER.size
        client_id = payload[offset : offset + client_len].decode()
        offset += client_len
        dim = manifest.dtype.stored_width(manifest.layout.dim)  # stored units per row
        ids = np.frombuffer(payload, dtype="<i8", count=count, offset=offset)
        offset += ids.nbytes
        rows = np.frombuffer(payload, dtype=manifest.dtype.numpy, count=count * dim, offset=offset).reshape(count, dim)
        offset += rows.nbytes
        state = {}
        for slot, (_, width) in sorted(manifest.state_files(layer_id).items()):
            values = np.frombuffer(payload, dtype="<f4", count=count * width, offset=offset)
            state[slot] = values.reshape(count, width)
            offset += values.nbytes
        if offset != len(payload):
            raise DataLossError(f"a log record of layer {layer_id} has {len(payload) - offset} unexpected bytes")
        return cls(layer_id, step, step_id, client_id, ids, rows, state)
