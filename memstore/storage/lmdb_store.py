"""The LMDB backend: rows packed into fixed-size blocks, one LMDB value per block.

Layout of the environment directory (`subdir=True`: data.mdb and lock.mdb):

- named DB ``rows``: key = block index as 8-byte big-endian (keys sort numerically), value =
  `block_rows` consecutive rows as raw little-endian bytes of the storage dtype, row-major. The
  last block is padded with zero rows to the same size: every value then sits the same way on
  its pages (see below). One key per row reaches only a few percent of the mmap backend's
  gather speed: per-key work in Python dominates.
- named DB ``meta``: key ``layout`` = JSON with the format tag, num_rows, dim, dtype and
  block_rows. It is written in the last transaction of `create`, so an interrupted create
  leaves a directory that does not open.

Reads use LMDB's model: one read transaction per gather (a consistent snapshot: a gather sees
each update entirely or not at all), readers in any thread or process run concurrently with one
writer. An update is one write transaction (all rows of the request or none).

Gathers are vectorised: inside the read transaction each needed block is located once (its
value is a zero-copy view into LMDB's map, valid while the transaction lives), and then all
requested rows are copied with one numpy take over the map, each row addressed by where it
lies. A value larger than a page has overflow pages of its own and starts 16 bytes into its
first page, so when the row size divides the page size every row starts at the same offset
modulo the row size: the map is then a contiguous array of rows (for that offset) and the take
is the mmap backend's. Otherwise (blocks packed inside leaf pages, odd row sizes) rows are
taken by byte address, about 1.7x slower.

Locating a block costs ~2 us of Python, 8x the copy of the rows it serves, so the located
addresses are kept per snapshot (transaction id): while no other process writes, a warm gather
makes no LMDB call but beginning its transaction. Own updates keep the addresses of the blocks
they did not touch (a value on its own overflow pages does not move unless rewritten); a commit
by another process starts the addresses over.

Block size and disk: an overflow value takes whole pages after a 16-byte header, so 64 rows of
128 bytes (8192 bytes) take 3 pages where 63 rows take 2: 2M such rows are 367 MiB on disk with
64 rows per block, 249 MiB with 63 (the mmap file: 244 MiB), at the same gather speed.

Commits fsync the data (sync) but not the meta page (metasync off): a system crash may lose the
last commits, never integrity; `flush` makes everything durable, as for the mmap backend.

One `LmdbRowStore` per environment per process (LMDB forbids opening one twice in a process).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np

from memstore import fatal
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, TableFormatError
from memstore.space import check_free, disk_full_error
from memstore.storage.base import RowStore

FORMAT = "memstore-lmdb-rows-v1"
DEFAULT_BLOCK_ROWS = 64
_ROWS_DB = b"rows"
_META_DB = b"meta"
_META_KEY = b"layout"
_KEY = struct.Struct(">Q").pack  # block index -> key
_MAX_READERS = 1024
_CREATE_TXN_BYTES = 64 << 20  # rows written per transaction by `create`
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_DAMAGED = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.VersionMismatchError)
_NO_PHASE, _MIXED = -2, -1  # block values located so far: none; not all at one offset modulo the row size


class LmdbRowStore(RowStore):
    """Rows in an LMDB environment, `block_rows` consecutive rows per value."""

    def __init__(
        self,
        path: Path,
        num_rows: int,
        dim: int,
        dtype: DType,
        read_only: bool = True,
        block_rows: int | None = None,
        map_size: int | None = None,
    ) -> None:
        """Open an existing store (made by `create`); `block_rows` None takes the stored value,
        an int must match it. `map_size` (bytes of address space) defaults to the data with
        headroom; a write that fills it grows it."""
        super().__init__(num_rows, dim, dtype, read_only)
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise TableFormatError(f"LMDB row store {self.path} is missing (no data.mdb)")
        self._row_bytes = dim * dtype.itemsize
        self._env: lmdb.Environment | None = None
        try:
            env = lmdb.open(
                str(self.path),
                map_size=map_size or _default_map_size(num_rows, self._row_bytes, block_rows or DEFAULT_BLOCK_ROWS),
                subdir=True,
                readonly=read_only,
                create=False,
                lock=True,
                readahead=False,  # random access: read-around would fetch neighbours nobody asked for
                sync=True,
                metasync=False,  # one fsync per commit; a system crash may lose the last commits, never integrity
                max_readers=_MAX_READERS,
                max_dbs=2,
            )
        except _DAMAGED as exc:
            raise TableFormatError(f"LMDB row store {self.path} is damaged: {exc}") from None
        except lmdb.Error as exc:
            if "Permission denied" in str(exc):
                raise TableFormatError(
                    f"LMDB row store {self.path} cannot be opened: permission denied; run as a user who may "
                    "access the table's files, or fix their ownership or mode (chown/chmod)"
                ) from None
            raise
        try:
            _check_size(env, self.path)  # before any page is read through the map: a short file is SIGBUS
            self.block_rows = self._validate(env, block_rows)
        except _DAMAGED as exc:
            env.close()
            raise TableFormatError(f"LMDB row store {self.path} is damaged: {exc}") from None
        except BaseException:
            env.close()
            raise
        self._env = env
        self._mapped = _register_map(self.path)
        self._rows_db = env.open_db(_ROWS_DB, create=False)
        self._num_blocks = -(-num_rows // self.block_rows)
        self._block_bytes = self.block_rows * self._row_bytes
        # Block values larger than a page live on their own overflow pages: a commit that does not
        # rewrite them leaves them in place. Smaller ones live inside leaf pages, which any write
        # to a neighbouring key copies elsewhere.
        self._blocks_stay = self._block_bytes > env.stat()["psize"]
        # Located block addresses for snapshot `_cache_txn` (0: not located yet), and the offset
        # modulo the row size they all share (_NO_PHASE: none located yet; _MIXED: no common one).
        self._cache_lock = threading.Lock()
        self._cache_txn = -1
        self._cache = np.zeros(self._num_blocks, dtype=np.int64)
        self._cache_phase = _NO_PHASE
        self.use_address_cache = True  # False: locate every block on every gather (benchmarks, tests)
        # set_mapsize needs no transaction open in this process: gathers and updates hold the gate.
        self._gate = threading.Condition()
        self._active = 0
        self._resizing = False

    # ------------------------------------------------------------------ creating

    @classmethod
    def create(
        cls,
        path: Path,
        num_rows: int,
        dim: int,
        dtype: DType,
        chunks: Iterable[np.ndarray],
        block_rows: int = DEFAULT_BLOCK_ROWS,
        map_size: int | None = None,
    ) -> Path:
        """Write a new store at `path` from row chunks ([n, dim] of the storage dtype, any n, in
        row order, `num_rows` in all), streaming: at most one transaction's rows (~64 MiB) in
        memory. The metadata goes in the last transaction and everything is fsynced, so the store
        opens only once complete. `path` must not hold an LMDB environment yet."""
        path = Path(path)
        if num_rows < 0 or dim < 1 or block_rows < 1:
            raise InvalidArgumentError(
                f"need num_rows >= 0, dim >= 1 and block_rows >= 1; got {num_rows}, {dim}, {block_rows}"
            )
        if (path / "data.mdb").exists():
            raise InvalidArgumentError(f"{path} already holds an LMDB environment; remove it first")
        path.mkdir(parents=True, exist_ok=True)
        row_bytes = dim * dtype.itemsize
        env = lmdb.open(
            str(path),
            map_size=map_size or _default_map_size(num_rows, row_bytes, block_rows),
            subdir=True,
            lock=True,
            readahead=False,
            sync=False,  # one sync at the end; the store does not open before the metadata lands
            metasync=False,
            max_dbs=2,
        )
        try:
            rows_db = env.open_db(_ROWS_DB)
            meta_db = env.open_db(_META_DB)
            blocks_per_txn = max(1, _CREATE_TXN_BYTES // (block_rows * row_bytes))
            block = 0
            txn = env.begin(write=True)
            try:
                for rows in _blocks(chunks, block_rows, dim, dtype, num_rows):
                    txn.put(_KEY(block), rows, append=True, db=rows_db)
                    block += 1
                    if block % blocks_per_txn == 0:
                        txn.commit()
                        txn = env.begin(write=True)
                txn.put(_META_KEY, _meta_bytes(num_rows, dim, dtype, block_rows), db=meta_db)
                txn.commit()
            except BaseException:
                txn.abort()
                raise
            env.sync(True)
        finally:
            env.close()
        return path

    # ------------------------------------------------------------------ the contract

    def _gather(self, ids: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        n, row_bytes = len(ids), self._row_bytes
        if not n:
            return np.empty((0, self.dim), dtype=self.dtype.numpy) if out is None else out
        blocks = ids // self.block_rows
        with self._transaction(write=False) as txn:
            addresses, phase = self._block_addresses(txn, blocks)  # [n] address of each row's block
            addresses += (ids - blocks * self.block_rows) * row_bytes  # of each row
            if phase >= 0:  # every row at `phase` modulo row_bytes: the map as a contiguous array of rows
                addresses -= phase
                addresses //= row_bytes  # slots: a row's address is slot * row_bytes + phase
                low = int(addresses.min())
                addresses -= low
                span = _rows_at(low * row_bytes + phase, int(addresses.max()) + 1, row_bytes, row_bytes)
                if out is None:
                    rows = np.take(span, addresses)  # [n] opaque rows, copied out of the map
                else:  # not buffered (mode="raise" with `out` is): the slots are in range by construction
                    np.take(span, addresses, out=out.view(span.dtype).reshape(n), mode="clip")
                    return out
            else:  # rows at any byte: indexing a view with a row at each byte (take would copy it whole)
                low = int(addresses.min())
                addresses -= low
                rows = _rows_at(low, int(addresses.max()) + 1, row_bytes, 1)[addresses]
        if out is None:
            return rows.view(self.dtype.numpy).reshape(n, self.dim)
        out.view(rows.dtype).reshape(n)[:] = rows
        return out

    def _update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if not len(ids):
            return
        blocks = ids // self.block_rows
        touched, which = np.unique(blocks, return_inverse=True)
        scratch = np.empty((len(touched) * self.block_rows, self.dim), dtype=self.dtype.numpy)
        local = which.reshape(-1) * self.block_rows + (ids - blocks * self.block_rows)
        while True:
            try:
                with self._transaction(write=True) as txn:
                    txn_id = txn.id()
                    blocks_rows = scratch.reshape(len(touched), self.block_rows, self.dim)
                    for i, block in enumerate(touched.tolist()):  # read every block before any put moves them
                        blocks_rows[i] = self._block_value(txn, block)
                    scratch[local] = rows
                    for i, block in enumerate(touched.tolist()):
                        self._put_block(txn, block, blocks_rows[i])
                break
            except lmdb.MapFullError:  # aborted: nothing written; grow the map and do it again
                self._grow()
            except lmdb.Error as exc:  # aborted: nothing written
                if "No space left" in str(exc) or "quota" in str(exc).lower():
                    raise disk_full_error(self.path, f"writing {len(ids)} rows") from None
                raise
        with self._cache_lock:
            if self._cache_txn == txn_id - 1:  # our commit is the only change since the cached snapshot
                self._cache[touched if self._blocks_stay else slice(None)] = 0
                self._cache_txn = txn_id

    def reserve(self, row_ids: np.ndarray) -> None:
        """DiskFullError unless the disk has room for rewriting the blocks of these rows (LMDB copies
        each block it changes, and may grow its file by as much); writes nothing."""
        if not len(row_ids):
            return
        blocks = len(np.unique(np.asarray(row_ids) // self.block_rows))
        needed = blocks * (self._block_bytes + 2 * _PAGE) + 16 * _PAGE  # values, their headers, tree pages
        check_free(
            self.path, needed, f"writing {len(row_ids)} rows", "free space on it, then retry (nothing was applied)"
        )

    def _put_block(self, txn: lmdb.Transaction, block: int, rows: np.ndarray) -> None:
        txn.put(_KEY(block), rows, db=self._rows_db)

    def _flush(self) -> None:
        if self._env is not None:
            self._env.sync(True)

    def close(self) -> None:
        if self._env is None:
            return
        super().close()
        for address in self._mapped:
            fatal.unregister_mapping(address)
        self._env.close()
        self._env = None

    def copy_to(self, dest: Path) -> None:
        """LMDB's own copy of the environment (one read snapshot: consistent), synced to disk."""
        dest = Path(dest)
        dest.mkdir(parents=True)
        self._env.copy(str(dest), compact=True)  # compact: the copy holds no free pages
        with open(dest / "data.mdb", "rb+") as copied:
            os.fsync(copied.fileno())

    @property
    def bytes_on_disk(self) -> int:
        """Bytes the environment's data file occupies on disk."""
        return (self.path / "data.mdb").stat().st_blocks * 512

    # ------------------------------------------------------------------ internals

    def _validate(self, env: lmdb.Environment, block_rows: int | None) -> int:
        """The stored block_rows, after checking the metadata and the blocks against this store."""
        where = f"LMDB row store {self.path}"
        try:
            meta_db = env.open_db(_META_DB, create=False)
            rows_db = env.open_db(_ROWS_DB, create=False)
        except lmdb.NotFoundError:
            raise TableFormatError(f"{where} has no metadata: the store is damaged or incomplete") from None
        with env.begin() as txn:
            raw = txn.get(_META_KEY, db=meta_db)
            if raw is None:
                raise TableFormatError(f"{where} has no metadata: the store is damaged or incomplete")
            try:
                meta = json.loads(raw)
                stored = (int(meta["num_rows"]), int(meta["dim"]), DType(meta["dtype"]), int(meta["block_rows"]))
                if meta["format"] != FORMAT or stored[3] < 1:
                    raise ValueError(meta["format"])
            except (ValueError, KeyError, TypeError):
                raise TableFormatError(f"{where} has unreadable metadata: the store is damaged") from None
            expected = (self.num_rows, self.dim, self.dtype)
            if stored[:3] != expected:
                raise TableFormatError(
                    f"{where} holds {stored[0]} rows x {stored[1]} of {stored[2].value}; "
                    f"expected {expected[0]} rows x {expected[1]} of {expected[2].value}"
                )
            if block_rows is not None and block_rows != stored[3]:
                raise TableFormatError(f"{where} has {stored[3]} rows per block; expected {block_rows}")
            block_rows = stored[3]
            num_blocks = -(-self.num_rows // block_rows)
            entries = txn.stat(rows_db)["entries"]
            problem = None
            if entries != num_blocks:
                problem = f"holds {entries} blocks; {self.num_rows} rows of {block_rows} per block need {num_blocks}"
            elif num_blocks:
                with txn.cursor(rows_db) as cursor:
                    for block, position in ((0, cursor.first), (num_blocks - 1, cursor.last)):
                        position()
                        if cursor.key() != _KEY(block) or len(cursor.value()) != block_rows * self._row_bytes:
                            problem = f"has a wrong key or size at block {block}"
            if problem:
                raise TableFormatError(f"{where} {problem}: the store is damaged or incomplete")
        return block_rows

    def _block_value(self, txn: lmdb.Transaction, block: int) -> np.ndarray:
        """Block `block` as [block_rows, dim], a view into the map valid inside `txn` (until its next write)."""
        value = txn.get(_KEY(block), db=self._rows_db)
        if value is None or len(value) != self._block_bytes:
            got = "is missing" if value is None else f"holds {len(value)} bytes"
            raise TableFormatError(
                f"block {block} of LMDB row store {self.path} {got}; expected {self._block_bytes}: "
                "the store is damaged or incomplete"
            )
        return np.frombuffer(value, dtype=self.dtype.numpy).reshape(self.block_rows, self.dim)

    def _locate(self, txn: lmdb.Transaction, blocks: np.ndarray) -> np.ndarray:
        """The address of each block's value in the map (valid inside `txn`)."""
        addresses = np.empty(len(blocks), dtype=np.int64)
        get, db, key, size = txn.get, self._rows_db, _KEY, self._block_bytes
        for i, block in enumerate(blocks.tolist()):
            value = get(key(block), db=db)
            if value is None or len(value) != size:
                self._block_value(txn, block)  # raises, saying what is wrong
            addresses[i] = np.frombuffer(value, dtype=np.uint8).ctypes.data
        return addresses

    def _phase(self, addresses: np.ndarray, phase: int = _NO_PHASE) -> int:
        """The offset modulo the row size that `addresses` share with `phase`, or _MIXED."""
        if phase == _MIXED or not len(addresses):
            return phase
        phases = addresses % self._row_bytes
        first = int(phases[0]) if phase == _NO_PHASE else phase
        return first if (phases == first).all() else _MIXED

    def _block_addresses(self, txn: lmdb.Transaction, blocks: np.ndarray) -> tuple[np.ndarray, int]:
        """The value address of each of `blocks` (repeats allowed) in `txn`'s snapshot (a new array),
        and the offset modulo the row size they all share (or _MIXED)."""
        txn_id = txn.id()
        if self.use_address_cache:
            with self._cache_lock:
                if txn_id > self._cache_txn:  # a newer snapshot: what was located may have moved
                    self._cache[:] = 0
                    self._cache_txn = txn_id
                    self._cache_phase = _NO_PHASE
                if txn_id == self._cache_txn:
                    addresses = self._cache[blocks]
                    missing = addresses == 0
                    if missing.any():
                        needed = np.unique(blocks[missing])
                        located = self._locate(txn, needed)
                        self._cache[needed] = located
                        self._cache_phase = self._phase(located, self._cache_phase)
                        addresses = self._cache[blocks]
                    return addresses, self._cache_phase
        # An older snapshot than the one cached (a gather that began before a commit), or no cache.
        needed, which = np.unique(blocks, return_inverse=True)
        located = self._locate(txn, needed)
        return located[which.reshape(-1)], self._phase(located)

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[lmdb.Transaction]:
        """A transaction (committed on success, aborted on error) while no map resize runs."""
        if self._env is None:
            raise InvalidArgumentError(f"LMDB row store {self.path} is closed")
        self._acquire()
        try:
            while True:
                try:
                    txn = self._env.begin(write=write, buffers=True)
                    break
                except lmdb.MapResizedError:  # another process grew the map past ours: adopt its size
                    self._release()
                    self._resize(0)
                    self._acquire()
            with txn:
                yield txn
        finally:
            self._release()

    def _acquire(self) -> None:
        with self._gate:
            while self._resizing:
                self._gate.wait()
            self._active += 1

    def _release(self) -> None:
        with self._gate:
            self._active -= 1
            self._gate.notify_all()

    def _grow(self) -> None:
        self._resize(max(self._env.info()["map_size"] * 2, 1 << 26))

    def _resize(self, map_size: int) -> None:
        """set_mapsize with no transaction open in this process; addresses located so far move."""
        with self._gate:
            while self._resizing:
                self._gate.wait()
            self._resizing = True
            try:
                while self._active:
                    self._gate.wait()
                self._env.set_mapsize(map_size)
                for address in self._mapped:
                    fatal.unregister_mapping(address)
                self._mapped = _register_map(self.path)
                with self._cache_lock:
                    self._cache[:] = 0
                    self._cache_txn = -1
                    self._cache_phase = _NO_PHASE
            finally:
                self._resizing = False
                self._gate.notify_all()


class _MapRows:
    """`__array_interface__` of read-only memory as opaque rows."""

    def __init__(self, address: int, count: int, row_bytes: int, stride: int) -> None:
        self.__array_interface__ = {
            "version": 3,
            "data": (address, True),
            "shape": (count,),
            "strides": (stride,),
            "typestr": f"|V{row_bytes}",
        }


def _rows_at(address: int, count: int, row_bytes: int, stride: int) -> np.ndarray:
    """[count] opaque rows of `row_bytes`, row i at address + i * stride: with stride row_bytes a
    contiguous array of rows, with stride 1 (rows overlapping) a row at each byte. Numpy reads
    only the rows indexed: only they need to be readable."""
    return np.asarray(_MapRows(address, count, row_bytes, stride))


def _blocks(chunks: Iterable[np.ndarray], block_rows: int, dim: int, dtype: DType, num_rows: int) -> Iterator[bytes]:
    """Raw bytes of each block, regrouped from chunks of any size."""
    pending = np.empty((block_rows, dim), dtype=dtype.numpy)
    filled = 0
    total = 0
    for chunk in chunks:
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != dim or chunk.dtype != dtype.numpy:
            raise InvalidArgumentError(
                f"chunks must be [n, {dim}] of {dtype.value} (raw {dtype.numpy}); got {chunk.shape} of {chunk.dtype}"
            )
        total += len(chunk)
        if total > num_rows:
            raise InvalidArgumentError(f"the chunks hold more than the store's {num_rows} rows")
        start = 0
        if filled:  # complete the pending block first
            take = min(block_rows - filled, len(chunk))
            pending[filled : filled + take] = chunk[:take]
            filled += take
            start = take
            if filled == block_rows:
                yield pending.tobytes()
                filled = 0
        whole = (len(chunk) - start) // block_rows
        for b in range(whole):
            yield np.ascontiguousarray(chunk[start + b * block_rows : start + (b + 1) * block_rows]).tobytes()
        start += whole * block_rows
        rest = len(chunk) - start
        if rest:
            pending[:rest] = chunk[start:]
            filled = rest
    if total != num_rows:
        raise InvalidArgumentError(f"the chunks held {total} rows; the store needs {num_rows}")
    if filled:  # the last block, padded with zero rows
        pending[filled:] = 0
        yield pending.tobytes()


def _check_size(env: lmdb.Environment, path: Path) -> None:
    """TableFormatError when data.mdb is shorter than its last page says (truncated): reading the
    missing pages through the map would kill the process with SIGBUS."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = (path / "data.mdb").stat().st_size
    if actual < needed:
        raise TableFormatError(
            f"LMDB row store {path}: data.mdb holds {actual} bytes but its last page needs {needed}: "
            "the file was truncated; restore the table from a snapshot or backup"
        )


def _register_map(path: Path) -> list[int]:
    """Register this process's mappings of `path`/data.mdb for the SIGBUS report; their addresses."""
    data = os.path.realpath(path / "data.mdb")
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == data:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    fatal.register_mapping(start, end - start, data)
                    found.append(start)
    except OSError:  # no /proc: the fault is still reported, without the file's name
        pass
    return found


def _meta_bytes(num_rows: int, dim: int, dtype: DType, block_rows: int) -> bytes:
    meta = {"format": FORMAT, "num_rows": num_rows, "dim": dim, "dtype": dtype.value, "block_rows": block_rows}
    return json.dumps(meta, sort_keys=True).encode()


def _default_map_size(num_rows: int, row_bytes: int, block_rows: int) -> int:
    """Address space for the data twice over (an update copies the blocks it touches) plus slack."""
    block_bytes = block_rows * row_bytes
    pages_per_block = -(-(block_bytes + 16) // _PAGE)  # an overflow value: a 16-byte header, whole pages
    data = -(-num_rows // block_rows) * (pages_per_block * _PAGE + 32)
    return max(2 * data + (64 << 20), 1 << 28)
