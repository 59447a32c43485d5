"""Disk space: reserve it before writing through a memory map, and report a full disk clearly.

A write through a shared mapping into a hole of a sparse file allocates the block when the page
is written back or, on tmpfs and most file systems, at the page fault. When no block is left the
kernel cannot fail the store instruction: it sends SIGBUS and the process dies with nothing in
its log. Reserving the blocks first (`posix_fallocate`, which allocates without changing any
byte) turns a full disk into an ENOSPC error before anything is written, which callers raise as
`DiskFullError` (RESOURCE_EXHAUSTED for clients) with nothing applied.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from memstore.errors import ResourceExhaustedError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(ResourceExhaustedError):
    """The disk (or the user's quota) has no room for a write; nothing was written. Not retried
    automatically: it clears only when an operator frees space."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=None)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is an OSError saying the disk or quota is full."""
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full_error(path: Path | str, what: str, exc: OSError | None = None) -> DiskFullError:
    """The DiskFullError for a refused write of `what` into `path`, saying what to do."""
    free = _free_bytes(Path(path))
    where = f" ({free:,} bytes free)" if free is not None else ""
    cause = f": {os.strerror(exc.errno)}" if exc is not None and exc.errno else ""
    return DiskFullError(
        f"the disk holding {path} is full{where}{cause}; {what} was refused and nothing was applied. "
        "Free space on that file system (or raise the quota), then retry"
    )


def reserve(fd: int, ranges: list[tuple[int, int]], path: Path | str, what: str) -> None:
    """Allocate the blocks of each (offset, length) byte range of the open file `fd` (no byte changes);
    DiskFullError when the disk is full. Ranges must lie inside the file: the size never changes."""
    for offset, length in ranges:
        if length <= 0:
            continue
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(path, what, exc) from None
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):  # no fallocate here: blocks are allocated on write
                return
            raise


def page_runs(first: np.ndarray, last: np.ndarray, page: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) covering pages first[i]..last[i] for every i, merged into runs and
    clipped to a file of `size` bytes."""
    if not len(first):
        return []
    if int((last - first).max()) <= 1:  # rows of at most a page: only their end pages
        pages = np.unique(np.concatenate([first, last]))
    else:
        pages = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first.tolist(), last.tolist())]))
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate([[0], breaks]).tolist()
    ends = np.concatenate([breaks, [len(pages)]]).tolist()
    runs = []
    for s, e in zip(starts, ends):
        offset = int(pages[s]) * page
        runs.append((offset, min(int(pages[e - 1] + 1) * page, size) - offset))
    return runs


def data_pages(fd: int, size: int) -> np.ndarray:
    """Per page of the first `size` bytes of the file open as `fd`: whether it holds data (not a
    hole), from the file's extents."""
    page = mmap.PAGESIZE
    pages = np.zeros(-(-size // page), dtype=bool)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past offset
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        pages[start // page : -(-end // page)] = True
        offset = end
    return pages


def check_free(directory: Path, needed: int, what: str, advice: str) -> None:
    """DiskFullError unless the file system holding `directory` has `needed` bytes free."""
    free = _free_bytes(directory)
    if free is not None and needed > free:
        raise DiskFullError(
            f"{what} needs {needed:,} bytes ({needed / 2**30:.2f} GiB) but the file system holding {directory} "
            f"has {free:,} bytes ({free / 2**30:.2f} GiB) free; {advice}"
        )


def _free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the file system of `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None
