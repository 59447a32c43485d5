"""Argument types shared by the command lines: flags that take one of an Enum's values."""

from __future__ import annotations

import argparse
import enum
from typing import Any, TypeVar

_E = TypeVar("_E", bound=enum.Enum)


def enum_choice(cls: type[_E]) -> dict[str, Any]:
    """`add_argument` keywords for a flag taking one of `cls`'s values: help and usage show the values
    (`{mmap,lmdb}`, not `Backend.MMAP`), the parsed value is the member, and a wrong value is an
    argparse error listing the values."""
    values = [str(member.value) for member in cls]

    def parse(text: str) -> _E:
        try:
            return cls(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(values)})") from None

    parse.__name__ = cls.__name__  # argparse names the type in some messages
    return {"type": parse, "metavar": "{" + ",".join(values) + "}"}
