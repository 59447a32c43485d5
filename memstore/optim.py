"""Server-side sparse optimizers: how a pushed gradient changes the rows it touches.

A push carries, for one layer, the gradient of N distinct rows (already summed per id). The
daemon gathers those rows and their optimizer state, calls `apply_update`, and scatters the
results back. Rows that were not pushed, and their state, are never read or written: every
optimizer here is *lazy*, the sparse-gradient behaviour of the PyTorch optimizer it mirrors.

Optimizers and the state each keeps per row (`OptimizerConfig.state_slots`; the configuration, as the
manifest records it, is memstore.tabledir.optimizer):

- ``sgd``: ``torch.optim.SGD`` without momentum or weight decay, ``w -= lr * g``. No state.
- ``adagrad``: ``torch.optim.Adagrad`` with ``lr_decay=0, weight_decay=0``:
  ``sum += g*g; w -= lr * g / (sqrt(sum) + eps)``. State ``sum``: ``dim`` values per row,
  starting at ``initial_accumulator_value``.
- ``rowwise_adagrad``: FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` without weight decay: one
  accumulator per row, ``sum += mean(g*g); w -= lr / (sqrt(sum) + eps) * g``. State ``sum``:
  1 value per row. A dim-fold smaller state than ``adagrad``, the usual choice for big tables.
- ``adam``: ``torch.optim.SparseAdam`` (lazy Adam): only the pushed rows' moments decay and
  update, but the bias correction uses the layer's global step count, so a row first pushed at
  step 1000 gets a much smaller first update than dense Adam would give it. State ``exp_avg``
  and ``exp_avg_sq``: ``dim`` values per row each, starting at 0.

There is one ``eps`` field for all kinds, defaulting to 1e-8 (``SparseAdam``'s default);
``torch.optim.Adagrad`` defaults to 1e-10, so set ``eps=1e-10`` to reproduce an Adagrad run
with torch's defaults.

Exactness: ``sgd``, ``adagrad`` and ``adam`` perform the same float32 operations, in the same
order, as the PyTorch optimizer's sparse branch stepped on a coalesced sparse gradient with the
same values, each operation correctly rounded, so rows and state are bit-identical to torch's
whenever torch's own elementwise operations are correctly rounded. Two platform details of
torch on CPU matter:

- torch adds a sparse gradient into a dense tensor with BLAS ``axpy`` (``y += a*x``), which
  rounds once (a fused multiply-add) on every CPU with FMA, so ``w - lr*g`` is computed here as a
  correctly rounded FMA too (`_fma32`), not as a multiply then a subtract.
- torch's CPU ``sqrt`` goes through MKL VML in "high accuracy" mode, which is *not* correctly
  rounded (here about 1 result in 6 is 1 ulp off). This module uses numpy's IEEE square root,
  so against stock CPU torch the Adagrad and Adam state is still bit-identical but
  the rows may differ by about one float32 rounding per step.

``rowwise_adagrad`` follows FBGEMM's operation order (per-row multiplier, then a fused
multiply-add) and is exact up to float32 rounding, not bit-identical to any particular kernel.

One deliberate difference: torch's SGD applies an *uncoalesced* sparse gradient (what
``nn.Embedding(sparse=True)`` produces when a batch repeats an id) one duplicate at a time,
rounding after each; here the gradients of a row are summed first, as Adagrad and SparseAdam
do themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from memstore.errors import InvalidArgumentError
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind, check_count

_MAX_LISTED = 8  # how many offending row positions an error message names


def apply_update(
    config: OptimizerConfig,
    rows: np.ndarray,
    state: dict[str, np.ndarray],
    grads: np.ndarray,
    step: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One optimizer step on N distinct rows; returns (new rows, new state), inputs untouched.

    ``rows`` and ``grads`` are float32 ``[N, dim]`` (the gradient of each row summed over its
    occurrences; the caller guarantees the rows are distinct), ``state`` maps each slot of
    ``config.state_slots(dim)`` to float32 ``[N, width]``. ``step`` is the 1-based number of
    steps applied to this layer including this one (Adam's bias correction uses it). Non-finite
    gradients reject the whole push before anything is computed, and so does an update that
    overflows float32 (an Inf or NaN in the new rows or state): InvalidArgumentError either way.
    """
    if not isinstance(config, OptimizerConfig):
        raise InvalidArgumentError(f"config must be an OptimizerConfig, got {type(config).__name__}")
    check_count("step", step, minimum=1)
    _check_matrix("rows", rows)
    _check_matrix("grads", grads)
    if grads.shape != rows.shape:
        raise InvalidArgumentError(
            f"grads have shape {grads.shape} but rows have shape {rows.shape}; send one gradient per row, "
            "each of the row's dim"
        )
    num_rows, dim = rows.shape
    if dim == 0:
        raise InvalidArgumentError("rows have dim 0; a row must hold at least one value")
    _check_state(config, state, num_rows, dim)
    bad = ~np.isfinite(grads).all(axis=1)
    if bad.any():
        raise InvalidArgumentError(
            f"gradients of rows at positions {listed_positions(bad)} (of {num_rows} in the push) are not finite "
            "(NaN or Inf); the push is rejected and nothing changed"
        )
    # Finite gradients can still overflow float32 (g*g past 3.4e38 in an Adagrad sum or Adam's second
    # moment, lr*g in SGD): computed quietly, then checked below, so an Inf never reaches the table.
    with np.errstate(over="ignore", invalid="ignore"):
        new_rows, new_state = _UPDATES[config.kind](config, rows, state, grads, int(step))
    _check_finite_update(config, grads, new_rows, new_state)
    return new_rows, new_state


def listed_positions(bad: np.ndarray) -> str:
    """'[0, 3, 9] and 12 more': the positions where a boolean mask [N] is set, for error messages."""
    positions = np.flatnonzero(bad)
    listed = ", ".join(str(int(p)) for p in positions[:_MAX_LISTED])
    more = f" and {positions.size - _MAX_LISTED} more" if positions.size > _MAX_LISTED else ""
    return f"[{listed}]{more}"


def _check_finite_update(
    config: OptimizerConfig, grads: np.ndarray, new_rows: np.ndarray, new_state: dict[str, np.ndarray]
) -> None:
    """InvalidArgumentError when the update overflowed float32 anywhere (rows or state), naming where."""
    arrays = [("rows", new_rows), *sorted(new_state.items())]
    if all(np.isfinite(values).all() for _, values in arrays):
        return
    overflowed = {name: ~np.isfinite(values).all(axis=1) for name, values in arrays}
    bad = np.logical_or.reduce(list(overflowed.values()))
    where = ", ".join(name if name == "rows" else f"state {name!r}" for name, mask in overflowed.items() if mask.any())
    largest = float(np.abs(grads[bad]).max())
    raise InvalidArgumentError(
        f"the {config.kind.value} update of rows at positions {listed_positions(bad)} (of {len(grads)} in the push) "
        f"overflows float32 in its {where} (largest |gradient| there {largest:.3g}, lr {config.lr:.3g}); "
        "the push is rejected and nothing changed: clip or scale down the gradients (or the lr_scale)"
    )


def _check_matrix(name: str, array: Any) -> None:
    if not isinstance(array, np.ndarray):
        raise InvalidArgumentError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise InvalidArgumentError(f"{name} must be float32, got {array.dtype}; convert with .astype(np.float32)")
    if array.ndim != 2:
        raise InvalidArgumentError(f"{name} must be 2-D [N, dim], got shape {array.shape}")


def _check_state(config: OptimizerConfig, state: Any, num_rows: int, dim: int) -> None:
    slots = config.state_slots(dim)
    if not isinstance(state, Mapping) or set(state) != set(slots):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise InvalidArgumentError(
            f"{config.kind.value} needs state slots {list(slots)}, got {got}; build it with "
            "OptimizerConfig.initial_state"
        )
    for name, width in slots.items():
        _check_matrix(f"state[{name!r}]", state[name])
        if state[name].shape != (num_rows, width):
            raise InvalidArgumentError(
                f"state[{name!r}] has shape {state[name].shape}, expected {(num_rows, width)} for {num_rows} rows"
            )


def _fma32(a: np.ndarray | np.float32, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 ``a*x + y`` (one rounding, as a hardware FMA).

    The float64 product of two float32 values is exact (48 of 53 bits), so only the float64 sum
    rounds before the final rounding to float32. That double rounding can differ from a single
    one only where the float64 sum lies exactly halfway between two float32 values (its 29
    dropped bits are 100...0) or in float32's subnormal range; there, and only there, the sum is
    rounded to odd first (TwoSum gives its exact error), which makes the double rounding equal to
    a single one (Boldo & Melquiond, 2008). Everywhere else the plain float64 sum is already right.
    """
    prod = np.multiply(a, x, dtype=np.float64)
    addend = y.astype(np.float64)
    total = prod + addend
    with np.errstate(invalid="ignore", over="ignore"):
        dropped = total.view(np.int64) & 0x1FFFFFFF
        suspect = (dropped == 0x10000000) | (np.abs(total) < 2.0**-126)
        if suspect.any():
            p, q, t = np.broadcast_to(prod, total.shape)[suspect], addend[suspect], total[suspect]
            # TwoSum: the exact rounding error of `t`. Non-finite inputs make it NaN: masked out below,
            # they pass through as the plain sum would.
            back = t - p
            err = (p - (t - back)) + (q - back)
            inexact_even = (err != 0) & ((t.view(np.int64) & 1) == 0) & np.isfinite(t)
            t[inexact_even] = np.nextafter(t[inexact_even], np.copysign(np.inf, err[inexact_even]))
            total[suspect] = t
        return total.astype(np.float32)


def _sgd(config: OptimizerConfig, rows, state, grads, step):
    # torch: param.add_(grad, alpha=-lr), i.e. axpy with a = float32(-lr).
    return _fma32(np.float32(-config.lr), grads, rows), {}


def _adagrad(config: OptimizerConfig, rows, state, grads, step):
    # torch _single_tensor_adagrad, sparse branch, lr_decay=0 so clr == lr.
    new_sum = state["sum"] + grads * grads
    std = np.sqrt(new_sum)
    std += np.float32(config.eps)
    return _fma32(np.float32(-config.lr), grads / std, rows), {"sum": new_sum}


def _rowwise_adagrad(config: OptimizerConfig, rows, state, grads, step):
    # The mean is taken in float64 and rounded once so the result does not depend on numpy's
    # summation order; the rest is FBGEMM's order: a per-row multiplier, then w += -multiplier*g.
    mean_sq = np.mean(np.square(grads, dtype=np.float64), axis=1, keepdims=True).astype(np.float32)
    new_sum = state["sum"] + mean_sq
    multiplier = np.float32(config.lr) / (np.sqrt(new_sum) + np.float32(config.eps))
    return _fma32(-multiplier, grads, rows), {"sum": new_sum}


def _adam(config: OptimizerConfig, rows, state, grads, step):
    # torch.optim._functional.sparse_adam, op for op (old += (1 - b) * (new - old)).
    beta1, beta2 = config.betas
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    avg_update = (grads - exp_avg) * np.float32(1 - beta1)
    sq_update = (grads * grads - exp_avg_sq) * np.float32(1 - beta2)
    # torch's `numer = update + old` is the same float32 sum as the new exp_avg, bit for bit.
    new_avg = exp_avg + avg_update
    new_avg_sq = exp_avg_sq + sq_update
    denom = np.sqrt(new_avg_sq)
    denom += np.float32(config.eps)
    # Python floats, exactly as torch computes them, then one rounding to float32 in the multiply.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = config.lr * math.sqrt(bias_correction2) / bias_correction1
    new_rows = rows + np.float32(-step_size) * (new_avg / denom)
    return new_rows, {"exp_avg": new_avg, "exp_avg_sq": new_avg_sq}


_UPDATES = {
    OptimizerKind.SGD: _sgd,
    OptimizerKind.ADAGRAD: _adagrad,
    OptimizerKind.ROWWISE_ADAGRAD: _rowwise_adagrad,
    OptimizerKind.ADAM: _adam,
}
