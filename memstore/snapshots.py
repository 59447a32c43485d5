"""What a Snapshot call may ask for: its name, and how many snapshots a daemon keeps.

A snapshot copies the whole table, and any client with a write token can ask for one: names are
restricted (no separators, no control characters to forge log lines) and the count is bounded, so
that a client cannot fill the disk of the daemon's host by asking again and again.

Taking one (`LiveTable.snapshot` runs these steps): `stage_snapshot` checks the destination and
the free space and makes a hidden staging directory beside it; `copy_table` copies the files while
pushes go on; `replay_onto_copy` replays the pushes logged during the copy, which brings every row
to the version read at the end, and verifies every copied row against its checksum; `publishing`
renames the finished copy into place (never over anything) or removes it on failure.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memstore.errors import DataLossError, InvalidArgumentError, ResourceExhaustedError
from memstore.integrity import IntegrityConfig, TableIntegrity
from memstore.space import check_free, disk_full_error, is_disk_full
from memstore.storage import RowStore
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import is_hidden
from memstore.tabledir.record import PushRecord
from memstore.tabledir.staging import publish_dir, staging_dir
from memstore.training import open_state
from memstore.wal import WriteAheadLog

NAME_RULE = "a plain directory name of 1 to 100 characters, each a letter, a digit, '_' or '-'"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
DEFAULT_MAX_SNAPSHOTS = 16


def check_snapshot_name(name: str) -> None:
    """InvalidArgumentError unless `name` follows NAME_RULE (its repr in the message: never raw)."""
    if not _NAME.fullmatch(name):
        shown = repr(name[:120]) + ("..." if len(name) > 120 else "")
        raise InvalidArgumentError(f"snapshot name {shown} is refused: a snapshot name is {NAME_RULE}")


class SnapshotSlots:
    """At most `limit` snapshots in `directory`, those being written included."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self._lock = threading.Lock()
        self._writing = 0

    def count(self) -> int:
        """Snapshots in the directory (hidden staging directories not counted: they are `_writing`)."""
        try:
            return sum(1 for p in self.directory.iterdir() if not is_hidden(p.name))
        except FileNotFoundError:
            return 0

    @contextmanager
    def held(self) -> Iterator[None]:
        """One slot for the duration of a snapshot; ResourceExhaustedError when none is left."""
        with self._lock:
            taken = self.count() + self._writing
            if taken >= self.limit:
                raise ResourceExhaustedError(
                    f"{self.directory} already holds {taken} snapshots (written or being written), the most this "
                    f"daemon keeps (--max-snapshots {self.limit}): delete old ones (rm -r {self.directory}/NAME) "
                    "or restart the daemon with a larger --max-snapshots"
                )
            self._writing += 1
        try:
            yield
        finally:
            with self._lock:
                self._writing -= 1


def stage_snapshot(dest: Path, needed_bytes: int) -> Path:
    """The staging directory of a snapshot to `dest`, beside it, after checking that `dest` is free and
    its file system has `needed_bytes` (InvalidArgumentError, DiskFullError)."""
    if "\0" in str(dest):  # the OS refuses such paths with a ValueError: the caller's mistake, not ours
        raise InvalidArgumentError(f"snapshot path {str(dest)!r} contains a NUL character; pick a plain name")
    try:
        if os.path.lexists(dest):  # a dangling symlink too: the rename would fail on it after the copy
            raise InvalidArgumentError(f"{dest} exists; snapshots never overwrite: pick a new path")
        check_free(
            dest.parent,
            needed_bytes,
            f"the snapshot {dest.name}",
            f"free space there (delete old snapshots in {dest.parent}), or snapshot to another file system",
        )
        return staging_dir(dest, f"snapshot-{threading.get_ident()}")
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        # The copy is staged as ".<name>.snapshot-<thread>-<pid>" first: ~40 bytes more than the name.
        raise InvalidArgumentError(
            f"snapshot name {dest.name[:40]!r}... ({len(os.fsencode(dest.name))} bytes) is too long for the "
            "file system (255 bytes per name, including a ~40-byte staging suffix): pick a shorter name"
        ) from None


def copy_table(tmp: Path, manifest: Manifest, stores: dict[str, RowStore], integrity: TableIntegrity | None) -> None:
    """Copy every store (by its name in the table directory), the checksums and the manifest into `tmp`."""
    for name, store in stores.items():
        store.copy_to(tmp / name)
    if integrity is not None:
        integrity.copy_sums_to(tmp)
    manifest.write(tmp)


@contextmanager
def publishing(tmp: Path, dest: Path) -> Iterator[None]:
    """Around the writing of a snapshot staged in `tmp`: then rename it to `dest` (never replacing what
    appeared there meanwhile); on any failure remove `tmp` (a full disk raised as DiskFullError)."""
    try:
        yield
        publish_dir(tmp, dest)  # private; whatever appeared at dest during the copy is never replaced
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise disk_full_error(dest.parent, f"the snapshot {dest.name}", exc) from None
        raise


def replay_onto_copy(
    tmp: Path,
    manifest: Manifest,
    wal: WriteAheadLog | None,
    integrity: TableIntegrity | None,
    start: int,
    end: int,
    source: Path,
) -> None:
    """Replay the pushes start+1..end from `wal` onto a snapshot's copied files (and their checksums),
    then verify every copied row against its checksum: a snapshot never copies damage silently.
    `integrity` is the source table's (None: checksums off); `source` its path, for messages."""
    if wal is None and integrity is None:
        return
    with Table.open(tmp, read_only=wal is None) as copy:
        states = open_state(tmp, manifest) if wal is not None else {}
        stores = {manifest.layer_file(layer): copy.store(layer) for layer in manifest.layout.layer_ids}
        for layer, slots in states.items():
            stores.update({manifest.state_files(layer)[slot][0]: store for slot, store in slots.items()})
        checks = None
        try:
            if integrity is not None:
                config = IntegrityConfig(scrub_period_s=0)
                checks = TableIntegrity.open(tmp, manifest, stores, wal is not None, threading.Lock(), config, False)
            for record in wal.records(start) if wal is not None else ():
                if record.version > end:
                    break
                decoded = PushRecord.decode(record.payload, manifest)
                decoded.write_to(copy.store(decoded.layer_id), states[decoded.layer_id])
                if checks is not None:
                    checks.record_push(decoded.layer_id, decoded.ids, decoded.rows, decoded.state, record.version)
            if checks is not None and checks.verify_all(locked=True):
                assert integrity is not None
                integrity.confirm_copy_damage(checks.damage)  # the source's blocks, checked again
                raise DataLossError(
                    f"the snapshot of {source} copied damaged rows: "
                    + "; ".join(d.describe() for d in checks.damage)
                    + ": no snapshot was written; restore the table from an older snapshot"
                )
        finally:
            if checks is not None:
                checks.close()
            for layer_states in states.values():
                for store in layer_states.values():
                    store.close()
