"""Accounting for acknowledged pushes when a trainable table opens: what recovery found, what was lost.

Three records say how far a table got, and recovery weighs them against each other:
- ``checkpoint.json``: the version the files hold at least (written at each checkpoint);
- the write-ahead log: every push past the last checkpoint, and (in each segment's header) the
  last version logged when the segment was created, so an emptied log still knows it;
- the ``seqlock`` file: its word is 2 * version, set by every push after it is logged and
  applied, before it is acknowledged. It is the high-water mark of acknowledged pushes: it
  survives the daemon being killed (the page cache keeps it) and is kept when ``wal/`` or
  ``checkpoint.json`` are deleted. An odd word (a push being applied) counts the push before.

A torn record at the log's end whose version is above the high-water mark was never
acknowledged (its append did not complete): recovery cuts it and logs a warning, as it does for
a deleted ``wal/`` that lost nothing. When the high-water mark is above what the checkpoint and
the log hold, or the log's last version is above the checkpoint's with no record to replay
(``checkpoint.json`` deleted or replaced), acknowledged pushes cannot be accounted for: the
table refuses to open, naming the versions, unless `accept_data_loss` (``--accept-data-loss``),
which serves it and logs what was lost. The version it then serves at skips past every version
acknowledged before (the high-water mark plus one, which no record holds): a version number
never names two different tables, so a replica or a cache that saw the lost pushes cannot
mistake the new pushes for the ones after them (a replica gets a replication gap and must be
re-seeded from a snapshot) and a client's version-keyed cache sees the change.

Limits: with ``--durability os`` a host crash can lose the log's tail and the seqlock page
together, and then nothing records that pushes were acknowledged. A seqlock file copied in from
another table (restoring by copying files over a table directory) reads as pushes lost: restore
into a fresh directory instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from memstore.errors import DataLossError, TableFormatError
from memstore.tabledir.checkpoint import Checkpoint
from memstore.wal import Durability, TailCut, WalRecord, WriteAheadLog, inspect_log

log = logging.getLogger("memstore.recovery")


def acknowledged_version(seqlock_path: Path) -> int | None:
    """The last version the table's writer acknowledged, from its seqlock file (None: no such file)."""
    try:
        data = Path(seqlock_path).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < 8:
        return None  # a crash while the file was first created: no push was ever acknowledged
    word = int.from_bytes(data[:8], "little", signed=True)
    return max(0, word) // 2


@dataclass(frozen=True)
class Recovery:
    """What a trainable table's opening found; see the module docstring."""

    table_dir: Path
    checkpointed: int  # checkpoint.json's version
    recovered: int  # after replaying the log
    log_last: int | None  # the log's last version (WriteAheadLog.last_version)
    acknowledged: int | None  # the seqlock file's high-water mark, read before the log was opened
    tail_cut: TailCut | None
    log_missing: bool  # wal/ did not exist (an empty one was created)
    durability: Durability

    def losses(self) -> tuple[int, list[str]]:
        """(the version the table is served at, what cannot be accounted for: empty when nothing lost)."""
        version = self.recovered
        lost = []
        if self.log_last is not None and self.log_last > version:
            lost.append(
                f"checkpoint.json says version {self.checkpointed} but the log had already reached version "
                f"{self.log_last} (its records up to it were dropped by a checkpoint): checkpoint.json was deleted "
                "or replaced by an older one, so the optimizer steps and the clients' last steps since are unknown"
            )
            version = self.log_last
        if self.acknowledged is not None and self.acknowledged > version:
            where = f"checkpoint at version {self.checkpointed}, log "
            if self.log_missing:
                where += "missing (wal/ was deleted)"
            elif self.log_last is None:
                where += "empty"
            else:
                where += f"up to version {self.log_last}"
            cut = f"; recovery {self.tail_cut.describe()}" if self.tail_cut is not None else ""
            lost.append(
                f"pushes {version + 1}..{self.acknowledged} ({self.acknowledged - version} versions) were "
                f"acknowledged (the seqlock file records version {self.acknowledged}) but are in neither the "
                f"checkpoint nor the log ({where}){cut}"
            )
            version = self.acknowledged + 1  # never reuse a version the lost pushes had (module docstring)
        return version, lost


def settle(recovery: Recovery, accept_data_loss: bool) -> int:
    """Log what recovery found and return the version to serve at; DataLossError when acknowledged pushes
    are missing, unless `accept_data_loss`."""
    version, lost = recovery.losses()
    path = recovery.table_dir
    if not lost:
        if recovery.tail_cut is not None:
            log.warning(
                "%s: write-ahead log recovery %s; it was never acknowledged (its version is above the last "
                "acknowledged one, %s): a push interrupted mid-append, as a crash leaves it%s",
                path,
                recovery.tail_cut.describe(),
                "unknown" if recovery.acknowledged is None else recovery.acknowledged,
                ". With --durability os a host crash can also lose acknowledged pushes without a trace"
                if recovery.durability is Durability.OS
                else "",
            )
        if recovery.log_missing and recovery.acknowledged is not None:
            log.warning(
                "%s: the write-ahead log directory wal/ was missing and an empty one was created; nothing "
                "acknowledged is missing (the checkpoint holds version %d)",
                path,
                recovery.checkpointed,
            )
        return recovery.recovered
    text = "; ".join(lost)
    if not accept_data_loss:
        raise DataLossError(
            f"{path}: acknowledged pushes cannot be accounted for: {text}. Refusing to serve it: restore the table "
            f"from a snapshot, or start with --accept-data-loss to serve it as it is, at version {version} (the "
            "lost pushes must be redone by the trainers, rows may hold parts of them, and replicas must be "
            "re-seeded from a snapshot)"
        )
    log.error(
        "%s: ACCEPTING DATA LOSS (--accept-data-loss): %s. Serving at version %d: versions are never reused, "
        "so replicas that saw the lost pushes stop with a replication gap (re-seed them from a snapshot)",
        path,
        text,
        version,
    )
    return version


def pending_recovery(table_dir: Path, wal_dir: Path, checkpointed: int, seqlock_path: Path) -> str | None:
    """Why a table's files do not hold every acknowledged push, for a reader that cannot recover it
    (None when they do): pushes in the log past the checkpoint, or acknowledged pushes missing.
    Changes nothing on disk (the log's tail is not cut)."""
    state = inspect_log(wal_dir)
    if state.last_version is not None and state.last_version > checkpointed:
        return (
            f"{table_dir} has pushes in its log past its checkpoint (checkpoint at version {checkpointed}, log up to "
            f"version {state.last_version}): its writer stopped uncleanly and its files may not hold them yet"
        )
    acknowledged = acknowledged_version(seqlock_path)
    if acknowledged is not None and acknowledged > max(checkpointed, state.last_version or 0):
        return (
            f"{table_dir} had acknowledged version {acknowledged}, but its checkpoint (version {checkpointed}) and "
            f"its log{'' if state.last_version is None else f' (up to version {state.last_version})'} hold less: "
            "pushes are missing"
        )
    return None


def read_checkpoint(table_dir: Path, accept_data_loss: bool) -> Checkpoint:
    """checkpoint.json; a damaged one is refused, unless `accept_data_loss` (a trainable table's: then the
    log's version is adopted by recovery, and the optimizer steps and clients' last steps start again from zero)."""
    try:
        return Checkpoint.read(table_dir)
    except TableFormatError as exc:
        if not accept_data_loss:
            raise TableFormatError(
                f"{exc}, or start it with --accept-data-loss to serve it at the version its log records (its "
                "optimizer steps and the clients' last steps are then lost)"
            ) from None
        log.error("%s: ACCEPTING DATA LOSS (--accept-data-loss): %s; starting from an empty checkpoint", table_dir, exc)
        return Checkpoint()


def logged_after(wal: WriteAheadLog, wal_dir: Path, checkpointed: int, accept_data_loss: bool) -> Iterator[WalRecord]:
    """The log's records past the checkpoint's version, to replay in order. A record that does not follow
    the one before (pushes missing) raises DataLossError, unless `accept_data_loss`: then it is logged,
    and the records go on from there (the caller moves its version to the one before that record)."""
    version = checkpointed
    for record in wal.records(checkpointed):
        if record.version != version + 1:
            gap = (
                f"{wal_dir} jumps from version {version} (checkpoint.json's) to "
                f"{record.version}: pushes {version + 1}..{record.version - 1} are missing"
            )
            if not accept_data_loss:
                raise DataLossError(
                    f"{gap}; restore the table from a snapshot, or start with --accept-data-loss to replay the "
                    f"log from version {record.version} on (the missing pushes are lost)"
                )
            log.error("%s: ACCEPTING DATA LOSS (--accept-data-loss): %s", wal_dir.parent, gap)
        version = record.version
        yield record
