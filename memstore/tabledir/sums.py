"""The checksum sidecar format (`*.sums`): one per store of a table, the checksum of every row as stored.

Every store of a table (a layer's rows, each optimizer state slot; `store_specs`) has a sidecar
`<store file>.sums` beside it (`memstore.tabledir.names.sums_path`). Little-endian, as docs/format.md
("Checksum sidecars") describes it for users:

- a 64-byte header: magic ``MSSUMS1\\0`` (8 bytes), block rows (u32, `BLOCK_ROWS`), row bytes (u32),
  rows (u64), blocks (u64), zeros to 64 bytes;
- one u32 checksum per row (`row_checksums` of the row's stored bytes), padded with zeros to a
  multiple of 8 bytes;
- one u64 per block of `BLOCK_ROWS` rows: the table version of the last push that wrote a row of
  the block (0: none since create).

The file is exactly ``64 + 8 * ceil(rows / 2) + 8 * ceil(rows / 256)`` bytes. Checksums are of the
bytes as stored, so a row of zero bytes (never written in a sparse store) has checksum 0: an
all-zero sidecar is right for a sparse store, and is left sparse itself (`write_sums_file`); a
writer gives disk space to the pages it will write first (`SumsFile.reserve`), so writing through
the map never meets a full disk. What keeps the sidecars current and checks rows against them is
`memstore.integrity`.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from memstore import space
from memstore.errors import DataLossError, TableFormatError
from memstore.space import page_runs
from memstore.tabledir.fsafe import copy_range, writing_durably
from memstore.tabledir.manifest import Manifest

BLOCK_ROWS = 256  # rows per block (one version each): a power of two (a row's block is id >> BLOCK_SHIFT)
BLOCK_SHIFT = BLOCK_ROWS.bit_length() - 1
_MAGIC = b"MSSUMS1\0"
_HEADER = struct.Struct("<8sIIQQ")
_HEADER_BYTES = 64
_PAGE = mmap.PAGESIZE


def _multipliers(words: int) -> np.ndarray:
    """One odd 64-bit multiplier per word position (splitmix64 of the position, low bit set)."""
    x = np.arange(1, words + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    return (x >> np.uint64(32)).astype(np.uint32) | np.uint32(1)


_MULTIPLIER_CACHE: dict[int, np.ndarray] = {}


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """One u32 per row of a C-contiguous [N, ...] array: sum of the row's words times odd multipliers,
    modulo 2**32.

    Words are 4 bytes when they divide the row (else 2 or 1). A change of any one word changes the
    sum (an odd multiplier is invertible modulo 2**32); the bytes of zeros sum to 0. 32 bits, not 64:
    the checksums of the rows a push writes touch half the pages (what a push pays for, measured).
    """
    rows = np.ascontiguousarray(rows)
    count = len(rows)
    row_bytes = rows.nbytes // count if count else 0
    if not count or not row_bytes:
        return np.zeros(count, dtype=np.uint32)
    word = next(w for w in (4, 2, 1) if row_bytes % w == 0)
    words = rows.view(np.uint8).reshape(count, row_bytes).view(f"<u{word}")
    if word != 4:
        words = words.astype(np.uint32)
    multipliers = _MULTIPLIER_CACHE.get(words.shape[1])
    if multipliers is None:
        multipliers = _MULTIPLIER_CACHE.setdefault(words.shape[1], _multipliers(words.shape[1]))
    return words @ multipliers  # integer matmul wraps modulo 2**32, ~3x faster than multiply-and-sum


def num_blocks(num_rows: int) -> int:
    """How many blocks of `BLOCK_ROWS` rows a store of `num_rows` rows has (the last one may be short)."""
    return -(-num_rows // BLOCK_ROWS)


def _versions_offset(num_rows: int) -> int:
    """Where a sidecar's block versions start: after the u32 sums, 8-byte aligned."""
    return _HEADER_BYTES + -(-4 * num_rows // 8) * 8


def _sidecar_bytes(num_rows: int) -> int:
    return _versions_offset(num_rows) + 8 * num_blocks(num_rows)


class SumsFile:
    """One store's sidecar, memory-mapped: `sums[row]` and `versions[block]`."""

    def __init__(self, path: Path, num_rows: int, row_bytes: int, writable: bool) -> None:
        self.path = path
        self.num_rows = num_rows
        self.writable = writable
        blocks = num_blocks(num_rows)
        size = _sidecar_bytes(num_rows)
        try:
            with open(path, "r+b" if writable else "rb") as f:
                actual = os.fstat(f.fileno()).st_size
                header = f.read(_HEADER.size)
                if actual != size:
                    raise DataLossError(
                        f"checksum file {path} holds {actual} bytes where {size} belong: it is damaged; restore the "
                        "table from a snapshot (or delete the file to rebuild the checksums from the rows as they are)"
                    )
                magic, block_rows, stored_row_bytes, rows, stored_blocks = _HEADER.unpack(header)
                if (magic, block_rows, stored_row_bytes, rows, stored_blocks) != (
                    _MAGIC,
                    BLOCK_ROWS,
                    row_bytes,
                    num_rows,
                    blocks,
                ):
                    raise DataLossError(
                        f"checksum file {path} has a header for another store ({magic!r}, {block_rows} rows per "
                        f"block, {rows} rows of {stored_row_bytes} bytes; expected {num_rows} rows of {row_bytes}): "
                        "restore the table from a snapshot (or delete the file to rebuild it from the rows as they are)"
                    )
                access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
                self._map = mmap.mmap(f.fileno(), size, access=access)
                # Pages with disk space, when some have none (a sparse sidecar); None: every page has.
                self._allocated = _allocated_pages(f.fileno(), size)
                self._fd = os.dup(f.fileno()) if self._allocated is not None else None
        except FileNotFoundError:
            raise TableFormatError(f"checksum file {path} is missing") from None
        self.sums = np.frombuffer(self._map, dtype="<u4", count=num_rows, offset=_HEADER_BYTES)
        self.versions = np.frombuffer(self._map, dtype="<u8", count=blocks, offset=_versions_offset(num_rows))

    def reserve(self, ids: np.ndarray) -> None:
        """Give disk space to the sidecar pages a write of these rows touches (a sparse sidecar), so writing
        them through the map never meets a full disk (SIGBUS): DiskFullError when the disk is full."""
        allocated = self._allocated
        if allocated is None or not len(ids):
            return
        offsets = np.concatenate([_HEADER_BYTES + 4 * ids, _versions_offset(self.num_rows) + 8 * (ids >> BLOCK_SHIFT)])
        pages = np.unique(offsets // _PAGE)
        pages = pages[~allocated[pages]]
        if len(pages):
            runs = page_runs(pages, pages, _PAGE, len(self._map))
            space.reserve(self._fd, runs, self.path, "a push (its rows' checksums)")  # DiskFullError when full
            allocated[pages] = True
            if allocated.all():
                self._allocated = None  # every page has disk now: no more reservations or preads

    def expected(self, start: int, stop: int) -> np.ndarray:
        """The recorded checksums of rows start..stop-1. A sparse sidecar is read with pread, not through
        its map: reading a hole through a shared map allocates a page on tmpfs (SIGBUS when full)."""
        if self._allocated is None:
            return self.sums[start:stop]
        data = os.pread(self._fd, 4 * (stop - start), _HEADER_BYTES + 4 * start)
        return np.frombuffer(data, dtype="<u4")

    def copy_to(self, target: Path) -> None:
        """A copy of the sidecar at `target` (synced), as sparse as this one: only data extents are copied."""
        size = len(self._map)
        with open(self.path, "rb") as src, open(target, "wb") as out:
            out.truncate(size)
            if self._allocated is None:
                os.posix_fallocate(out.fileno(), 0, size)
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
                position = start
                while position < end:
                    copied = copy_range(src.fileno(), out.fileno(), end - position, position)
                    if copied == 0:
                        break
                    position += copied
                offset = end
            out.flush()
            os.fsync(out.fileno())

    def block_versions(self) -> np.ndarray:
        """A copy of every block's version (pread for a sparse sidecar, as `expected`)."""
        if self._allocated is None:
            return self.versions.copy()
        data = os.pread(self._fd, 8 * len(self.versions), _versions_offset(self.num_rows))
        return np.frombuffer(data, dtype="<u8").copy()

    def holes(self, start: int, stop: int) -> bool:
        """Whether the sums of rows start..stop-1 lie on pages without disk space (all zero: never written)."""
        if self._allocated is None:
            return False
        first, last = (_HEADER_BYTES + 4 * start) // _PAGE, (_HEADER_BYTES + 4 * stop - 1) // _PAGE
        return not self._allocated[first : last + 1].any()

    def flush(self) -> None:
        """Make the checksums durable (a checkpoint calls it with the stores' flush)."""
        if self.writable:
            self._map.flush()

    def close(self) -> None:
        del self.sums, self.versions
        self._map.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_sums_file(path: Path, num_rows: int, row_bytes: int, chunks: Iterator[np.ndarray] | None) -> None:
    """A new sidecar at `path`, written durably (memstore.tabledir.fsafe), from the store's raw rows in order (None:
    every row is zero bytes, the sums are all 0: the sidecar is left sparse, like the store)."""
    blocks = num_blocks(num_rows)
    size = _sidecar_bytes(num_rows)
    with writing_durably(path) as f:
        if chunks is None:
            f.truncate(size)  # sparse, like its store: pushes reserve the pages they write (SumsFile.reserve)
        else:
            os.posix_fallocate(f.fileno(), 0, size)  # on disk: writes through the map never meet a full disk
        f.write(_HEADER.pack(_MAGIC, BLOCK_ROWS, row_bytes, num_rows, blocks).ljust(_HEADER_BYTES, b"\0"))
        written = 0
        for rows in chunks or ():
            f.write(row_checksums(rows).astype("<u4").tobytes())
            written += len(rows)
        if chunks is not None and written != num_rows:
            raise TableFormatError(f"{path}: {written} rows were checksummed where the store has {num_rows}")


def _allocated_pages(fd: int, size: int) -> np.ndarray | None:
    """Per page of a file: whether it has disk space (from its extents); None when every page has."""
    if os.fstat(fd).st_blocks * 512 >= size:
        return None
    pages = space.data_pages(fd, size)
    return None if pages.all() else pages


def store_specs(manifest: Manifest) -> Iterator[tuple[str, int, int, int, str | None]]:
    """(file name, layer, rows, row bytes, optimizer slot or None) of every store of a table: each has a sidecar."""
    dim = manifest.layout.dim
    for layer in manifest.layout.layer_ids:
        rows = manifest.stored_rows(layer)
        yield manifest.layer_file(layer), layer, rows, manifest.dtype.row_bytes(dim), None
        for slot, (name, width) in manifest.state_files(layer).items():
            yield name, layer, rows, 4 * width, slot
