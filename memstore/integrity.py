"""Row checksums kept current by every write, checked on read and by a background scrub.

Every store of a table has a checksum sidecar `<store file>.sums` beside it; its format (a
checksum per row, a version per block of `BLOCK_ROWS` rows) is owned by `memstore.tabledir.sums`.
A sparse store's sidecar stays sparse like its store: a push reserves the pages it will write
before it is logged (`TableIntegrity.reserve`), so updating a sidecar through its map never meets
a full disk (DiskFullError instead, nothing applied).

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
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memstore.dtypes import DType
from memstore.errors import DataLossError, InvalidArgumentError
from memstore.storage import MmapRowStore, RowStore
from memstore.storage.base import take_rows
from memstore.table import Table, open_store
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import sums_path
from memstore.tabledir.sums import (
    BLOCK_ROWS,
    BLOCK_SHIFT,
    SumsFile,
    num_blocks,
    row_checksums,
    store_specs,
    write_sums_file,
)

log = logging.getLogger("memstore.integrity")

_CHUNK_ROWS = 1 << 16  # rows hashed at once when building or verifying whole stores
_SCRUB_BATCH_BLOCKS = 64  # blocks verified per scrub step (between pauses)


@dataclass(frozen=True)
class IntegrityConfig:
    """Checksum checking of a served table."""

    enabled: bool = True
    # Seconds within which the scrub verifies every block again (0: no scrub; reads still verify).
    scrub_period_s: float = 3600.0

    def __post_init__(self) -> None:
        if not (self.scrub_period_s >= 0 and np.isfinite(self.scrub_period_s)):
            raise InvalidArgumentError(f"scrub period must be 0 (off) or a positive number; got {self.scrub_period_s}")


def write_table_sums(table_dir: Path, manifest: Manifest) -> None:
    """Sidecars of every store of a table just created or imported (before it is renamed into place).

    Sparse stores (a lazy table's rows, zero optimizer state in an mmap table) are zero bytes: their
    sums are written without reading them."""
    with Table.open(table_dir, read_only=True) as table:
        for name, layer, rows, row_bytes, slot in store_specs(manifest):
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
        blocks = num_blocks(store.num_rows)
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
        specs = {name: (layer, row_bytes, slot) for name, layer, _, row_bytes, slot in store_specs(manifest)}
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
        blocks = ids >> BLOCK_SHIFT
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
        blocks = ids >> BLOCK_SHIFT  # a replay of older records never lowers a block's version
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
                blocks = np.unique(np.asarray(found.rows, dtype=np.int64) >> BLOCK_SHIFT)
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
                wrong = np.unique(checked.mismatched(first << BLOCK_SHIFT, min(n, last << BLOCK_SHIFT)) >> BLOCK_SHIFT)
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
            start, stop = block << BLOCK_SHIFT, min(n, (block + 1) << BLOCK_SHIFT)
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
    if not all(sums_path(path / name).exists() for name, *_ in store_specs(manifest)):
        return None
    with Table.open(path, read_only=True) as table:
        states: list[RowStore] = []
        try:
            stores: dict[str, RowStore] = {}
            for name, layer, _, _, slot in store_specs(manifest):
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
