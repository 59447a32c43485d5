"""What a Snapshot call may ask for: its name, and how many snapshots a daemon keeps.

A snapshot copies the whole table, and any client with a write token can ask for one: names are
restricted (no separators, no control characters to forge log lines) and the count is bounded, so
that a client cannot fill the disk of the daemon's host by asking again and again.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memstore.errors import InvalidArgumentError, ResourceExhaustedError
from memstore.tabledir.names import is_hidden

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
