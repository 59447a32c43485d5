"""Deterministic initial rows: any row regenerates alone from (seed, layer id, row id).

Value (layer, row, col) is a pure function of the seed and its counter `row * dim + col`:
a SplitMix64 hash of the counter gives 52 uniform bits, and Acklam's inverse normal CDF
turns them into a standard normal (relative error below 1.2e-9), scaled by `std` as
`nn.Embedding`'s default N(0, 1) init. So rows do not depend on chunking, order or
machine, and a later lazy backend serves never-written rows from exactly this function.

Only IEEE-754 basic operations (+ - * / sqrt, correctly rounded everywhere) and exact
bit manipulation are used; the logarithm for the 5% tail is computed here too, since
libm and numpy's SIMD transcendental functions may differ in the last bit across CPUs.

`memstore/_rowgen.c` is the same generator compiled (same operations, same order, no fused
multiply-adds: same bits, ~10x faster; lazy tables generate rows on every read of a row never
written). It is built by `pip install` when a C compiler is present; without it this module's
numpy code runs, and tests check the two agree bit for bit.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from memstore.dtypes import DType

try:
    from memstore import _rowgen as _compiled
except ImportError:  # built without a C compiler: the numpy code below runs instead
    _compiled = None

# Recorded in every manifest: never-written rows are regenerated from it (lazy tables), so any
# change to the values this module produces must come with a new name.
GENERATOR = "splitmix64-acklam-v1"

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1

# Acklam's rational approximation of the inverse standard normal CDF.
_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
_P_LOW = 0.02425


def _fmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array (wrap-around multiply is intended)."""
    x ^= x >> _U64(30)
    x *= _MIX1
    x ^= x >> _U64(27)
    x *= _MIX2
    x ^= x >> _U64(31)
    return x


def _stream_key(seed: int, layer_id: int) -> np.uint64:
    key = np.array([(int(seed) * 0x9E3779B97F4A7C15 + int(layer_id) + 1) & _MASK64], dtype=_U64)
    return _fmix64(_fmix64(key))[0]


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log from frexp and an atanh series: bit-identical on every IEEE-754 machine."""
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    low = mantissa < np.sqrt(0.5)
    mantissa = np.where(low, mantissa * 2.0, mantissa)  # now in [sqrt(1/2), sqrt(2))
    exponent = exponent - low
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = np.zeros_like(s)
    for k in range(12, -1, -1):  # |s| <= 0.1716: 13 terms are exact to double precision
        series = series * s2 + 1.0 / (2 * k + 1)
    return 2.0 * s * series + exponent * 0.6931471805599453


def _horner(coeffs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    acc = np.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        acc *= x
        acc += c
    return acc


def _inverse_normal_cdf(p: np.ndarray) -> np.ndarray:
    """Acklam's approximation for p in (0, 1), in place on a flat float64 array."""
    p -= 0.5  # p is q = p - 0.5 from here on
    tail = np.flatnonzero(np.abs(p) > 0.5 - _P_LOW)
    q_tail = p[tail]
    r = p * p
    numerator = _horner(_A, r)
    numerator *= p
    r *= _horner(_B, r)
    r += 1.0
    numerator /= r
    # Tails (5% of values): lower tail from p, upper from 1 - p (both exact here), sign flipped.
    pt = np.where(q_tail < 0, q_tail + 0.5, 0.5 - q_tail)
    t = np.sqrt(-2.0 * _log(pt))
    z = _horner(_C, t) / (_horner(_D, t) * t + 1.0)
    numerator[tail] = np.where(q_tail < 0, z, -z)
    return numerator


def normal_rows(seed: int, layer_id: int, row_start: int, num_rows: int, dim: int) -> np.ndarray:
    """Standard-normal float64 rows [num_rows, dim] for rows row_start.. of one layer."""
    return normal_rows_at(seed, layer_id, np.arange(row_start, row_start + num_rows, dtype=np.int64), dim)


def normal_rows_at(seed: int, layer_id: int, row_ids: np.ndarray, dim: int) -> np.ndarray:
    """Standard-normal float64 rows [len(row_ids), dim] for arbitrary row ids of one layer."""
    if _compiled is None:
        return _normal_rows_at_numpy(seed, layer_id, row_ids, dim)
    ids = np.ascontiguousarray(row_ids, dtype=np.int64)
    out = np.empty((len(ids), dim), dtype=np.float64)
    key = int(_stream_key(seed, layer_id))
    parts = min(_THREADS, max(1, len(ids) * dim // _VALUES_PER_THREAD))
    if parts == 1:
        _compiled.normal_rows_at(key, ids, dim, out)
    else:  # the compiled loop releases the GIL: split big requests over the cores
        bounds = np.linspace(0, len(ids), parts + 1).astype(int)
        list(
            _pool().map(
                lambda b: _compiled.normal_rows_at(key, ids[b[0] : b[1]], dim, out[b[0] : b[1]]),
                zip(bounds[:-1], bounds[1:]),
            )
        )
    return out


_THREADS = min(8, os.cpu_count() or 1)
_VALUES_PER_THREAD = 1 << 18
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="rowgen")
    return _POOL


def _normal_rows_at_numpy(seed: int, layer_id: int, row_ids: np.ndarray, dim: int) -> np.ndarray:
    counters = row_ids.astype(_U64)[:, None] * _U64(dim) + np.arange(1, dim + 1, dtype=_U64)  # [N, dim]
    bits = counters * _GOLDEN
    bits += _stream_key(seed, layer_id)
    _fmix64(bits)
    bits >>= _U64(12)  # 52 bits, so k + 0.5 is exact in float64
    uniform = bits.astype(np.float64).reshape(-1)
    uniform += 0.5
    uniform *= 2.0**-52  # (k + 0.5) / 2**52: strictly inside (0, 1)
    return _inverse_normal_cdf(uniform).reshape(counters.shape)


def initial_rows(
    seed: int, layer_id: int, row_start: int, num_rows: int, dim: int, std: float, dtype: DType
) -> np.ndarray:
    """The stored form of rows row_start..row_start+num_rows of a freshly created layer."""
    return initial_rows_at(seed, layer_id, np.arange(row_start, row_start + num_rows, dtype=np.int64), dim, std, dtype)


def initial_rows_at(seed: int, layer_id: int, row_ids: np.ndarray, dim: int, std: float, dtype: DType) -> np.ndarray:
    """The stored form of arbitrary rows of a freshly created layer (what a lazy table serves
    for rows never written)."""
    values = normal_rows_at(seed, layer_id, row_ids, dim)
    if std != 1.0:
        values *= std
    return dtype.from_float64(values)
