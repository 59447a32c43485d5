"""Row checksums kept current by every write, checked on read and by a background scrub.

This module owns the checksum sidecar format. Every store of a table (a layer's rows, each
optimizer state slot) has a sidecar `<store file>.sums` beside it (`memstore.tabledir.names.sums_path`):

- a 64-byte header: magic ``MSSUMS1\\0``, block rows (u32), row bytes (u32), rows (u64), blocks (u64);
- one u32 checksum per row (`row_checksums` of the row's stored bytes), padded to 8 bytes;
- one u64 per block of `BLOCK_ROWS` rows: the table version of the last push that wrote a row
  of the block (0: none since create).

Checksums are of the bytes as stored, so a row never written in a sparse file (a lazy table, or
zero optimizer state) has the bytes of zeros and the checksum 0: an all-zero sidecar is right for
a sparse store, and a row whose bytes appear in a hole later is damage. A sidecar gets its disk
space when written, except an all-zero one (a lazy table's, zero optimizer state's), which stays
sparse like its store: a push reserves the pages it will write before it is logged
(`TableIntegrity.reserve`), so updating a
sidecar through its map never meets a full disk (DiskFullError instead, nothing applied).

Create and import write the sidecars; every applied push, replayed log record and replicated
record rewrites the checksums of exactly the rows it wrote and the version of their blocks, inside
the same sequence-lock section as the rows. A block is verified (every row's bytes against its
checksum) the first time a push touches it, and again by the scrub, which walks every block of every
store once per half scrub period. A lookup checks the rows it reads and verifies as many whole blocks
as those rows fill (`TableIntegrity.check`), so a fresh daemon's reads cost at most about twice
their rows until every block is verified, and nothing after. A mismatch found without the push lock is checked again
under it (a push may have been writing the block); one that remains marks the block damaged for
good: reads and pushes touching it raise DataLossError naming the layer, rows and file, and the
table's health turns NOT_SERVING (`TableIntegrity.add_damage_listener`).

A table without sidecars (made by an older memstore) gets them on its first
writable open, from the rows as they are then (checked against the manifest's rows sha256 when
the table was never trained), with a log line; opened read-only it is served unchecked, with a
warning. Turning checking off (`IntegrityConfig.enabled`) on a writable table deletes its
sidecars: pushes then no longer keep them, and the next checked start rebuilds them.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memstore import space
from memstore.dtypes import DType
from memstore.errors import DataLossError, InvalidArgumentError, TableFormatError
from memstore.space import page_runs
from memstore.storage import MmapRowStore, RowStore
from memstore.storage.base import take_rows
from memstore.table import Table, open_store
from memstore.tabledir.fsafe import copy_range, writing_durably
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import sums_path

log = logging.getLogger("memstore.integrity")

BLOCK_ROWS = 256  # rows per verified block: a power of two (a row's block is id >> _SHIFT)
_SHIFT = BLOCK_ROWS.bit_length() - 1
_MAGIC = b"MSSUMS1\0"
_HEADER = struct.Struct("<8sIIQQ")
_HEADER_BYTES = 64
_CHUNK_ROWS = 1 << 16  # rows hashed at once when building or verifying whole stores
_SCRUB_BATCH_BLOCKS = 64  # blocks verified per scrub step (between pauses)
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class IntegrityConfig:
    """Checksum checking of a served table."""

    enabled: bool = True
    # Seconds within which the scrub verifies every block again (0: no scrub; reads still verify).
    scrub_period_s: float = 3600.0

    def __post_init__(self) -> None:
        if not (self.scrub_period_s >= 0 and np.isfinite(self.scrub_period_s)):
            raise InvalidArgumentError(f"scrub period must be 0 (off) or a positive number; got {self.scrub_period_s}")


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


def _num_blocks(num_rows: int) -> int:
    return -(-num_rows // BLOCK_ROWS)


def _versions_offset(num_rows: int) -> int:
    """Where a sidecar's block versions start: after the u32 sums, 8-byte aligned."""
    return _HEADER_BYTES + -(-4 * num_rows // 8) * 8


def _sidecar_bytes(num_rows: int) -> int:
    return _versions_offset(num_rows) + 8 * _num_blocks(num_rows)


class SumsFile:
    """One store's sidecar, memory-mapped: `sums[row]` and `versions[block]`."""

    def __init__(self, path: Path, num_rows: int, row_bytes: int, writable: bool) -> None:
        self.path = path
        self.num_rows = num_rows
        self.writable = writable
        blocks = _num_blocks(num_rows)
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
        offsets = np.concatenate([_HEADER_BYTES + 4 * ids, _versions_offset(self.num_rows) + 8 * (ids >> _SHIFT)])
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
    blocks = _num_blocks(num_rows)
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


def _store_specs(manifest: Manifest) -> Iterator[tuple[str, int, int, int, str | None]]:
    """(file name, layer, rows, row bytes, optimizer slot or None) of every store of a table."""
    dim = manifest.layout.dim
    for layer in manifest.layout.layer_ids:
        rows = manifest.stored_rows(layer)
        yield manifest.layer_file(layer), layer, rows, manifest.dtype.row_bytes(dim), None
        for slot, (name, width) in manifest.state_files(layer).items():
            yield name, layer, rows, 4 * width, slot


def write_table_sums(table_dir: Path, manifest: Manifest) -> None:
    """Sidecars of every store of a table just created or imported (before it is renamed into place).

    Sparse stores (a lazy table's rows, zero optimizer state in an mmap table) are zero bytes: their
    sums are written without reading them."""
    with Table.open(table_dir, read_only=True) as table:
        for name, layer, rows, row_bytes, slot in _store_specs(manifest):
            store_path = table_dir / name
            if _all_holes(store_path):
                write_sums_file(sums_path(store_path), rows, row_bytes, None)
                continue
            store = table.store(layer) if slot is None else _state_store(table_dir, manifest, layer, slot)
            try:
                write_sums_file(sums_path(store_path), rows, row_bytes, _raw_chunks(store))
            finally:
                if slot is not None:
                    store.close()


def _all_holes(path: Path) -> bool:
    """Whether a regular file holds no data at all (sparse zeros); False for directories (LMDB)."""
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return True
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
        except OSError:  # ENXIO: no data anywhere
            return True
        return False
    finally:
        os.close(fd)


def _lazy(store: RowStore) -> bool:
    """Whether never-written rows of `store` are holes, read as generated rows."""
    return isinstance(store, MmapRowStore) and store.initial_rows is not None


def _raw_rows(store: RowStore, ids: np.ndarray) -> np.ndarray:
    """The stored bytes of rows (a lazy store's never-written rows as their zero bytes, not generated)."""
    if isinstance(store, MmapRowStore) and store.initial_rows is not None:
        return take_rows(store._rows, ids)  # the bytes as stored: the checksums are of those
    return store.gather(ids)


def _raw_range(store: RowStore, start: int, stop: int) -> tuple[np.ndarray, int]:
    """Stored bytes of rows start..stop-1 ([rows, row bytes] of uint8 for the mmap backend) and how many
    rows the file still holds (fewer: it was truncated under us).

    A row file is read with pread, not through the map: reading a hole of a sparse file through a
    shared map allocates a page on tmpfs (SIGBUS when it is full), and a truncated file kills a
    reader of the map; pread returns zeros for a hole and a short count past the end."""
    if not isinstance(store, MmapRowStore):
        return store.gather(np.arange(start, stop)), stop - start
    row_bytes = store._row_bytes
    fd = os.open(store.path, os.O_RDONLY)
    try:
        data = os.pread(fd, (stop - start) * row_bytes, start * row_bytes)
    finally:
        os.close(fd)
    whole = len(data) // row_bytes
    rows = np.zeros((stop - start, row_bytes), dtype=np.uint8)
    rows[:whole] = np.frombuffer(data, dtype=np.uint8, count=whole * row_bytes).reshape(whole, row_bytes)
    return rows, whole


def _raw_chunks(store: RowStore) -> Iterator[np.ndarray]:
    for start in range(0, store.num_rows, _CHUNK_ROWS):
        rows, whole = _raw_range(store, start, min(store.num_rows, start + _CHUNK_ROWS))
        if whole < len(rows):
            raise DataLossError(f"{getattr(store, 'path', store)} is shorter than its {store.num_rows} rows")
        yield rows


@dataclass
class Damage:
    """Rows whose bytes do not match their checksum."""

    file: str
    layer: int
    slot: str | None
    rows: list[int]  # the mismatched rows (store-local indices)

    def describe(self) -> str:
        what = f"layer {self.layer} rows" if self.slot is None else f"layer {self.layer} optimizer state {self.slot!r}"
        return f"{what} {_ranges(self.rows)} in {self.file}"


def _ranges(rows: list[int], limit: int = 8) -> str:
    """1,2,3,7 -> '1-3, 7' (at most `limit` ranges, then how many more rows)."""
    spans: list[list[int]] = []
    for row in rows:
        if spans and row == spans[-1][1] + 1:
            spans[-1][1] = row
        else:
            spans.append([row, row])
    shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:limit])
    rest = sum(b - a + 1 for a, b in spans[limit:])
    return shown + (f" and {rest} more" if rest else "")


class _Checked:
    """One store under check: its sidecar and each block's state."""

    def __init__(self, name: str, layer: int, slot: str | None, store: RowStore, sums: SumsFile) -> None:
        self.name, self.layer, self.slot, self.store, self.sums = name, layer, slot, store, sums
        blocks = _num_blocks(store.num_rows)
        self.ok = np.zeros(blocks, dtype=bool)  # verified, not damaged: a read costs this one lookup
        self.bad = np.zeros(blocks, dtype=bool)
        self.bad_rows: dict[int, list[int]] = {}
        # Every block verified and none damaged: a read then costs nothing at all. `ok`, the count of
        # blocks not ok and `all_ok` change together under `flag_lock`.
        self.all_ok = False
        self.not_ok = blocks
        self.flag_lock = threading.Lock()

    def set_ok(self, first: int, last: int, ok: np.ndarray) -> None:
        """Blocks first..last-1 verified: `ok` per block (False: a mismatch). A block marked bad stays not ok."""
        with self.flag_lock:
            was = self.ok[first:last]
            now = ok & ~self.bad[first:last]
            self.not_ok += int(np.count_nonzero(was)) - int(np.count_nonzero(now))
            self.ok[first:last] = now
            self.all_ok = self.not_ok == 0

    def set_bad(self, block: int, rows: list[int]) -> bool:
        """Mark a block damaged for good; True when it was not marked before."""
        with self.flag_lock:
            if self.ok[block]:
                self.ok[block] = False
                self.not_ok += 1
            self.all_ok = False
            if self.bad[block]:
                return False
            self.bad[block] = True
            self.bad_rows[block] = rows
            return True

    def mismatched(self, start: int, stop: int) -> np.ndarray:
        """Store-local rows in start..stop-1 whose bytes do not match their checksum."""
        store = self.store
        pages = getattr(store, "_data_pages", None)
        if isinstance(store, MmapRowStore) and store.initial_rows is not None and pages is not None:
            # Rows on pages without data are zero bytes (sum 0) without reading them into memory.
            ids = np.arange(start, stop)
            stored = store._on_data_pages(ids)
            if not stored.any() and self.sums.holes(start, stop):
                return np.empty(0, dtype=np.int64)  # nothing written, nothing recorded: nothing to read
            expected = self.sums.expected(start, stop)
            actual = np.zeros(stop - start, dtype=np.uint32)
            if stored.any():
                actual[stored] = row_checksums(take_rows(store._rows, ids[stored]))
        else:
            expected = self.sums.expected(start, stop)
            rows, whole = _raw_range(store, start, stop)
            actual = row_checksums(rows)
            if whole < stop - start:  # the file lost its end: those rows are gone
                return (
                    np.concatenate([np.flatnonzero(actual[:whole] != expected[:whole]), np.arange(whole, stop - start)])
                    + start
                )
        return np.flatnonzero(actual != expected) + start


class TableIntegrity:
    """The checksums of one open table's stores: checks, updates, scrub, and what was found damaged."""

    def __init__(self, stores: list[_Checked], push_lock: threading.Lock, path: Path) -> None:
        self._stores = {s.name: s for s in stores}
        self._by_layer: dict[int, list[_Checked]] = {}
        for s in stores:
            self._by_layer.setdefault(s.layer, []).append(s)
        self._rows_of = {s.layer: s for s in stores if s.slot is None}
        self._push_lock = push_lock
        self.path = path
        self.damage: list[Damage] = []
        self._listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._scrubber: threading.Thread | None = None
        self.scrub_passes = 0  # completed passes over every block (tests wait on it)

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        manifest: Manifest,
        stores: dict[str, RowStore],
        writable: bool,
        push_lock: threading.Lock,
        config: IntegrityConfig,
        untrained: bool,
    ) -> TableIntegrity | None:
        """Checks for the stores of an open table (file name -> store), or None when off or impossible.

        Writable: missing sidecars are built from the rows as they are (checked against the manifest's
        rows sha256 when `untrained`); with checking off, sidecars are deleted (pushes stop keeping them).
        """
        specs = {name: (layer, row_bytes, slot) for name, layer, _, row_bytes, slot in _store_specs(manifest)}
        paths = {name: sums_path(path / name) for name in stores}
        if not config.enabled:
            if writable:
                for sums in paths.values():
                    sums.unlink(missing_ok=True)
                log.warning(
                    "%s: integrity checking is off; its checksums are removed (rebuilt at a checked start)", path
                )
            return None
        missing = [name for name, p in paths.items() if not p.exists()]
        if missing and not writable:
            log.warning(
                "%s has no row checksums (made by an older memstore): damage is not detected while "
                "it is served; open it writable once, or `memstore verify` it",
                path,
            )
            return None
        if missing:
            _build_missing(path, manifest, stores, missing, specs, untrained)
        checked = []
        try:
            for name, store in stores.items():
                layer, row_bytes, slot = specs[name]
                checked.append(
                    _Checked(name, layer, slot, store, SumsFile(paths[name], store.num_rows, row_bytes, writable))
                )
        except BaseException:
            for c in checked:
                c.sums.close()
            raise
        return cls(checked, push_lock, path)

    # -- reads and writes ------------------------------------------------------------------------

    def check(self, name: str, ids: np.ndarray, locked: bool = False) -> None:
        """DataLossError when any of the rows (store-local ids) lies in a damaged block; verifies the
        blocks not verified yet first. `locked`: the caller holds the push lock."""
        checked = self._stores.get(name)
        if checked is None or not len(ids) or checked.all_ok:
            return
        blocks = ids >> _SHIFT
        if checked.ok[blocks].all():
            return
        unverified = ~checked.ok[blocks]
        if checked.slot is None and not _lazy(checked.store):
            # A lookup's rows are checked one by one, read as the lookup reads them next, and only as many
            # whole blocks as those rows fill are verified besides: verifying every block a lookup touches
            # would read and hash up to 256x its rows until each block was verified once (a fresh daemon, a
            # huge table); this way reads cost at most twice their rows until then. Blocks of a row that does
            # not match are verified too. (Optimizer state and lazy rows may be holes, never read through the
            # map: their blocks are verified whole, with pread.)
            asked = ids[unverified]
            touched = np.unique(blocks[unverified])
            unverified[unverified] = row_checksums(checked.store.gather(asked)) != checked.sums.sums[asked]
            todo = np.union1d(np.unique(blocks[unverified]), touched[: max(1, len(asked) // BLOCK_ROWS)])
        else:
            todo = np.unique(blocks[unverified])
        self._verify_blocks(checked, todo[~checked.bad[todo]], locked)
        hit = checked.bad[blocks]
        if hit.any():
            rows = np.unique(ids[hit]).tolist()
            damaged = sorted({r for b in np.unique(blocks[hit]).tolist() for r in checked.bad_rows[b]})
            raise DataLossError(
                f"{self.path}: {self._what(checked)} {_ranges(rows)} lie in damaged blocks of {checked.name} (rows "
                f"{_ranges(damaged)} do not match their checksums): they cannot be served; restore the table from "
                "a snapshot"
            )

    def check_rows(self, layer: int, ids: np.ndarray) -> None:
        """`check` for rows of a layer (store-local ids): what a lookup reads."""
        checked = self._rows_of.get(layer)
        if checked is not None and not checked.all_ok:
            self.check(checked.name, ids)

    def check_layer(self, layer: int, ids: np.ndarray, locked: bool = False) -> None:
        """`check` for the rows and every optimizer state store of a layer (what a push reads)."""
        for checked in self._by_layer.get(layer, ()):
            self.check(checked.name, ids, locked)

    def record(self, name: str, ids: np.ndarray, rows: np.ndarray | None, version: int) -> None:
        """New checksums for rows just written (caller holds the push lock); `rows` None reads them back."""
        checked = self._stores.get(name)
        if checked is None or not len(ids):
            return
        if rows is None or (isinstance(checked.store, MmapRowStore) and checked.store.initial_rows is not None):
            rows = _raw_rows(checked.store, ids)  # a lazy store may store a row differently (-0.0 for +0.0)
        checked.sums.reserve(ids)  # a no-op after the push's own reservation (replays reserve here)
        checked.sums.sums[ids] = row_checksums(rows)
        blocks = ids >> _SHIFT  # a replay of older records never lowers a block's version
        checked.sums.versions[blocks] = np.maximum(checked.sums.versions[blocks], np.uint64(version))

    def reserve(self, layer: int, ids: np.ndarray) -> None:
        """Disk space for the checksums a write of these rows of a layer will update (before it is logged)."""
        for checked in self._by_layer.get(layer, ()):
            checked.sums.reserve(ids)

    def record_push(
        self, layer: int, ids: np.ndarray, rows: np.ndarray, state: dict[str, np.ndarray], version: int
    ) -> None:
        """`record` for a push's after-image: the layer's rows and each optimizer state slot."""
        for checked in self._by_layer.get(layer, ()):
            self.record(checked.name, ids, rows if checked.slot is None else state[checked.slot], version)

    def refuse_if_damaged(self, what: str) -> None:
        """DataLossError naming the damage found so far, if any (`what` would copy it)."""
        if self.damage:
            raise DataLossError(
                f"{self.path} has damaged rows ({'; '.join(d.describe() for d in self.damage)}): {what} would copy "
                "them; restore the table from a snapshot"
            )

    def copy_sums_to(self, dest: Path) -> None:
        """Copy every sidecar into `dest` (a snapshot: pushes replayed onto the copy then fix torn sums)."""
        for checked in self._stores.values():
            checked.sums.copy_to(dest / checked.sums.path.name)

    def confirm_copy_damage(self, damage: list[Damage]) -> None:
        """Check again, in this table, the rows a copy of it found damaged (marks its blocks when they are)."""
        for found in damage:
            checked = self._stores.get(found.file)
            if checked is not None:
                blocks = np.unique(np.asarray(found.rows, dtype=np.int64) >> _SHIFT)
                self._verify_blocks(checked, blocks[~checked.bad[blocks]], locked=False)

    @staticmethod
    def _what(checked: _Checked) -> str:
        if checked.slot is None:
            return f"layer {checked.layer} rows"
        return f"layer {checked.layer} optimizer state {checked.slot!r} of rows"

    def _verify_blocks(self, checked: _Checked, blocks: np.ndarray, locked: bool) -> None:
        """Verify whole blocks (sorted, distinct); a mismatch is checked again under the push lock, then marks
        the block bad. Consecutive blocks are verified together, up to _CHUNK_ROWS rows at a time."""
        n = checked.store.num_rows
        suspects: list[int] = []
        blocks = np.asarray(blocks, dtype=np.int64)
        per_chunk = _CHUNK_ROWS // BLOCK_ROWS
        # Runs of consecutive blocks, each cut into chunks: [first, last) block ranges.
        breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
        for run in np.split(blocks, breaks) if len(blocks) else ():
            for first in range(int(run[0]), int(run[-1]) + 1, per_chunk):
                last = min(int(run[-1]) + 1, first + per_chunk)
                wrong = np.unique(checked.mismatched(first << _SHIFT, min(n, last << _SHIFT)) >> _SHIFT)
                ok = np.ones(last - first, dtype=bool)
                ok[wrong - first] = False
                checked.set_ok(first, last, ok)
                suspects.extend(wrong.tolist())
        if not suspects:
            return
        if locked:
            self._confirm(checked, suspects)
            return
        # No write in flight: what still differs is damage. (No other process writes the table meanwhile: a
        # writer holds the table's directory exclusively, memstore.tabledir.lock.)
        with self._push_lock:
            self._confirm(checked, suspects)

    def _confirm(self, checked: _Checked, blocks: list[int]) -> None:
        n = checked.store.num_rows
        found = []
        for block in blocks:
            start, stop = block << _SHIFT, min(n, (block + 1) << _SHIFT)
            rows = checked.mismatched(start, stop).tolist()
            if not rows:
                checked.set_ok(block, block + 1, np.ones(1, dtype=bool))  # a push was writing it
            elif checked.set_bad(block, rows):
                found.extend(rows)
        if found:
            damage = Damage(checked.name, checked.layer, checked.slot, found)
            self.damage.append(damage)
            log.error(
                "%s: DATA LOSS: %s do not match their checksums; restore the table from a snapshot",
                self.path,
                damage.describe(),
            )
            for listener in list(self._listeners):
                listener()

    def add_damage_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` each time damage is found (health turns NOT_SERVING)."""
        self._listeners.append(listener)

    @property
    def intact(self) -> bool:
        """No damage found so far."""
        return not self.damage

    # -- whole stores ----------------------------------------------------------------------------

    def verify_all(self, locked: bool = False) -> list[Damage]:
        """Verify every block of every store now; returns the damage found so far (all of it)."""
        for checked in self._stores.values():
            self._verify_blocks(checked, np.flatnonzero(~checked.bad), locked)
        return list(self.damage)

    def check_not_ahead(self, version: int, since: int, accept_data_loss: bool) -> None:
        """After recovery at `version`: refuse files ahead of the log, verify blocks written since `since`.

        A block whose recorded version is past `version` holds a push the log lost (`--durability os`
        and a host crash): DataLossError, unless `accept_data_loss` (then logged, and the blocks count
        as written at `version`). Blocks written after the checkpoint at `since` are verified now.
        """
        ahead = []
        versions = {name: checked.sums.block_versions() for name, checked in self._stores.items()}
        for name, checked in self._stores.items():
            blocks = np.flatnonzero(versions[name] > np.uint64(version))
            if len(blocks):
                ahead.append((checked, blocks, int(versions[name][blocks].max())))
        if ahead:
            what = "; ".join(f"{c.name}: {len(b)} blocks written by versions up to {top}" for c, b, top in ahead)
            message = (
                f"{self.path}: the files hold pushes past version {version}, the last one its log holds ({what}): "
                "the log lost its tail (a host crash with --durability os) while the rows kept those pushes, so "
                "retrying them would apply them twice. Restore the table from a snapshot, or serve it with "
                "--accept-data-loss to keep the rows as they are"
            )
            if not accept_data_loss:
                raise DataLossError(message)
            log.error("%s (accepted)", message)
            for checked, blocks, _ in ahead:
                checked.sums.versions[blocks] = version  # pages that hold data: written by those pushes
                versions[checked.name][blocks] = version
        for checked in self._stores.values():
            recent = np.flatnonzero(versions[checked.name] > np.uint64(since))
            self._verify_blocks(checked, recent, locked=False)

    def flush(self) -> None:
        for checked in self._stores.values():
            checked.sums.flush()

    # -- scrub -----------------------------------------------------------------------------------

    def start_scrub(self, period_s: float) -> None:
        """Verify every block again in each half of `period_s` (so damage is found within one period)."""
        if period_s <= 0 or self._scrubber is not None:
            return
        self._scrubber = threading.Thread(target=self._scrub, args=(period_s,), name="memstore-scrub", daemon=True)
        self._scrubber.start()

    def _scrub(self, period_s: float) -> None:
        half = period_s / 2
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                stores = list(self._stores.values())
                batches = sum(-(-len(c.ok) // _SCRUB_BATCH_BLOCKS) for c in stores)
                done = 0
                for checked in stores:
                    for first in range(0, len(checked.ok), _SCRUB_BATCH_BLOCKS):
                        blocks = np.arange(first, min(len(checked.ok), first + _SCRUB_BATCH_BLOCKS))
                        self._verify_blocks(checked, blocks[~checked.bad[blocks]], locked=False)
                        done += 1
                        # Pace the pass over 80% of the half period: a steady trickle, not a burst.
                        if self._stop.wait(max(0.0, start + 0.8 * half * done / batches - time.monotonic())):
                            return
                self.scrub_passes += 1
                self._stop.wait(max(0.0, start + half - time.monotonic()))
        except Exception:  # never kill the daemon from here; say why the scrub stopped
            closed = any(_closed(c.store) for c in self._stores.values())  # a Table closed under a server
            if not self._stop.is_set() and not closed:
                log.exception("%s: the integrity scrub stopped", self.path)

    def close(self) -> None:
        """Stop the scrub and release the sidecars (flushed)."""
        self._stop.set()
        if self._scrubber is not None and self._scrubber is not threading.current_thread():
            self._scrubber.join()
        self._scrubber = None
        for checked in self._stores.values():
            checked.sums.flush()
            checked.sums.close()
        self._stores = {}
        self._by_layer = {}
        self._rows_of = {}


def _closed(store: RowStore) -> bool:
    """Whether a store was closed (its map or environment released)."""
    return getattr(store, "_rows", True) is None or getattr(store, "_env", True) is None


def _build_missing(
    path: Path,
    manifest: Manifest,
    stores: dict[str, RowStore],
    missing: list[str],
    specs: dict[str, tuple[int, int, str | None]],
    untrained: bool,
) -> None:
    """Sidecars for stores that have none, from their rows as they are; for a never-trained table the
    rows are first checked against the manifest's rows sha256 (damage is not made the reference)."""
    if untrained and manifest.rows_sha256 is not None:
        digest = hashlib.sha256()
        for layer in manifest.layout.layer_ids:
            store = stores[manifest.layer_file(layer)]
            for start in range(0, store.num_rows, _CHUNK_ROWS):
                digest.update(store.gather(np.arange(start, min(store.num_rows, start + _CHUNK_ROWS))).tobytes())
        if digest.hexdigest() != manifest.rows_sha256:
            raise DataLossError(
                f"{path}: building its row checksums, the rows do not match the sha256 recorded at create "
                f"({digest.hexdigest()} vs {manifest.rows_sha256}) and the table was never trained: the rows are "
                "damaged; restore the table from a snapshot"
            )
    log.warning(
        "%s: no row checksums for %s (made by an older memstore): building them from the rows as they are now",
        path,
        ", ".join(missing),
    )
    for name in missing:
        _, row_bytes, _ = specs[name]
        write_sums_file(sums_path(path / name), stores[name].num_rows, row_bytes, _raw_chunks(stores[name]))


def _state_store(table_dir: Path, manifest: Manifest, layer: int, slot: str) -> RowStore:
    """One optimizer state store, opened read-only."""
    name, width = manifest.state_files(layer)[slot]
    return open_store(manifest.backend, table_dir / name, manifest.stored_rows(layer), width, DType.FLOAT32, True)


def verify_table(path: Path, manifest: Manifest) -> list[Damage] | None:
    """Every row of every store of a table directory against its sidecar (offline, `memstore verify`);
    None when the table has no sidecars."""
    if not all(sums_path(path / name).exists() for name, *_ in _store_specs(manifest)):
        return None
    with Table.open(path, read_only=True) as table:
        states: list[RowStore] = []
        try:
            stores: dict[str, RowStore] = {}
            for name, layer, _, _, slot in _store_specs(manifest):
                if slot is None:
                    stores[name] = table.store(layer)
                else:
                    states.append(_state_store(path, manifest, layer, slot))
                    stores[name] = states[-1]
            integrity = TableIntegrity.open(path, manifest, stores, False, threading.Lock(), IntegrityConfig(), False)
            assert integrity is not None
            try:
                return integrity.verify_all()
            finally:
                integrity.close()
        finally:
            for store in states:
                store.close()
