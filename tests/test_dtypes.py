"""Storage types: quantized rows (fp8 e4m3 / int8 codes + a float32 scale per row) encode and decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore.dtypes import DType

QUANTIZED = [dtype for dtype in DType if dtype.quantized]


@pytest.mark.parametrize("dtype", QUANTIZED, ids=lambda d: d.value)
def test_quantized_rows_are_codes_then_a_float32_scale(dtype: DType) -> None:
    values = np.random.default_rng(0).standard_normal((50, 32)) * np.logspace(-3, 2, 50)[:, None]  # rows of any scale
    raw = dtype.from_float64(values)
    assert raw.shape == (50, dtype.stored_width(32)) == (50, 36) and raw.dtype == np.uint8
    scale = raw[:, -4:].copy().view(np.float32)[:, 0]
    np.testing.assert_allclose(
        scale, np.abs(values).max(axis=1) / {"int8_rowscale": 127, "float8_e4m3_rowscale": 448}[dtype.value], rtol=1e-6
    )
    decoded = dtype.to_float32(raw)
    # int8: half a step of the row's scale; fp8 e4m3: 3 mantissa bits, relative error <= 2**-4
    bound = (
        scale[:, None] * 0.5 if dtype is DType.INT8_ROWSCALE else np.abs(values) * 2.0**-4 + scale[:, None] * 2.0**-9
    )
    assert (np.abs(decoded - values) <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", QUANTIZED, ids=lambda d: d.value)
def test_dequantize_on_a_tensor_equals_to_float32(dtype: DType) -> None:
    raw = dtype.from_float64(np.random.default_rng(1).standard_normal((6, 2, 8)).reshape(12, 8))
    tensor = torch.from_numpy(raw).reshape(6, 2, 12)  # [..., stored width]
    decoded = dtype.dequantize(tensor)
    assert decoded.shape == (6, 2, 8) and decoded.dtype == torch.float32
    np.testing.assert_array_equal(decoded.reshape(12, 8).numpy(), dtype.to_float32(raw))


@pytest.mark.parametrize("dtype", QUANTIZED, ids=lambda d: d.value)
def test_a_zero_row_stays_zero(dtype: DType) -> None:
    raw = dtype.from_float64(np.zeros((2, 4)))
    assert (dtype.to_float32(raw) == 0).all()


def test_float_types_store_one_value_per_unit() -> None:
    for dtype in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16):
        assert dtype.stored_width(32) == 32 and dtype.row_bytes(32) == 32 * dtype.itemsize and not dtype.quantized


# Decoding runs where the rows are (the model's device), with one implementation: DType.dequantize,
# torch ops that exist on the CPU and on CUDA. Each decoded value is one correctly rounded float32
# operation on exact inputs (fp8/int8 codes and float16/bfloat16 widen exactly; the quantized types
# then take one float32 product with the row's scale), so IEEE arithmetic fixes every bit: the CPU
# and the GPU must agree exactly, and both must equal an independent numpy decoding.
DECODED = [dtype for dtype in DType if not dtype.opaque]
SCALES = np.array([1.0, 2.0**-7, 0.0123, 3.5e-3, 1e-30, 7.25], dtype=np.float32)  # 1e-30: products go subnormal


def _every_code(dtype: DType) -> np.ndarray:
    """Stored rows [N, stored width] covering every finite code of `dtype` (quantized: under every scale)."""
    if dtype.quantized:
        codes = np.arange(256, dtype=np.uint8)
        if dtype is DType.FLOAT8_E4M3_ROWSCALE:
            codes = codes[(codes & 0x7F) != 0x7F]  # e4m3fn's two NaN codes are never stored
        codes = codes.reshape(-1, 2)  # rows of 2 values
        rows = [np.concatenate([codes, np.full((len(codes), 1), s).view(np.uint8)], axis=1) for s in SCALES]
        return np.concatenate(rows)  # [N, 2 + 4]
    if dtype is DType.FLOAT32:
        return np.concatenate([SCALES, -SCALES, [0.0, -0.0, np.inf, 1e-45]]).astype("<f4").reshape(-1, 2)
    words = np.arange(2**16, dtype=np.uint32).astype("<u2")
    exponent_all_ones = 0x7C00 if dtype is DType.FLOAT16 else 0x7F80
    finite = (words & exponent_all_ones) != exponent_all_ones
    return words[finite].view(dtype.numpy).reshape(-1, 2)


def _numpy_decoding(dtype: DType, raw: np.ndarray) -> np.ndarray:
    """float32 values [N, dim] decoded without torch: the reference for the bits."""
    if not dtype.quantized:
        return dtype.to_float32(raw) if dtype is DType.BFLOAT16 else raw.astype(np.float32)
    codes, scale = raw[:, :-4], raw[:, -4:].copy().view("<f4")  # [N, dim], [N, 1]
    if dtype is DType.INT8_ROWSCALE:
        values = codes.view(np.int8).astype(np.float32)
    else:  # e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
        sign = np.where(codes & 0x80, -1.0, 1.0)
        exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
        magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0))
        values = (sign * magnitude).astype(np.float32)  # exact: every e4m3 value is a float32
    return values * scale  # one float32 product, correctly rounded


@pytest.mark.parametrize("dtype", DECODED, ids=lambda d: d.value)
def test_decoding_every_code_gives_the_ieee_bits(dtype: DType) -> None:
    raw = _every_code(dtype)
    decoded = dtype.dequantize(dtype.to_torch(np.ascontiguousarray(raw)))
    assert decoded.dtype == torch.float32
    np.testing.assert_array_equal(decoded.numpy().view(np.int32), _numpy_decoding(dtype, raw).view(np.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DECODED, ids=lambda d: d.value)
def test_decoding_on_cuda_gives_the_cpu_bits(dtype: DType) -> None:
    stored = dtype.to_torch(np.ascontiguousarray(_every_code(dtype)))
    on_gpu = dtype.dequantize(stored.to("cuda"))  # the stored bytes move; decoding runs on the GPU
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert torch.equal(on_gpu.cpu().view(torch.int32), dtype.dequantize(stored).view(torch.int32))
