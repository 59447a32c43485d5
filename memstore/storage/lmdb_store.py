"""The LMDB backend: rows packed into fixed-size blocks, one LMDB value per block.

Layout of the environment directory (`subdir=True`: data.mdb and lock.mdb):

- named DB ``rows``: key = block index as 8-byte big-endian (keys sort numerically), value =
  `block_rows` consecutive rows (the last block may be shorter) as raw little-endian bytes of
  the storage dtype, row-major. One key per row reaches only a few percent of the mmap
  backend's gather speed: per-key work in Python dominates.
- named DB ``meta``: key ``layout`` = JSON with the format tag, num_rows, dim, dtype and
  block_rows. It is written in the last transaction of `create`, so an interrupted create
  leaves a directory that does not open.

Reads use LMDB's model: one read transaction per gather (a consistent snapshot: a gather sees
each update entirely or not at all), readers in any thread or process run concurrently with one
writer. An update is one write transaction (all rows of the request or none).

Gathers are vectorised: inside the read transaction each needed block is located once (its
value is a zero-copy view into LMDB's map, valid while the transaction lives), and then all
requested rows are copied with one numpy take over the map, addressed by byte offset. Locating a
block costs ~2 us of Python, 8x the copy of the rows it serves, so the located addresses are kept
per snapshot (transaction id): while no other process writes, a warm gather touches no LMDB
call but the transaction itself. Own updates keep the addresses of the blocks they did not
touch (a value stored on its own overflow pages does not move unless rewritten); a commit by
another process starts the addresses over.

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

from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, TableFormatError
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


def block_key(block: int) -> bytes:
    """The key of block `block` (rows block*block_rows ..) in the rows DB."""
    return _KEY(block)


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
        try:
            self.block_rows = self._validate(env, block_rows)
        except BaseException:
            env.close()
            raise
        self._env = env
        self._rows_db = env.open_db(_ROWS_DB, create=False)
        self._num_blocks = -(-num_rows // self.block_rows)
        self._block_bytes = self.block_rows * self._row_bytes
        # Block values larger than a page live on their own overflow pages: a commit that does not
        # rewrite them leaves them in place. Smaller ones live inside leaf pages, which any write
        # to a neighbouring key copies elsewhere.
        page = env.stat()["psize"]
        self._full_blocks_stay = self._block_bytes > page
        self._last_block_stays = self._block_len(self._num_blocks - 1) * self._row_bytes > page
        # Located block addresses for snapshot `_cache_txn` (0: not located yet).
        self._cache_lock = threading.Lock()
        self._cache_txn = -1
        self._cache = np.zeros(self._num_blocks, dtype=np.int64)
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
            written = 0
            block = 0
            txn = env.begin(write=True)
            try:
                for rows in _blocks(chunks, block_rows, dim, dtype, num_rows):
                    txn.put(_KEY(block), rows, append=True, db=rows_db)
                    written += len(rows) // row_bytes
                    block += 1
                    if block % blocks_per_txn == 0:
                        txn.commit()
                        txn = env.begin(write=True)
                if written != num_rows:
                    raise InvalidArgumentError(f"the chunks held {written} rows; the store needs {num_rows}")
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
        if out is None:
            out = np.empty((len(ids), self.dim), dtype=self.dtype.numpy)
        if not len(ids):
            return out
        blocks = ids // self.block_rows
        with self._read() as txn:
            addresses = self._block_addresses(txn, blocks)  # [len(ids)] value address of each row's block
            addresses += (ids - blocks * self.block_rows) * self._row_bytes
            low = int(addresses.min())
            addresses -= low
            rows = _rows_at(low, int(addresses.max()) + self._row_bytes, self._row_bytes)
            row_type = rows.dtype
            np.take(rows, addresses, out=out.view(row_type).reshape(len(ids)))
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
                    for i, block in enumerate(touched.tolist()):  # read every block before any put moves them
                        value = self._block_value(txn, block)
                        scratch[i * self.block_rows : i * self.block_rows + len(value)] = value
                    scratch[local] = rows
                    for i, block in enumerate(touched.tolist()):
                        count = self._block_len(block)
                        self._put_block(txn, block, scratch[i * self.block_rows : i * self.block_rows + count])
                break
            except lmdb.MapFullError:  # aborted: nothing written; grow the map and do it again
                self._grow()
        with self._cache_lock:
            if self._cache_txn == txn_id - 1:  # our commit is the only change since the cached snapshot
                if self._full_blocks_stay:
                    self._cache[touched] = 0
                    if not self._last_block_stays:
                        self._cache[-1] = 0
                else:
                    self._cache[:] = 0
                self._cache_txn = txn_id

    def _put_block(self, txn: lmdb.Transaction, block: int, rows: np.ndarray) -> None:
        txn.put(_KEY(block), rows, db=self._rows_db)

    def _flush(self) -> None:
        if self._env is not None:
            self._env.sync(True)

    def close(self) -> None:
        if self._env is None:
            return
        super().close()
        self._env.close()
        self._env = None

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
                        count = min(block_rows, self.num_rows - block * block_rows)
                        if cursor.key() != _KEY(block) or len(cursor.value()) != count * self._row_bytes:
                            problem = f"has a wrong key or size at block {block}"
            if problem:
                raise TableFormatError(f"{where} {problem}: the store is damaged or incomplete")
        return block_rows

    def _block_len(self, block: int) -> int:
        return min(self.block_rows, self.num_rows - block * self.block_rows)

    def _block_value(self, txn: lmdb.Transaction, block: int) -> np.ndarray:
        """Block `block` as [rows, dim], a view into the map valid inside `txn` (until its next write)."""
        value = txn.get(_KEY(block), db=self._rows_db)
        count = self._block_len(block)
        if value is None or len(value) != count * self._row_bytes:
            got = "is missing" if value is None else f"holds {len(value)} bytes"
            raise TableFormatError(
                f"block {block} of LMDB row store {self.path} {got}; expected {count * self._row_bytes}: "
                "the store is damaged or incomplete"
            )
        return np.frombuffer(value, dtype=self.dtype.numpy).reshape(count, self.dim)

    def _locate(self, txn: lmdb.Transaction, blocks: np.ndarray) -> np.ndarray:
        """The address of each block's value in the map (valid inside `txn`)."""
        addresses = np.empty(len(blocks), dtype=np.int64)
        get, db, key, full = txn.get, self._rows_db, _KEY, self._block_bytes
        last = self._num_blocks - 1
        for i, block in enumerate(blocks.tolist()):
            value = get(key(block), db=db)
            if value is None or (len(value) != full and block != last):
                self._block_value(txn, block)  # raises, saying what is wrong
            addresses[i] = np.frombuffer(value, dtype=np.uint8).ctypes.data
        if len(blocks) and blocks[-1] == last:
            self._block_value(txn, last)  # the short last block: checks its size
        return addresses

    def _block_addresses(self, txn: lmdb.Transaction, blocks: np.ndarray) -> np.ndarray:
        """The value address of each of `blocks` (repeats allowed) in `txn`'s snapshot, a new array."""
        txn_id = txn.id()
        if self.use_address_cache:
            with self._cache_lock:
                if txn_id > self._cache_txn:  # a newer snapshot: what was located may have moved
                    self._cache[:] = 0
                    self._cache_txn = txn_id
                if txn_id == self._cache_txn:
                    addresses = self._cache[blocks]
                    missing = addresses == 0
                    if missing.any():
                        needed = np.unique(blocks[missing])
                        self._cache[needed] = self._locate(txn, needed)
                        addresses = self._cache[blocks]
                    return addresses
        # An older snapshot than the one cached (a gather that began before a commit), or no cache.
        needed, which = np.unique(blocks, return_inverse=True)
        return self._locate(txn, needed)[which.reshape(-1)]

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        with self._transaction(write=False) as txn:
            yield txn

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
                with self._cache_lock:
                    self._cache[:] = 0
                    self._cache_txn = -1
            finally:
                self._resizing = False
                self._gate.notify_all()


class _MapRows:
    """`__array_interface__` of overlapping rows, one starting at each byte of a read-only span."""

    def __init__(self, address: int, size: int, row_bytes: int) -> None:
        self.__array_interface__ = {
            "version": 3,
            "data": (address, True),
            "shape": (size - row_bytes + 1,),
            "strides": (1,),
            "typestr": f"|V{row_bytes}",
        }


def _rows_at(address: int, size: int, row_bytes: int) -> np.ndarray:
    """[size - row_bytes + 1] opaque rows of `row_bytes`, row i starting at byte address + i: any
    row of the span by its byte offset. Only the rows taken are read."""
    return np.asarray(_MapRows(address, size, row_bytes))


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
    if filled:
        yield pending[:filled].tobytes()


def _meta_bytes(num_rows: int, dim: int, dtype: DType, block_rows: int) -> bytes:
    meta = {"format": FORMAT, "num_rows": num_rows, "dim": dim, "dtype": dtype.value, "block_rows": block_rows}
    return json.dumps(meta, sort_keys=True).encode()


def _default_map_size(num_rows: int, row_bytes: int, block_rows: int) -> int:
    """Address space for the data twice over (an update copies the blocks it touches) plus slack."""
    block_bytes = block_rows * row_bytes
    pages_per_block = -(-(block_bytes + 16) // _PAGE)  # an overflow value: a 16-byte header, whole pages
    data = -(-num_rows // block_rows) * (pages_per_block * _PAGE + 32)
    return max(2 * data + (64 << 20), 1 << 28)
