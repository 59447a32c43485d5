"""The mmap backend: one flat little-endian row-major file per layer, memory-mapped.

Reads are page-cache hits once warm and are shared by every process mapping the file.
The file is never truncated or resized while mapped; tables are created elsewhere and
renamed into place (see memstore.create).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memstore.dtypes import DType
from memstore.errors import TableFormatError
from memstore.storage.base import RowStore, take_rows


class MmapRowStore(RowStore):
    """Rows in a flat file, read with numpy fancy indexing on a memory map."""

    def __init__(self, path: Path, num_rows: int, dim: int, dtype: DType, read_only: bool = True) -> None:
        super().__init__(num_rows, dim, dtype, read_only)
        self.path = Path(path)
        expected = num_rows * dim * dtype.itemsize
        try:
            actual = self.path.stat().st_size
        except FileNotFoundError:
            raise TableFormatError(f"row file {self.path} is missing") from None
        if actual != expected:
            raise TableFormatError(
                f"row file {self.path} holds {actual} bytes; the manifest needs {expected} "
                f"({num_rows} rows x {dim} x {dtype.itemsize} B): the table is damaged or incomplete"
            )
        self._rows: np.memmap | None = np.memmap(
            self.path, dtype=dtype.numpy, mode="r" if read_only else "r+", shape=(num_rows, dim)
        )

    def _gather(self, ids: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        return take_rows(self._rows, ids, out)

    def _update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        self._rows[ids] = rows

    def _flush(self) -> None:
        self._rows.flush()

    def close(self) -> None:
        if self._rows is None:
            return
        super().close()
        self._rows = None  # unmaps once no gathered view is alive (gathers return copies)
