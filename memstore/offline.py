"""Reading a table offline (export, verify, reshard, checksums): the one check every such reader makes.

An offline reader opens the files directly, without the write-ahead log, so it must not run
while a daemon trains the table (rows change under it) nor read a table whose files lack
pushes its log or its last writer acknowledged (a crash before a checkpoint: it would read
stale rows and say nothing). `reading_offline` holds a shared lock on the table directory for
the whole read (no writer can start meanwhile, see memstore.tabledir.lock) and refuses both cases
with what to do. Recovery itself needs the writer (it replays and cuts the log): an offline
reader never changes the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from memstore.errors import TableFormatError, UnavailableError
from memstore.recovery import acknowledged_version, pending_recovery
from memstore.tabledir.checkpoint import Checkpoint
from memstore.tabledir.lock import TableInUseError, lock_table, writer_pid
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import SEQLOCK_NAME, WAL_DIR
from memstore.wal import LogState, inspect_log


@contextmanager
def reading_offline(table_dir: str | Path, what: str) -> Iterator[Manifest]:
    """Hold `table_dir` for an offline read by `what` (a command, e.g. "export"); yields its manifest.

    Raises UnavailableError while a daemon trains the table, TableFormatError when its files do
    not hold every push its log or its writer acknowledged.
    """
    path = Path(table_dir)
    manifest = Manifest.read(path)
    try:
        lock = lock_table(path, exclusive=False, advice="")
    except TableInUseError:
        raise UnavailableError(
            f"{path} is open for writing by a daemon (pid {writer_pid(path) or 'unknown'}); {what} reads a table "
            f"offline: take a snapshot on that daemon (`memstore snapshot ADDRESS NAME`) and {what} the snapshot, "
            "or stop that daemon"
        ) from None
    with lock:
        if manifest.optimizer is not None:
            check_recovered(path, what)
        yield manifest


def check_recovered(table_dir: Path, what: str) -> None:
    """TableFormatError when the table's files may not hold every acknowledged push (see `reading_offline`)."""
    pending = pending_recovery(
        table_dir, table_dir / WAL_DIR, Checkpoint.read(table_dir).version, table_dir / SEQLOCK_NAME
    )
    if pending is not None:
        raise TableFormatError(
            f"{pending}; {what} would miss them. Start its daemon (`memstore serve {table_dir}`) and stop it "
            f"once, or open it writable (memstore.live.LiveTable.open), to replay them, then run {what} again"
        )


@dataclass(frozen=True)
class TableState:
    """What `memstore info` says about a table directory's use and recovery."""

    checkpointed: int
    log_last: int | None
    acknowledged: int | None
    writer_pid: int | None  # a writer holds the table (None: no writer, or its pid is unknown)
    writing: bool
    torn_tail: str | None

    def lines(self) -> list[str]:
        """Lines for people: who holds it, how far its checkpoint, log and writer got."""
        out = []
        if self.writing:
            out.append(f"in use: open for writing by pid {self.writer_pid or 'unknown'} (the numbers below move)")
        log = (
            "log not read"
            if self.writing
            else "no log"
            if self.log_last is None
            else f"log up to version {self.log_last}"
        )
        ack = "" if self.acknowledged is None else f", last acknowledged version {self.acknowledged}"
        out.append(f"versions: checkpoint {self.checkpointed}, {log}{ack}")
        if not self.writing and self.log_last is not None and self.log_last > self.checkpointed:
            out.append(
                f"NOT RECOVERED: the log holds pushes {self.checkpointed + 1}..{self.log_last} the files may lack "
                "(its writer stopped uncleanly); start its daemon once to replay them before export, verify or reshard"
            )
        if (
            not self.writing
            and self.acknowledged is not None
            and self.acknowledged > max(self.checkpointed, self.log_last or 0)
        ):
            out.append(
                f"PUSHES MISSING: version {self.acknowledged} was acknowledged but the checkpoint and log hold less; "
                "`memstore serve` refuses it (and says what is lost) unless started with --accept-data-loss"
            )
        if self.torn_tail is not None:
            out.append(f"torn log tail (its writer's next start removes it and logs it): {self.torn_tail}")
        return out


def table_state(table_dir: Path) -> TableState:
    """The use and recovery state of a trainable table directory, read without changing or locking it."""
    try:
        lock_table(table_dir, exclusive=False, advice="").close()
        writing = False
    except TableInUseError:
        writing = True
    # A log being appended to can look torn at any instant: only an idle one is inspected.
    log = LogState(None, None) if writing else inspect_log(table_dir / WAL_DIR)
    return TableState(
        checkpointed=Checkpoint.read(table_dir).version,
        log_last=log.last_version,
        acknowledged=acknowledged_version(table_dir / SEQLOCK_NAME),
        writer_pid=writer_pid(table_dir) if writing else None,
        writing=writing,
        torn_tail=None if log.tail_cut is None else log.tail_cut.describe(),
    )
