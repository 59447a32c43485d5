"""What training a table needs beside its rows: the optimizer state stores, the checks on a push's
input, and its updated rows in the storage dtype (memstore.live runs pushes; memstore.optim computes them)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError
from memstore.optim import OptimizerConfig, listed_positions
from memstore.storage import RowStore
from memstore.table import open_store
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.record import encode_client_id


def open_state(table_dir: Path, manifest: Manifest) -> dict[int, dict[str, RowStore]]:
    """The optimizer state stores of every layer (the rows' backend): slot -> float32 rows of the slot's width."""
    return {
        layer: {
            slot: open_store(
                manifest.backend, table_dir / name, manifest.stored_rows(layer), width, DType.FLOAT32, False
            )
            for slot, (name, width) in manifest.state_files(layer).items()
        }
        for layer in manifest.layout.layer_ids
    }


def checked_push(
    manifest: Manifest, ids: np.ndarray, grads: np.ndarray, lr_scale: float, client_id: str
) -> tuple[np.ndarray, OptimizerConfig]:
    """The gradients as an array and the optimizer to apply them with (the table's, lr scaled), or
    InvalidArgumentError for input a push refuses (see `LiveTable.push`)."""
    assert manifest.optimizer is not None
    grads = np.asarray(grads)
    dim = manifest.layout.dim
    if grads.dtype != np.float32 or grads.shape != (len(ids), dim):
        raise InvalidArgumentError(
            f"gradients must be float32 [{len(ids)}, {dim}] (one row per id); got {grads.dtype} {grads.shape}"
        )
    if len(np.unique(ids)) != len(ids):
        raise InvalidArgumentError("row ids of a push must be distinct; sum the gradients of repeated ids first")
    if not (np.isfinite(lr_scale) and lr_scale > 0):
        raise InvalidArgumentError(f"lr_scale must be a positive finite number; got {lr_scale}")
    encode_client_id(client_id)  # refused before anything is computed
    optimizer = manifest.optimizer
    if lr_scale != 1.0:
        lr = optimizer.lr * lr_scale
        try:
            optimizer = replace(optimizer, lr=lr)
        except InvalidArgumentError:  # checked in float32, where the update is computed
            raise InvalidArgumentError(
                f"lr_scale {lr_scale!r} times the table's lr {optimizer.lr!r} gives a learning rate of {lr!r}, "
                "which is not a positive finite float32 (the update is computed in float32): scale it less"
            ) from None
    return grads, optimizer


def storable(dtype: DType, rows: np.ndarray) -> np.ndarray:
    """Updated float32 rows [N, dim] in the storage dtype; InvalidArgumentError when a value is finite in
    float32 but past the range of a 16-bit storage type (it would be stored as Inf)."""
    if dtype not in (DType.FLOAT16, DType.BFLOAT16):
        return dtype.from_float64(rows)  # float32 holds any finite update; quantized rows keep a float32 scale
    with np.errstate(over="ignore"):  # an overflow is reported below, precisely
        stored = dtype.from_float64(rows)
    bad = ~np.isfinite(dtype.to_float32(stored)).all(axis=1)
    if bad.any():
        raise InvalidArgumentError(
            f"the updated rows at positions {listed_positions(bad)} (of {len(rows)} in the push) exceed the range of "
            f"the table's {dtype.value} storage (largest |value| {float(np.abs(rows[bad]).max()):.3g}); the push "
            "is rejected and nothing changed: clip or scale down the gradients (or the lr_scale)"
        )
    return stored
