"""Private files, safe temp files and durable writes: the one place a table's files are written from.

Tables hold rows and optimizer state from which gradients follow, so everything memstore writes is
private by default: directories 0700, files 0600, whatever the umask. An operator who wants a
group (a backup user, a read-only daemon under another account) to read them opts in with
``--group-readable`` (directories 0750, files 0640); others never get access.

Temp files are created with O_CREAT | O_EXCL | O_NOFOLLOW under a unique name: a symlink or file
planted at a predictable ``DEST.tmp`` can neither redirect the write nor be truncated.

A file is replaced durably in one way (`write_durably`, `writing_durably`): written to a temp file
beside it, fsynced, renamed onto it, and the directory fsynced; on any failure the temp file is
removed, so a reader sees the old file or the new one whole, and a crash leaves at most a
``*.tmp`` file that nothing reads.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from memstore.tabledir.names import temp_name

_PRIVATE = (0o700, 0o600)
_GROUP = (0o750, 0o640)
_modes = _PRIVATE


@contextmanager
def file_policy(group_readable: bool) -> Iterator[None]:
    """The process-wide policy for one command (set once at the CLI edge): also narrows the umask so that
    every file a library writes (row stores, LMDB, logs) gets at most these modes. Both are restored after."""
    global _modes
    saved = _modes
    _modes = _GROUP if group_readable else _PRIVATE
    umask = os.umask(0o027 if group_readable else 0o077)
    try:
        yield
    finally:
        os.umask(umask)
        _modes = saved


def dir_mode() -> int:
    """The mode new table directories get."""
    return _modes[0]


def file_mode() -> int:
    """The mode new table files get."""
    return _modes[1]


def make_dir(path: Path, parents: bool = False) -> None:
    """mkdir with the private mode, whatever the umask (an existing directory is an error, as with mkdir)."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(path, dir_mode())
    os.chmod(path, dir_mode())  # the umask may have removed bits we want (group-readable) - never adds others'


def open_new(path: Path, flags: int = os.O_WRONLY) -> int:
    """Create `path` (which must not exist, nor be a symlink), private; returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode())
    os.fchmod(fd, file_mode())
    return fd


def temp_beside(path: Path, mode: str = "wb") -> tuple[IO, Path]:
    """A new private temp file beside `path` (unique name, never following a planted link), opened with
    `mode`; the caller fsyncs it and renames it onto `path`. Returns the file and its path."""
    for _ in range(16):
        tmp = path.with_name(temp_name(path.name, secrets.token_hex(6)))
        try:
            fd = open_new(tmp, os.O_RDWR)
        except FileExistsError:
            continue
        return os.fdopen(fd, mode), tmp
    raise FileExistsError(f"could not create a unique temp file beside {path}")


def add_group_readable(parser: argparse.ArgumentParser) -> None:
    """The --group-readable flag of the commands that write tables."""
    parser.add_argument(
        "--group-readable",
        action="store_true",
        help="let the file's group read what this writes (directories 0750, files 0640); default private: "
        "0700 and 0600, whatever the umask",
    )


def restrict_tree(root: Path) -> None:
    """Give a newly written tree (a table or snapshot before it is renamed into place) the policy's modes:
    the libraries that wrote its files (mmap stores, LMDB) created them with the process's umask.
    Symbolic links are left alone (chmod would change what they point to)."""
    os.chmod(root, dir_mode())
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode() if name in dirs else file_mode())


def copy_range(src: int, dst: int, count: int, position: int) -> int:
    """copy_file_range, or a read and a write where the kernel refuses it between these file systems
    (EXDEV: a snapshot directory on another disk than the table)."""
    try:
        return os.copy_file_range(src, dst, count, position, position)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    data = os.pread(src, min(count, 8 << 20), position)
    view = memoryview(data)
    while view:
        view = view[os.pwrite(dst, view, position + len(data) - len(view)) :]
    return len(data)


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (see `writing_durably`)."""
    with writing_durably(path) as f:
        f.write(data)


@contextmanager
def writing_durably(path: Path, mode: str = "wb") -> Iterator[IO]:
    """A private temp file beside `path` to stream the new content into; when the block ends it is
    fsynced, renamed onto `path` and the directory fsynced. If the block (or the sync) fails the temp
    file is removed and `path` is left as it was."""
    out, tmp = temp_beside(path, mode)
    try:
        with out as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename, a new file or a deletion inside the directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
