"""Row storage types: one closed set, with their numpy, torch and wire forms.

torch is imported where a torch form is asked for, not with this module: the daemon and the
command line (a container's health probe runs `memstore health` every few seconds) start
without it unless they serve quantized rows.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

from memstore.errors import InvalidArgumentError
from memstore.wire import memstore_pb2 as pb

if TYPE_CHECKING:
    import torch


class DType(enum.Enum):
    """How the values of a row are stored on disk and sent on the wire (always little-endian).

    The quantized types store a row as `dim` one-byte codes and then the row's float32 scale
    (`stored_width(dim)` = dim + 4 bytes): a quarter of float32's bytes per lookup. Their raw rows
    travel as bytes; `dequantize` turns them into float32 values on the caller's device.
    BYTES rows are opaque (a format the memstore does not decode, such as a production checkpoint's
    256 fp8 bytes + 8 bytes of scale): imported, stored and served as they are, never generated,
    decoded or trained here.
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT8_E4M3_ROWSCALE = "float8_e4m3_rowscale"
    INT8_ROWSCALE = "int8_rowscale"
    BYTES = "bytes"  # opaque rows of `dim` bytes, imported and served as they are

    @property
    def opaque(self) -> bool:
        """Whether rows are bytes this project does not decode."""
        return self is DType.BYTES

    @property
    def quantized(self) -> bool:
        """Whether rows are one-byte codes plus a per-row float32 scale."""
        return self in _QMAX

    def stored_width(self, dim: int) -> int:
        """Stored units (of `numpy`) per row of `dim` values."""
        return dim + 4 if self.quantized else dim

    def row_bytes(self, dim: int) -> int:
        """Bytes per stored row of `dim` values."""
        return self.stored_width(dim) * self.itemsize

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype that holds the raw values; bfloat16 is raw 16-bit words (numpy has none)."""
        return np.dtype(_NUMPY[self])

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, _TORCH[self])

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def wire(self) -> int:
        """The `DType` enum value of the proto."""
        return _WIRE[self]

    @classmethod
    def from_wire(cls, value: int) -> DType:
        for dtype, wire in _WIRE.items():
            if wire == value:
                return dtype
        raise ValueError(f"unknown wire dtype {value}")

    def from_float64(self, values: np.ndarray) -> np.ndarray:
        """Round float64 values [N, dim] to stored rows (round to nearest even; bfloat16 via float32;
        quantized: scale = max |value| of the row / the code's largest value, codes rounded)."""
        if self.opaque:
            raise InvalidArgumentError("opaque byte rows are imported as they are, never generated or encoded")
        if self.quantized:
            return self._quantize(np.asarray(values, dtype=np.float64))
        if self is DType.BFLOAT16:
            bits = values.astype("<f4").view("<u4")
            # Round to nearest even on the 16 dropped bits; values are finite here.
            rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return (rounded >> np.uint32(16)).astype("<u2")
        return values.astype(self.numpy)

    def to_float32(self, values: np.ndarray) -> np.ndarray:
        """Raw stored rows as float32 values [N, dim] (exact for the float types; quantized rows decode)."""
        if self.quantized or self.opaque:
            import torch

            return self.dequantize(torch.from_numpy(np.ascontiguousarray(values))).numpy()
        if self is DType.BFLOAT16:
            return (values.astype("<u4") << np.uint32(16)).view("<f4")
        return values.astype("<f4")

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows as a tensor ([..., stored_width], any device) -> float32 values [..., dim]."""
        if self.opaque:
            raise InvalidArgumentError("opaque byte rows have no values here: decode them in the model")
        if not self.quantized:
            return rows.float()
        import torch

        codes, scale = rows[..., :-4], rows[..., -4:].contiguous().view(torch.float32)  # [..., dim], [..., 1]
        if self is DType.FLOAT8_E4M3_ROWSCALE:
            values = codes.contiguous().view(torch.float8_e4m3fn).float()
        else:
            values = codes.contiguous().view(torch.int8).float()
        return values * scale

    def _quantize(self, values: np.ndarray) -> np.ndarray:
        count, dim = values.shape
        amax = np.abs(values).max(axis=1, keepdims=True) if dim else np.zeros((count, 1))
        scale = (amax / _QMAX[self]).astype(np.float32)  # [N, 1]
        safe = np.where(scale > 0, scale, np.float32(1))
        scaled = np.clip(values / safe, -_QMAX[self], _QMAX[self])  # [N, dim] in code units
        if self is DType.FLOAT8_E4M3_ROWSCALE:
            import torch

            codes = torch.from_numpy(scaled.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        else:
            codes = np.rint(scaled).astype(np.int8).view(np.uint8)
        return np.concatenate([codes, scale.view(np.uint8).reshape(count, 4)], axis=1)  # [N, dim + 4]

    def to_torch(self, values: np.ndarray) -> torch.Tensor:
        """A tensor sharing memory with `values` (raw storage array), of this dtype."""
        import torch

        tensor = torch.from_numpy(values)
        return tensor.view(torch.bfloat16) if self is DType.BFLOAT16 else tensor

    def raw_view(self, tensor: torch.Tensor) -> np.ndarray:
        """The raw storage array sharing memory with a CPU tensor of this dtype (inverse of to_torch)."""
        import torch

        if tensor.dtype != self.torch or tensor.device.type != "cpu":
            raise ValueError(f"expected a CPU tensor of {self.torch}; got {tensor.dtype} on {tensor.device}")
        if self is DType.BFLOAT16:
            return tensor.view(torch.int16).numpy().view(self.numpy)
        return tensor.numpy()


_QMAX = {DType.FLOAT8_E4M3_ROWSCALE: 448.0, DType.INT8_ROWSCALE: 127.0}  # the codes' largest magnitude
_NUMPY = {
    DType.FLOAT32: "<f4",
    DType.FLOAT16: "<f2",
    DType.BFLOAT16: "<u2",
    DType.FLOAT8_E4M3_ROWSCALE: "u1",
    DType.INT8_ROWSCALE: "u1",
    DType.BYTES: "u1",
}
_TORCH = {  # names of torch dtypes
    DType.FLOAT32: "float32",
    DType.FLOAT16: "float16",
    DType.BFLOAT16: "bfloat16",
    DType.FLOAT8_E4M3_ROWSCALE: "uint8",
    DType.INT8_ROWSCALE: "uint8",
    DType.BYTES: "uint8",
}
_WIRE = {
    DType.FLOAT32: pb.DTYPE_FLOAT32,
    DType.FLOAT16: pb.DTYPE_FLOAT16,
    DType.BFLOAT16: pb.DTYPE_BFLOAT16,
    DType.FLOAT8_E4M3_ROWSCALE: pb.DTYPE_FLOAT8_E4M3_ROWSCALE,
    DType.INT8_ROWSCALE: pb.DTYPE_INT8_ROWSCALE,
    DType.BYTES: pb.DTYPE_BYTES,
}
