"""Raw little-endian payloads of the wire (row ids as int64 bytes, rows as storage bytes) and request limits."""

from __future__ import annotations

import numpy as np

from memstore.errors import InvalidArgumentError, ResourceExhaustedError

ROW_ID_DTYPE = np.dtype("<i8")


def encode_row_ids(row_ids: np.ndarray) -> bytes:
    """1-D integer ids as little-endian int64 bytes."""
    return np.ascontiguousarray(row_ids, dtype=ROW_ID_DTYPE).tobytes()


def decode_row_ids(data: bytes) -> np.ndarray:
    """The ids of a request, zero-copy (read-only view of `data`)."""
    if len(data) % ROW_ID_DTYPE.itemsize:
        raise InvalidArgumentError(
            f"row_ids holds {len(data)} bytes, not a multiple of 8: send little-endian int64 ids"
        )
    return np.frombuffer(data, dtype=ROW_ID_DTYPE)


GRAD_DTYPE = np.dtype("<f4")


def encode_grads(grads: np.ndarray) -> bytes:
    """[N, dim] gradients as little-endian float32 bytes."""
    return np.ascontiguousarray(grads, dtype=GRAD_DTYPE).tobytes()


def decode_grads(data: bytes, num_rows: int, dim: int) -> np.ndarray:
    """The gradients of a push as float32 [num_rows, dim] (a read-only view of `data`)."""
    expected = num_rows * dim * GRAD_DTYPE.itemsize
    if len(data) != expected:
        raise InvalidArgumentError(
            f"grads holds {len(data)} bytes; {num_rows} rows x {dim} float32 values need {expected}"
        )
    return np.frombuffer(data, dtype=GRAD_DTYPE).reshape(num_rows, dim)


def check_request_rows(num_rows: int, max_rows: int) -> None:
    """RESOURCE_EXHAUSTED for a request above the configured row limit."""
    if num_rows > max_rows:
        raise ResourceExhaustedError(
            f"request has {num_rows} rows; this server takes at most {max_rows} per request: split it "
            "(or raise --max-rows-per-request)"
        )
