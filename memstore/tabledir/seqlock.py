"""`seqlock`: the sequence word that lets readers, in the daemon or in a same-host client, see rows whole.

The writer makes the word odd before it writes rows and even again after; a reader reads it, gathers,
and reads it again. The protocol relies on the CPU keeping stores in order and loads in order
(x86-64's TSO does); same-host reads of a trained table are refused elsewhere (memstore.same_host).
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from memstore import fatal
from memstore.errors import TableFormatError
from memstore.tabledir.fsafe import write_durably

_READ_TRIES = 8


class RowSource(Protocol):
    """What consistent_gather reads: a RowStore, or a same-host reader's layer (memstore.same_host)."""

    def gather(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...


class SeqLock:
    """A sequence word in a shared file: even when the rows are stable, odd while a push writes them.

    version = word // 2. Readers: read the word, gather, read it again; equal and even means no
    push overlapped the gather.
    """

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = path
        if create and (not path.exists() or path.stat().st_size < 8):
            # Also replaces a short file (a host crash can leave a new file empty), which could not be
            # mapped: its word only matters to the writer opening it now, which sets it next.
            write_durably(path, bytes(8))
        mode = "r+b" if create else "rb"
        with open(path, mode) as f:
            if os.fstat(f.fileno()).st_size < 8:  # mapping a shorter file would die of SIGBUS on the first read
                raise TableFormatError(f"sequence lock {path} is shorter than 8 bytes: the table directory is damaged")
            self._map = mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_WRITE if create else mmap.ACCESS_READ)
        self._word = np.frombuffer(self._map, dtype="<i8", count=1)
        fatal.register_mapping(self._word.ctypes.data, 8, path)

    def read(self) -> int:
        return int(self._word[0])

    def set(self, value: int) -> None:
        self._word[0] = value

    def close(self) -> None:
        fatal.unregister_mapping(self._word.ctypes.data)
        del self._word
        self._map.close()


def consistent_gather(
    store: RowSource, seqlock: SeqLock | None, ids: np.ndarray, out: np.ndarray | None, frozen_version: int
) -> tuple[np.ndarray, int] | None:
    """Rows read with no push overlapping them and the version they show, or None after a few tries.

    `ids` are checked already. Without a sequence lock nothing writes the table: its rows show
    `frozen_version`.
    """
    if seqlock is None:
        return store.gather(ids, out), frozen_version
    for attempt in range(_READ_TRIES):
        before = seqlock.read()
        if before % 2 == 0:
            rows = store.gather(ids, out)
            if seqlock.read() == before:
                return rows, before // 2
        time.sleep(0 if attempt < 2 else 0.0005)
    return None
