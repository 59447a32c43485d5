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
