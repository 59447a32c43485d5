"""Positioned reads of scattered rows from a layer file, batched, in parallel, out of the page cache.

A batch of rows becomes the 4 KiB blocks covering them (a row may straddle two; rows sharing a block
share its read), merged into runs of consecutive blocks, each run one pread into a page-aligned
buffer, runs spread over threads: the disk sees a batch's reads at once. The file is opened with
O_DIRECT so the rows read do not stay in the page cache (the row cache above is the budget). Where
O_DIRECT is refused (tmpfs answers EINVAL) the reads are buffered instead, and `direct` says so.

memstore/_directio.c does the preads on pthreads with the GIL released and copies the rows out; this
module falls back to os.preadv on a thread pool when it was not built.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

try:
    from memstore import _directio as _compiled
except ImportError:  # not built: a thread pool of os.preadv
    _compiled = None

log = logging.getLogger("memstore.storage.direct")

BLOCK = 4096


class DirectReader:
    """Reads rows of a flat row file (`row_bytes` each) by id, with O_DIRECT where the file system allows."""

    def __init__(self, path: Path, row_bytes: int, threads: int = 8, direct: bool = True) -> None:
        self.path = Path(path)
        self.row_bytes = row_bytes
        self.threads = threads
        self.direct = False
        self.why_buffered = "" if direct else "O_DIRECT not asked for"
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.why_buffered = f"the file system of {self.path} refuses O_DIRECT"
        elif direct:
            self.why_buffered = "this platform has no O_DIRECT"
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._retired: list[int] = []

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Rows of `ids` (checked, int64) as [n, row_bytes] uint8; and the read calls and bytes it took."""
        if not len(ids):
            return np.empty((0, self.row_bytes), dtype=np.uint8), 0, 0
        offsets = ids * self.row_bytes
        first = offsets // BLOCK
        last = (offsets + self.row_bytes - 1) // BLOCK
        if (last == first).all():
            blocks = np.unique(first)
        else:  # every block from each row's first to its last
            counts = last - first + 1
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            blocks = np.unique(np.repeat(first, counts) + within)
        # Runs of consecutive blocks: one read each, landing at the block's index in `blocks`.
        breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
        run_first = np.concatenate(([0], breaks))
        run_len = np.diff(np.concatenate((run_first, [len(blocks)])))
        buffer = mmap.mmap(-1, len(blocks) * BLOCK)  # page-aligned, as O_DIRECT needs
        try:
            self._read_runs(blocks[run_first] * BLOCK, run_len * BLOCK, run_first * BLOCK, buffer)
            # Each row's bytes start in its first block's place in the buffer, and go on in the next ones.
            positions = np.searchsorted(blocks, first) * BLOCK + offsets % BLOCK
            out = np.empty((len(ids), self.row_bytes), dtype=np.uint8)
            if _compiled is not None:
                _compiled.copy_rows(buffer, positions, self.row_bytes, out)
            else:
                data = np.frombuffer(buffer, dtype=np.uint8)
                out[...] = data[positions[:, None] + np.arange(self.row_bytes)]
                del data
        finally:
            buffer.close()
        return out, len(run_first), len(blocks) * BLOCK

    def _read_runs(self, file_at: np.ndarray, lengths: np.ndarray, buffer_at: np.ndarray, buffer: mmap.mmap) -> None:
        try:
            self._preads(file_at, lengths, buffer_at, buffer)
        except OSError as exc:
            if not self.direct or exc.errno != errno.EINVAL:
                raise
            # Opened, but this file system refuses the reads themselves: buffered from now on.
            self._fall_back(f"the file system of {self.path} refuses O_DIRECT reads")
            self._preads(file_at, lengths, buffer_at, buffer)

    def _preads(self, file_at: np.ndarray, lengths: np.ndarray, buffer_at: np.ndarray, buffer: mmap.mmap) -> None:
        file_at = np.ascontiguousarray(file_at, dtype=np.int64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        buffer_at = np.ascontiguousarray(buffer_at, dtype=np.int64)
        if _compiled is not None:
            _compiled.pread_runs(self._fd, file_at, lengths, buffer_at, buffer, self.threads)
            return
        view = memoryview(buffer)
        runs = list(zip(file_at.tolist(), lengths.tolist(), buffer_at.tolist()))
        try:
            if len(runs) == 1 or self.threads == 1:
                for run in runs:
                    _pread_run(self._fd, view, *run)
                return
            with self._pool_lock:  # the daemon's calls read concurrently
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="memstore-direct")
            step = -(-len(runs) // self.threads)
            chunks = [runs[i : i + step] for i in range(0, len(runs), step)]
            for future in [self._pool.submit(_pread_all, self._fd, view, chunk) for chunk in chunks]:
                future.result()
        finally:
            view.release()

    def _fall_back(self, why: str) -> None:
        with self._pool_lock:
            if not self.direct:  # another call fell back first
                return
            log.warning("%s: reading row cache misses buffered (they go through the page cache)", why)
            # The O_DIRECT descriptor stays open until close: another call may be reading with it now.
            self._retired.append(self._fd)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.direct = False
            self.why_buffered = why

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fd in self._retired:
            os.close(fd)
        self._retired = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pread_all(fd: int, view: memoryview, runs: list[tuple[int, int, int]]) -> None:
    for run in runs:
        _pread_run(fd, view, *run)


def _pread_run(fd: int, view: memoryview, file_at: int, length: int, buffer_at: int) -> None:
    """Read `length` bytes at `file_at` into view[buffer_at:]; a short read past the end leaves zeros."""
    done = 0
    while done < length:
        got = os.preadv(fd, [view[buffer_at + done : buffer_at + length]], file_at + done)
        if got == 0 or got % BLOCK:
            return  # end of file: the last block is partial (a read past it would be misaligned)
        done += got
