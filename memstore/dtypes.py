"""Row storage types: one closed set, with their numpy, torch and wire forms."""

from __future__ import annotations

import enum

import numpy as np
import torch

from memstore.wire import memstore_pb2 as pb


class DType(enum.Enum):
    """How the values of a row are stored on disk and sent on the wire (always little-endian)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype that holds the raw values; bfloat16 is raw 16-bit words (numpy has none)."""
        return np.dtype(_NUMPY[self])

    @property
    def torch(self) -> torch.dtype:
        return _TORCH[self]

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
        """Round float64 values to this storage type (round to nearest even; bfloat16 via float32)."""
        if self is DType.BFLOAT16:
            bits = values.astype("<f4").view("<u4")
            # Round to nearest even on the 16 dropped bits; values are finite here.
            rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return (rounded >> np.uint32(16)).astype("<u2")
        return values.astype(self.numpy)

    def to_float32(self, values: np.ndarray) -> np.ndarray:
        """Raw storage values as float32 (exact: every storage type widens to float32 without rounding)."""
        if self is DType.BFLOAT16:
            return (values.astype("<u4") << np.uint32(16)).view("<f4")
        return values.astype("<f4")

    def to_torch(self, values: np.ndarray) -> torch.Tensor:
        """A tensor sharing memory with `values` (raw storage array), of this dtype."""
        tensor = torch.from_numpy(values)
        return tensor.view(torch.bfloat16) if self is DType.BFLOAT16 else tensor

    def raw_view(self, tensor: torch.Tensor) -> np.ndarray:
        """The raw storage array sharing memory with a CPU tensor of this dtype (inverse of to_torch)."""
        if tensor.dtype != self.torch or tensor.device.type != "cpu":
            raise ValueError(f"expected a CPU tensor of {self.torch}; got {tensor.dtype} on {tensor.device}")
        if self is DType.BFLOAT16:
            return tensor.view(torch.int16).numpy().view(self.numpy)
        return tensor.numpy()


_NUMPY = {DType.FLOAT32: "<f4", DType.FLOAT16: "<f2", DType.BFLOAT16: "<u2"}
_TORCH = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}
_WIRE = {DType.FLOAT32: pb.DTYPE_FLOAT32, DType.FLOAT16: pb.DTYPE_FLOAT16, DType.BFLOAT16: pb.DTYPE_BFLOAT16}
