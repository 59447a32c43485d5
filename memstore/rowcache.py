"""The daemon's row cache: a DRAM tier of whole rows over disk-resident layer files, in shared memory.

One cache per daemon, shared by every layer of its table, holds rows by (layer, store-local row id).
It is set-associative: a row may live only in the `ways` slots of its set (set = hash(key) % sets),
so a batch is looked up, admitted and evicted with numpy over [rows, ways] arrays, no per-row Python
and no index beside the slots themselves. Within a set the least recently used slot is replaced
(a batch counter stamped on every hit and admission; kept in the daemon's private memory).

The slots live in a file in /dev/shm that the daemon creates, sizes and unlinks when it closes, so
its memory counts to the daemon (its cgroup) and same-host clients can map it read-only
(`RowCacheReader`): they copy hits in their own process and ask the daemon for the misses, which
warms the cache for everyone. This module owns that file's layout (docs/format.md), version 1:

    header  4096 B: magic b"MSROWC01", then little-endian int64 words: layout version (1),
            sets, ways, row bytes, keys offset, seqs offset, data offset
    keys    int64[slots]          (layer << 40) | row, or -1 for an empty slot
    seqs    int64[slots]          odd while the daemon writes the slot, bumped by 2 per write
    data    uint8[slots, row bytes], at a 4096-byte boundary

The daemon is the only writer and writes a slot as: seq odd, key, row, seq even (x86-64 keeps
those stores in order). A reader reads seq, the row, the key, then seq again, and trusts the row
only when both seqs are equal and even and the key is the one it wanted. Numpy only: the same-host
client imports this module.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from memstore.errors import InvalidArgumentError, TableFormatError

MAGIC = b"MSROWC01"
LAYOUT_VERSION = 1
HEADER_BYTES = 4096
LAYER_SHIFT = 40  # row ids below 2**40 per layer (a store holds far fewer rows than that)
EMPTY = -1
SHM_DIR = Path("/dev/shm")
# Bytes per slot beside its row: key, seq (shared) and the LRU stamp (daemon-private).
SLOT_OVERHEAD = 8 + 8 + 8
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Updates per layer whose row ids are kept, so that a miss read during one leaves out only the rows it wrote.
_RECENT_UPDATES = 64


@dataclass(frozen=True)
class RowCacheConfig:
    """The daemon's row cache: its memory budget (0: no cache), ways per set, and whether misses are
    read with O_DIRECT (kept out of the page cache, so the budget is the cache's)."""

    bytes: int = 0
    ways: int = 16
    direct_io: bool = True
    # Threads reading a batch's misses at once: the disk queue depth (measured on this host's virtio disk: 8k
    # random 4 KiB reads/s on 1 thread, 38k on 8, 62k on 32 and on 64).
    read_threads: int = 32

    def __post_init__(self) -> None:
        if self.bytes < 0:
            raise InvalidArgumentError(f"RowCacheConfig.bytes must be 0 (no cache) or more; got {self.bytes}")
        if not 1 <= self.ways <= 64:
            raise InvalidArgumentError(f"RowCacheConfig.ways must be in 1..64; got {self.ways}")
        if not 1 <= self.read_threads <= 256:
            raise InvalidArgumentError(f"RowCacheConfig.read_threads must be in 1..256; got {self.read_threads}")

    @property
    def enabled(self) -> bool:
        return self.bytes > 0


def slots_for(budget: int, row_bytes: int, ways: int) -> int:
    """Slots a budget of `budget` bytes holds for rows of `row_bytes` (a multiple of `ways`; 0 if none fit)."""
    usable = budget - 2 * HEADER_BYTES  # the header, and the data's alignment
    slots = max(0, usable // (row_bytes + SLOT_OVERHEAD))
    return slots - slots % ways


def slots_bytes(slots: int, row_bytes: int) -> int:
    """The budget that holds exactly `slots` rows of `row_bytes` (the inverse of `slots_for`)."""
    return 2 * HEADER_BYTES + slots * (row_bytes + SLOT_OVERHEAD)


def make_keys(layer_id: int, ids: np.ndarray) -> np.ndarray:
    """Cache keys of a layer's store-local row ids."""
    return ids.astype(np.int64, copy=False) | np.int64(layer_id << LAYER_SHIFT)


def set_of(keys: np.ndarray, sets: int) -> np.ndarray:
    """The set of each key: Fibonacci hashing (multiply by 2**64/phi, take the high bits) modulo `sets`."""
    mixed = keys.view(np.uint64) * _GOLDEN  # wraps modulo 2**64
    return ((mixed >> np.uint64(29)) % np.uint64(sets)).astype(np.int64)


def _remove_orphans(directory: Path) -> None:
    """Delete cache files left by daemons that died (no process of the pid in its name, nobody holds
    its lock), a minute old or more (a file younger than that may be a starting daemon's, not yet locked)."""
    now = time.time()
    for path in directory.glob("memstore-rowcache-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():  # its daemon (or a process of that id) runs
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < 60:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: its daemon runs
            continue
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)


class _Slots:
    """The mapped arrays of a cache file (the daemon's writable map or a client's read-only one)."""

    def __init__(self, buffer: mmap.mmap, writable: bool) -> None:
        head = np.frombuffer(buffer, dtype="<i8", count=HEADER_BYTES // 8)
        if bytes(buffer[:8]) != MAGIC or int(head[1]) != LAYOUT_VERSION:
            raise TableFormatError("not a memstore row cache file of layout version 1")
        self.sets, self.ways, self.row_bytes = int(head[2]), int(head[3]), int(head[4])
        keys_at, seqs_at, data_at = int(head[5]), int(head[6]), int(head[7])
        self.slots = self.sets * self.ways
        if data_at + self.slots * self.row_bytes > len(buffer):
            raise TableFormatError("row cache file is shorter than its header says")
        self.keys = np.frombuffer(buffer, dtype="<i8", count=self.slots, offset=keys_at)
        self.seqs = np.frombuffer(buffer, dtype="<i8", count=self.slots, offset=seqs_at)
        self.data = np.frombuffer(buffer, dtype=np.uint8, count=self.slots * self.row_bytes, offset=data_at).reshape(
            self.slots, self.row_bytes
        )
        self._void = self.data.view(np.dtype((np.void, self.row_bytes))).reshape(self.slots)
        self.keys_by_set = self.keys.reshape(self.sets, self.ways)
        self.way_range = np.arange(self.ways, dtype=np.int64)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The slot holding each key, or -1."""
        sets = set_of(keys, self.sets)  # [n]
        found = np.take(self.keys_by_set, sets, axis=0) == keys[:, None]  # [n, ways]: a set's keys are one block
        way = found.argmax(axis=1)
        hit = found[np.arange(len(keys)), way]
        return np.where(hit, sets * self.ways + way, -1)

    def copy_rows(self, slots: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of `slots` as [n, row bytes] uint8 (one memcpy per row), into `out` (C-contiguous) if given."""
        if out is None:
            return np.take(self._void, slots).view(np.uint8).reshape(len(slots), self.row_bytes)
        # mode="clip": slots are valid, and the default mode would buffer the whole result first.
        np.take(self._void, slots, out=out.view(self._void.dtype).reshape(len(slots)), mode="clip")
        return out

    def release(self) -> None:
        del self.keys, self.keys_by_set, self.seqs, self.data, self._void


@dataclass
class RowCacheStats:
    """What the cache did since the daemon started."""

    hits: int = 0
    misses: int = 0
    admitted: int = 0
    evictions: int = 0
    # Admissions skipped because an update of the layer overlapped the miss's read (it may be stale).
    stale_skipped: int = 0
    disk_reads: int = 0  # read calls (runs of blocks) for misses
    disk_bytes: int = 0  # bytes read from disk for misses
    resident_bytes: int = 0  # row bytes held now
    capacity_bytes: int = 0  # memory the cache takes
    direct_io: bool = False  # every layer's misses are read with O_DIRECT


class RowCache:
    """The daemon's side: a writable set-associative cache in a shared-memory file it owns.

    Every method that reads or writes slots takes the cache's lock: in the daemon only the slots'
    seq words protect same-host readers, the lock protects everything else.
    """

    def __init__(self, config: RowCacheConfig, row_bytes: int, directory: Path = SHM_DIR) -> None:
        slots = slots_for(config.bytes, row_bytes, config.ways)
        if slots < config.ways:
            raise InvalidArgumentError(
                f"a row cache of {config.bytes} bytes holds no set of {config.ways} rows of {row_bytes} B; give "
                f"--row-cache-bytes at least {2 * HEADER_BYTES + config.ways * (row_bytes + SLOT_OVERHEAD)} (or 0)"
            )
        self.config = config
        self.row_bytes = row_bytes
        sets = slots // config.ways
        keys_at = HEADER_BYTES
        seqs_at = keys_at + 8 * slots
        data_at = -(-(seqs_at + 8 * slots) // HEADER_BYTES) * HEADER_BYTES
        size = data_at + slots * row_bytes
        self.path = directory / f"memstore-rowcache-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        _remove_orphans(directory)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # Held while the daemon runs (the kernel drops it when the process ends, however it ends): a
            # reader that can take the lock knows the cache is dead, and nothing writes pushes into it.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, size)
            if hasattr(os, "posix_fallocate"):
                # Take the memory now: a budget tmpfs cannot give fails the start, not a later write (SIGBUS).
                os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
            stat = os.fstat(fd)
            self.device, self.inode = stat.st_dev, stat.st_ino
        except BaseException as exc:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise InvalidArgumentError(
                    f"cannot take {size:,} bytes for the row cache in {directory} ({exc.strerror}): give a smaller "
                    f"--row-cache-bytes, or make room there (`df {directory}`; tmpfs takes a size= mount option)"
                ) from None
            raise
        self._fd = fd
        head = np.frombuffer(self._map, dtype="<i8", count=8)
        head[1:8] = [LAYOUT_VERSION, sets, config.ways, row_bytes, keys_at, seqs_at, data_at]
        self._map[:8] = MAGIC
        self._size = size
        self._slots = _Slots(self._map, writable=True)
        self._slots.keys[:] = EMPTY
        self._stamps = np.zeros(slots, dtype=np.int64)  # last batch that used each slot (LRU within a set)
        self._tick = 0
        self._lock = threading.Lock()
        self._writes: dict[int, int] = {}  # per layer: updates so far (the admission race's check)
        self._readers: list[object] = []
        self._recent: dict[int, deque[tuple[int, np.ndarray]]] = {}  # per layer: (write count, ids) of the last updates
        self.stats = RowCacheStats()

    @property
    def slots(self) -> int:
        return self._slots.slots

    @property
    def resident(self) -> int:
        """Slots holding a row now (a slot, once filled, is only ever replaced)."""
        return self.stats.admitted - self.stats.evictions

    def add_reader(self, reader: object) -> None:
        """Note a layer's miss reader (None: the layer's store reads its misses itself, buffered); its
        `direct` says whether they stay out of the page cache."""
        with self._lock:
            self._readers.append(reader)

    def describe(self) -> str:
        """One line for the daemon's log: the budget, the rows it holds, and how misses are read."""
        with self._lock:
            readers = list(self._readers)
        buffered = sorted({getattr(r, "why_buffered", "") or "" for r in readers if not getattr(r, "direct", False)})
        if any(r is None for r in readers):
            buffered.append("lazy or LMDB layers read their misses through their store")
        how = "misses read with O_DIRECT" if not buffered else "misses read buffered (" + "; ".join(buffered) + ")"
        return (
            f"row cache: {self.size_bytes / (1 << 20):,.1f} MiB in {self.path}: {self.slots:,} rows of "
            f"{self.row_bytes} B ({self._slots.sets:,} sets of {self._slots.ways}); {how}"
        )

    def snapshot(self) -> RowCacheStats:
        """The counters now, with the bytes resident and held and whether misses bypass the page cache."""
        with self._lock:
            stats = replace(self.stats)
            readers = list(self._readers)
        stats.resident_bytes = (stats.admitted - stats.evictions) * self.row_bytes
        stats.capacity_bytes = self.size_bytes
        stats.direct_io = bool(readers) and all(getattr(r, "direct", False) for r in readers)
        return stats

    @property
    def size_bytes(self) -> int:
        """Memory the cache holds: its shared file and the private LRU stamps."""
        return self._size + self._stamps.nbytes

    def lookup(self, layer_id: int, ids: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, int]:
        """Copy the resident rows of `ids` (store-local, checked) into `out` ([n, row bytes] uint8 view);
        returns which rows missed, and the layer's write count to hand back to `admit`."""
        keys = make_keys(layer_id, ids)
        with self._lock:
            slots = self._slots.find(keys)
            hit = slots >= 0
            if hit.all():
                self._slots.copy_rows(slots, out)
            elif hit.any():
                out[hit] = self._slots.copy_rows(slots[hit])
            self._tick += 1
            self._stamps[slots[hit]] = self._tick
            nhit = int(hit.sum())
            self.stats.hits += nhit
            self.stats.misses += len(ids) - nhit
            return ~hit, self._writes.get(layer_id, 0)

    def admit(self, layer_id: int, ids: np.ndarray, rows: np.ndarray, writes_before: int) -> None:
        """Admit distinct rows read from the store after `lookup` returned `writes_before`, except those an
        update of the layer wrote in between (the rows read may predate it)."""
        if not len(ids):
            return
        with self._lock:
            writes = self._writes.get(layer_id, 0)
            keys = make_keys(layer_id, ids)
            new = self._slots.find(keys) < 0  # another call may have admitted some meanwhile
            if writes != writes_before:
                # Rows an update wrote since the read may be stale: leave them out. Those updates' ids are
                # kept for the last _RECENT_UPDATES updates; past that, leave the whole batch out.
                recent = self._recent.get(layer_id, ())
                since = [written for count, written in recent if count > writes_before]
                if len(since) < writes - writes_before:
                    stale = np.ones(len(ids), dtype=bool)
                else:
                    stale = np.isin(ids, np.concatenate(since))
                self.stats.stale_skipped += int(stale.sum())
                new &= ~stale
            keys, rows = keys[new], rows[new]
            sets = set_of(keys, self._slots.sets)
            order = np.argsort(sets, kind="stable")
            sets, keys, rows = sets[order], keys[order], rows[order]
            # Rank of each row among this batch's rows of its set: the rank-th least recently used slot.
            first = np.searchsorted(sets, sets, side="left")
            rank = np.arange(len(sets)) - first
            fits = rank < self._slots.ways  # at most `ways` per set (the rest would evict each other)
            sets, keys, rows, rank = sets[fits], keys[fits], rows[fits], rank[fits]
            ways = self._slots.ways
            by_age = np.argsort(np.take(self._stamps.reshape(-1, ways), sets, axis=0), axis=1, kind="stable")
            victims = sets * ways + by_age[np.arange(len(sets)), rank]
            self.stats.evictions += int((self._slots.keys[victims] != EMPTY).sum())
            self.stats.admitted += len(victims)
            self._tick += 1
            self._stamps[victims] = self._tick
            self._write(victims, keys, rows)

    def write_through(self, layer_id: int, ids: np.ndarray, rows: np.ndarray) -> None:
        """After the store wrote these rows (distinct ids): update the resident ones, and count the write
        so that a miss read before it is not admitted."""
        keys = make_keys(layer_id, ids)
        with self._lock:
            count = self._writes.get(layer_id, 0) + 1
            self._writes[layer_id] = count
            self._recent.setdefault(layer_id, deque(maxlen=_RECENT_UPDATES)).append((count, ids.copy()))
            slots = self._slots.find(keys)
            resident = slots >= 0
            if resident.any():
                self._write(slots[resident], keys[resident], rows[resident])

    def _write(self, slots: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> None:
        """Write slots for same-host readers: seq odd, key and row, seq even (caller holds the lock)."""
        s = self._slots
        s.seqs[slots] += 1
        s.keys[slots] = keys
        s.data[slots] = rows
        s.seqs[slots] += 1

    def count_disk(self, reads: int, nbytes: int) -> None:
        with self._lock:
            self.stats.disk_reads += reads
            self.stats.disk_bytes += nbytes

    def close(self) -> None:
        """Unmap and delete the shared file (clients that map it keep their map until they close)."""
        if self._map is None:
            return
        with self._lock:
            self._slots.release()
            self._map.close()
            self._map = None
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # releases the lock: readers still mapping the file see it is dead


class RowCacheReader:
    """A same-host client's read-only map of the daemon's cache: copies the rows resident now."""

    def __init__(self, path: Path, device: int, inode: int, row_bytes: int) -> None:
        """Map the cache file at `path`; TableFormatError unless it is the advertised file (device and
        inode) holding rows of `row_bytes`; OSError when it cannot be opened."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != (device, inode):
                raise TableFormatError(f"{path} is not the daemon's row cache")
            self._map = mmap.mmap(fd, stat.st_size, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # kept to check the daemon still holds its lock (`alive`)
        self._slots = _Slots(self._map, writable=False)
        if self._slots.row_bytes != row_bytes:
            self.close()
            raise TableFormatError(f"{path} caches rows of {self._slots.row_bytes} B, not {row_bytes}")

    def lookup(self, layer_id: int, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the rows of `ids` (store-local) resident and whole into `out` ([n, row bytes] uint8);
        returns which rows it could not (absent, or being written by the daemon)."""
        keys = make_keys(layer_id, ids)
        s = self._slots
        slots = s.find(keys)
        hit = slots >= 0
        slots = slots[hit]
        before = s.seqs[slots]  # a copy: fancy indexing
        rows = s.copy_rows(slots)
        same = (s.keys[slots] == keys[hit]) & (s.seqs[slots] == before) & (before & 1 == 0)
        if not self.alive():  # checked after the copies: they were made while the daemon still wrote pushes in
            return np.ones(len(ids), dtype=bool)
        hit[hit] = same
        out[hit] = rows[same]
        return ~hit

    def alive(self) -> bool:
        """Whether the daemon that owns the cache still runs (holds its lock). A dead daemon's cache no
        longer receives pushes: its rows must not be served (a restarted daemon has a cache of its own)."""
        if self._map is None:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        if self._map is not None:
            self._slots.release()
            self._map.close()
            self._map = None
            os.close(self._fd)
