"""Who uses a table directory: one writer, or any number of readers, as flocks on the directory itself.

A writable daemon (and a replica) holds an exclusive lock; a read-only or frozen daemon, and an
offline reader (export, verify, reshard), a shared one; `create --overwrite` and
`import --overwrite` take an exclusive one while they move the old table aside. The lock is
taken on a descriptor of the directory (O_RDONLY | O_DIRECTORY), not on a file in it, so no
file anyone deletes (a "stale" ``writer.lock``) can let a second writer in: the kernel drops
the lock only when its holder exits. ``writer.lock`` still holds the writer's pid, only so that
a refusal can say which process to stop.

Readers exclude writers because a reader does not follow a writer's sequence lock: a
read-only daemon of a table being trained would serve rows changing under it at a stale
version, and an offline export would mix versions.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from memstore.errors import UnavailableError
from memstore.tabledir.fsafe import write_durably
from memstore.tabledir.names import WRITER_LOCK_NAME

_TRIES = 3


class TableLock:
    """A flock held on a table directory; close() (or leaving the `with` block) releases it. Idempotent."""

    def __init__(self, fd: int, path: Path, exclusive: bool) -> None:
        self._fd: int | None = fd
        self.path = path
        self.exclusive = exclusive

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:  # a lock dropped on an error path must not stay held for the process's life
        self.close()

    def __enter__(self) -> TableLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TableInUseError(UnavailableError):
    """The table directory is locked by another process: `writer` tells whether a writer holds it."""

    def __init__(self, message: str, writer: bool, pid: int | None) -> None:
        super().__init__(message)
        self.writer = writer
        self.pid = pid


def lock_table(table_dir: str | Path, exclusive: bool, advice: str) -> TableLock:
    """Lock `table_dir` (exclusive: a writer or a replacement; shared: a reader), without waiting.

    Raises TableInUseError naming the holder (the writer's pid when known), then `advice`.
    """
    path = Path(table_dir)
    for _ in range(_TRIES):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            writer = not exclusive or _writer_holds(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            pid = writer_pid(path) if writer else None
            raise TableInUseError(_in_use(path, writer, pid) + "; " + advice, writer, pid) from None
        # The directory may have been renamed between open and flock (an overwrite moving it aside):
        # the lock must be on what the path names now.
        now = os.stat(path)
        held = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return TableLock(fd, path, exclusive)
        os.close(fd)
    raise UnavailableError(f"{path} was replaced {_TRIES} times while being locked; try again")


def record_writer_pid(table_dir: Path) -> None:
    """Write this process's pid to ``writer.lock`` (for messages only: the lock is the directory's)."""
    write_durably(Path(table_dir) / WRITER_LOCK_NAME, f"{os.getpid()}\n".encode())


def writer_pid(table_dir: Path) -> int | None:
    """The pid ``writer.lock`` names, or None (no file, an old table's empty one, or unreadable)."""
    try:
        pid = int((Path(table_dir) / WRITER_LOCK_NAME).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None  # a pid of a writer long gone says nothing


def _writer_holds(fd: int) -> bool:
    """After an exclusive lock failed: whether a writer (not only readers) holds the directory."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _in_use(path: Path, writer: bool, pid: int | None) -> str:
    if not writer:
        return f"{path} is served read-only (or read offline) by another process"
    holder = f"pid {pid}" if pid is not None else "pid unknown"
    return f"{path} is open for writing by another process ({holder})"
