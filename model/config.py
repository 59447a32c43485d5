"""Model configs to and from plain dicts (checkpoints, JSON), rejecting unknown keys."""

from __future__ import annotations

import dataclasses
from typing import Any

from memstore.errors import InvalidArgumentError
from model.engram import EngramConfig
from model.lm import LMConfig


def _build(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise InvalidArgumentError(f"unknown {cls.__name__} keys {sorted(unknown)}; known keys are {sorted(known)}")
    return cls(**{k: _tuples(v) if isinstance(v, list) else v for k, v in data.items()})


def _tuples(value: Any) -> Any:
    """JSON lists back to (nested) tuples, as the frozen configs hold them."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def lm_config_to_dict(config: LMConfig) -> dict[str, Any]:
    """A JSON-able dict of the config, nested Engram settings included."""
    return dataclasses.asdict(config)


def lm_config_from_dict(data: dict[str, Any]) -> LMConfig:
    """Inverse of lm_config_to_dict."""
    data = dict(data)
    engram = data.pop("engram", None)
    return _build(LMConfig, {**data, "engram": None if engram is None else _build(EngramConfig, engram)})
