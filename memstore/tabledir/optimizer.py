"""The optimizer section of a manifest: which optimizer a table trains with, its hyperparameters, and the
state it keeps per row (the slots of the ``layer_<id>.<slot>.f32`` files).

Only the configuration lives here, so that reading a manifest loads no update arithmetic: how a
push applies it is memstore.optim (whose docstring describes each optimizer).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from memstore.errors import InvalidArgumentError


class OptimizerKind(enum.Enum):
    """Which update rule a layer's pushes apply."""

    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"


_KIND_NAMES = ", ".join(repr(kind.value) for kind in OptimizerKind)


def _is_real(value: Any) -> bool:
    # bool is an int subclass; `lr=True` is a mistake, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_float32_positive(name: str, value: Any, hint: str) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"optimizer {name} must be a finite number > 0, got {value!r}; {hint}")
    # The arithmetic is float32: a value that rounds to 0 or overflows there would silently
    # turn the optimizer off (lr) or divide 0 by 0 on an untouched accumulator (eps).
    with np.errstate(over="ignore"):
        as32 = np.float32(value)
    if not (np.isfinite(as32) and as32 > 0):
        raise InvalidArgumentError(
            f"optimizer {name}={value!r} is not representable as a positive float32 (the update is computed "
            f"in float32); {hint}"
        )
    return float(value)


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer of one table: its kind and hyperparameters (stored in the manifest).

    ``betas`` only matter for ``adam``, ``initial_accumulator_value`` only for the Adagrad kinds.
    ``eps`` is shared; note ``torch.optim.Adagrad`` defaults to ``eps=1e-10`` (see the module
    docstring).
    """

    kind: OptimizerKind = OptimizerKind.ADAM
    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        kind = self.kind
        if not isinstance(kind, OptimizerKind):
            try:
                kind = OptimizerKind(kind)
            except ValueError:
                raise InvalidArgumentError(f"unknown optimizer kind {self.kind!r}; use one of {_KIND_NAMES}") from None
        lr = _as_float32_positive("lr", self.lr, "set lr to a positive learning rate such as 0.01")
        eps = _as_float32_positive("eps", self.eps, "set eps to a small positive number such as 1e-8")
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise InvalidArgumentError(f"optimizer betas must be a pair (beta1, beta2), got {betas!r}")
        for index, beta in enumerate(betas):
            if not _is_real(beta) or not 0.0 <= beta < 1.0:
                raise InvalidArgumentError(
                    f"optimizer betas[{index}] must be a number in [0, 1), got {beta!r}; "
                    "typical values are betas=(0.9, 0.999)"
                )
        acc = self.initial_accumulator_value
        if not _is_real(acc) or not math.isfinite(acc) or acc < 0:
            raise InvalidArgumentError(
                f"optimizer initial_accumulator_value must be a finite number >= 0, got {acc!r}; "
                "use 0.0 (torch's default) or a small positive value"
            )
        # Normalize so that equal configs compare and serialize equal (e.g. betas from a JSON list).
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        object.__setattr__(self, "initial_accumulator_value", float(acc))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the manifest."""
        return {
            "kind": self.kind.value,
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "initial_accumulator_value": self.initial_accumulator_value,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimizerConfig:
        """Inverse of `to_dict`. ``kind`` is required; other missing keys take their defaults."""
        if not isinstance(d, Mapping):
            raise InvalidArgumentError(f"optimizer config must be a JSON object, got {type(d).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(str(key) for key in d if key not in known)
        if unknown:
            raise InvalidArgumentError(
                f"unknown optimizer config keys {unknown}; the known keys are {sorted(known)} "
                "(was the table written by a newer memstore?)"
            )
        if "kind" not in d:
            raise InvalidArgumentError(f"optimizer config has no 'kind'; set it to one of {_KIND_NAMES}")
        return cls(**d)

    def state_slots(self, dim: int) -> dict[str, int]:
        """State slot name -> values per row, in a fixed order, for rows of ``dim`` values."""
        check_count("dim", dim, minimum=1)
        if self.kind is OptimizerKind.SGD:
            return {}
        if self.kind is OptimizerKind.ADAGRAD:
            return {"sum": dim}
        if self.kind is OptimizerKind.ROWWISE_ADAGRAD:
            return {"sum": 1}
        return {"exp_avg": dim, "exp_avg_sq": dim}

    def initial_state(self, num_rows: int, dim: int) -> dict[str, np.ndarray]:
        """Fresh float32 state for ``num_rows`` rows: Adagrad sums at the initial value, Adam moments at 0."""
        check_count("num_rows", num_rows, minimum=0)
        fill = self.initial_accumulator_value if self.kind in _ADAGRADS else 0.0
        return {
            name: np.full((num_rows, width), fill, dtype=np.float32) for name, width in self.state_slots(dim).items()
        }


_ADAGRADS = (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD)


def check_count(name: str, value: Any, minimum: int) -> None:
    """InvalidArgumentError unless `value` is an integer >= `minimum` (`name` says which argument)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
