"""The mmap backend: one flat little-endian row-major file per layer, memory-mapped.

Reads are page-cache hits once warm and are shared by every process mapping the file.
The file is never truncated or resized while mapped; tables are created elsewhere and
renamed into place (see memstore.create).

A lazy store (`initial_rows` given) starts as a sparse file: a row whose bytes are all zero
was never written and reads as `initial_rows(ids)`. So that a written row is never mistaken for
an unwritten one, a row of all +0.0 is stored with its first value as -0.0 (equal in value).
Disk grows with the pages of rows actually written. With `known_pages`, the store also keeps
which file pages hold data (read once from the file's extents, then updated by its own writes)
and generates rows on pages that do not without touching the map, so reading never-written
rows does not fill the page cache (and the daemon's resident memory) with zero pages. Only a
store whose file no other process writes may keep it (the writer itself, or any reader of a
frozen table).

A writable store whose file has holes (a lazy table, zero optimizer state, a sparse copy)
reserves the blocks of the pages it is about to write (`reserve`, also called by every update)
before writing them through the map: a full disk is then a DiskFullError with nothing written,
never SIGBUS (memstore.space).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from memstore import fatal
from memstore.dtypes import DType
from memstore.errors import TableFormatError, permission_message
from memstore.space import data_pages, page_runs, reserve
from memstore.storage.base import RowStore, take_rows
from memstore.tabledir.fsafe import copy_range


class MmapRowStore(RowStore):
    """Rows in a flat file, read with numpy fancy indexing on a memory map."""

    def __init__(
        self,
        path: Path,
        num_rows: int,
        dim: int,
        dtype: DType,
        read_only: bool = True,
        initial_rows: Callable[[np.ndarray], np.ndarray] | None = None,
        known_pages: bool = False,
    ) -> None:
        super().__init__(num_rows, dim, dtype, read_only)
        self.path = Path(path)
        self.initial_rows = initial_rows
        self._row_bytes = dim * dtype.itemsize
        expected = num_rows * dim * dtype.itemsize
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            raise TableFormatError(f"row file {self.path} is missing") from None
        except PermissionError:
            raise TableFormatError(permission_message(self.path)) from None
        if stat.st_size != expected:
            raise TableFormatError(
                f"row file {self.path} holds {stat.st_size} bytes; the manifest needs {expected} "
                f"({num_rows} rows x {dim} x {dtype.itemsize} B): the table is damaged or incomplete"
            )
        self._data_pages = _data_pages(self.path, expected) if initial_rows and known_pages else None
        self._map: mmap.mmap | None = None
        # Pages known to have disk blocks (None: all do) and the descriptor that reserves the others.
        self._allocated: np.ndarray | None = None
        self._fd: int | None = None
        if expected:
            try:
                with open(self.path, "rb" if read_only else "r+b") as f:
                    self._map = mmap.mmap(
                        f.fileno(), expected, access=mmap.ACCESS_READ if read_only else mmap.ACCESS_WRITE
                    )
                    if not read_only and stat.st_blocks * 512 < expected:  # holes: reserve before writing
                        self._fd = os.dup(f.fileno())
                        self._allocated = (
                            self._data_pages if self._data_pages is not None else _data_pages(self.path, expected)
                        )
            except PermissionError:
                raise TableFormatError(permission_message(self.path)) from None
            # Lookups touch scattered rows: read-around would fetch (in a sparse file, zero-fill) 32
            # pages per fault for one row. Measured on a sparse 200 GB file: 7.9 s -> 0.03 s for 4k rows.
            if hasattr(mmap, "MADV_RANDOM"):
                self._map.madvise(mmap.MADV_RANDOM)
            self._rows: np.ndarray | None = np.frombuffer(self._map, dtype=dtype.numpy).reshape(num_rows, dim)
            fatal.register_mapping(self._rows.ctypes.data, expected, self.path)
        else:
            self._rows = np.empty((0, dim), dtype=dtype.numpy)

    def reserve(self, row_ids: np.ndarray) -> None:
        """Allocate disk blocks for rows about to be written (DiskFullError when the disk is full;
        nothing is written either way). Free for a file without holes and for pages reserved before."""
        if self._allocated is None or not len(row_ids):
            return
        first, last = self._end_pages(np.asarray(row_ids, dtype=np.int64))
        needed = ~(self._allocated[first] & self._allocated[last])
        if (last - first > 1).any():  # rows longer than a page: their middle pages too
            needed |= True
        if not needed.any():
            return
        first, last = first[needed], last[needed]
        reserve(self._fd, page_runs(first, last, _PAGE, self._map.size()), self.path, f"writing {len(first)} rows")
        for a, b in zip(first.tolist(), last.tolist()):
            self._allocated[a : b + 1] = True

    def _gather(self, ids: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        if self.initial_rows is None:
            if self._allocated is None or not len(ids):
                return take_rows(self._rows, ids, out)
            # Rows on pages without blocks are zeros, read without touching the map: on tmpfs even a
            # read fault allocates a page, and on a full disk that is SIGBUS.
            stored = self._on_pages(self._allocated, ids)
            if stored.all():
                return take_rows(self._rows, ids, out)
            rows = np.zeros((len(ids), self.dim), dtype=self.dtype.numpy) if out is None else out
            rows[~stored] = 0
            if stored.any():
                rows[stored] = take_rows(self._rows, ids[stored])
            return rows
        if self._data_pages is None or not len(ids):
            return self._fill_unwritten(ids, take_rows(self._rows, ids, out))
        # Rows on pages without data were never written: generated without touching the map.
        stored = self._on_data_pages(ids)
        if not stored.any():  # all never written (a big table barely trained): no copy through a mask
            generated = self.initial_rows(ids)
            if out is None:
                return generated
            out[...] = generated
            return out
        rows = np.empty((len(ids), self.dim), dtype=self.dtype.numpy) if out is None else out
        if stored.any():
            rows[stored] = self._fill_unwritten(ids[stored], take_rows(self._rows, ids[stored]))
        if not stored.all():
            rows[~stored] = self.initial_rows(ids[~stored])
        return rows

    def _fill_unwritten(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Replace the rows read as all-zero bytes (never written) by their initial values."""
        unwritten = ~_row_words(rows).any(axis=1)
        if unwritten.any():
            rows[unwritten] = self.initial_rows(ids[unwritten])
        return rows

    def _on_data_pages(self, ids: np.ndarray) -> np.ndarray:
        """Whether each row's first and last byte lie on pages that hold data (a row written has both)."""
        return self._on_pages(self._data_pages, ids)

    def _on_pages(self, pages: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Whether each row's first and last byte lie on pages marked in `pages` (its middle ones are
        marked with them whenever it is written)."""
        first, last = self._end_pages(ids)
        return pages[first] & pages[last]

    def _end_pages(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pages of each row's first and last byte (what `_on_data_pages` checks, `_update` marks)."""
        return ids * self._row_bytes // _PAGE, ((ids + 1) * self._row_bytes - 1) // _PAGE

    def _update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if self.initial_rows is not None:
            rows = np.ascontiguousarray(rows)
            words = _row_words(rows)
            zero = ~words.any(axis=1)
            if zero.any():
                rows = rows.copy()
                first = rows.view(f"<u{self.dtype.itemsize}")[:, 0]  # the first value's raw bits
                first[zero] = 1 << (8 * self.dtype.itemsize - 1)  # -0.0: written, and equal to +0.0
        self.reserve(ids)  # before writing through the map: a full disk is an error, not SIGBUS
        if self._data_pages is not None:  # before the write: a reader never skips a page that has data
            for pages in self._end_pages(ids):
                self._data_pages[pages] = True
        self._rows[ids] = rows

    @property
    def plain_rows(self) -> np.ndarray | None:
        """The mapped rows [num_rows, width] when each is read as stored (not a lazy table's, whose unwritten
        rows are generated, nor one with unreserved pages); else None. For a reader that checks ids itself
        and copies rows straight from the map (memstore.same_host)."""
        return self._rows if self.initial_rows is None and self._allocated is None else None

    @property
    def bytes_on_disk(self) -> int:
        """Bytes the file occupies on disk (less than its size while a lazy store is sparse)."""
        return self.path.stat().st_blocks * 512

    def _flush(self) -> None:
        if self._map is not None:
            self._map.flush()

    def copy_to(self, dest: Path) -> None:
        """A copy of the file; holes stay holes (a lazy store's copy stays sparse)."""
        with open(self.path, "rb") as src, open(dest, "wb") as out:
            _copy_sparse(src.fileno(), out.fileno(), self.path.stat().st_size)
            out.flush()
            os.fsync(out.fileno())

    def close(self) -> None:
        if self._rows is None:
            return
        super().close()
        if self._map is not None:
            fatal.unregister_mapping(self._rows.ctypes.data)
        self._rows = None
        self._map = None  # unmapped once no array views it (gathers return copies)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_PAGE = mmap.PAGESIZE


def _data_pages(path: Path, size: int) -> np.ndarray:
    """Per page of the file: whether it holds data (not a hole), from the file's extents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_pages(fd, size)
    finally:
        os.close(fd)


def _copy_sparse(src: int, dst: int, size: int) -> None:
    """Copy the data extents of `src` into `dst` and size it: holes are not written."""
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(src, start, os.SEEK_HOLE)
        position = start
        while position < end:
            copied = copy_range(src, dst, end - position, position)
            if copied == 0:
                break
            position += copied
        offset = end


def _row_words(rows: np.ndarray) -> np.ndarray:
    """Each row's raw bytes as [N, words] unsigned integers (8-byte words when they divide the row)."""
    row_bytes = rows.shape[1] * rows.itemsize
    word = 8 if row_bytes % 8 == 0 else 1
    return rows.view(np.uint8).reshape(len(rows), row_bytes).view(f"<u{word}")
