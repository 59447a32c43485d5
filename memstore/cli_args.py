"""Argument types shared by the command lines: flags that take one of an Enum's values, byte sizes,
and renamed flags that keep their old spelling."""

from __future__ import annotations

import argparse
import enum
import re
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


# Byte sizes: a whole number of bytes, or a number with a binary unit (powers of 1024, as --feed-mb
# always counted: 64M = 64MB = 64MiB = 67108864).
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<unit>[kmgt])i?)?b?", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """A byte size flag's value: `1048576`, `64KiB`, `64M`, `1.5GiB`, `2TB` (units are powers of 1024;
    case and a trailing B or iB do not matter). argparse.ArgumentTypeError says what it accepts."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes, like 1048576, 512KiB, 64MiB or 1GiB (units are powers of 1024); got {text!r}"
        )
    unit = _UNITS[match["unit"] and match["unit"].lower()]
    size = float(match["number"]) * unit if "." in match["number"] else int(match["number"]) * unit
    if size != int(size):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes")
    return int(size)


def format_bytes(size: int) -> str:
    """`size` as parse_bytes reads it back, in the largest binary unit that divides it (67108864: 64MiB)."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_mebibytes(text: str) -> int:
    """Bytes from a number of MiB (a fraction allowed), as the `-mb` flags took them."""
    try:
        return int(float(text) * (1 << 20))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, like 64 or 0.5; got {text!r}") from None


def add_renamed(group: Any, name: str, old: str, **kwargs: Any) -> argparse.Action:
    """Add flag `name`, and its former spelling `old` as an alias hidden from --help: it sets the same
    field (`type` in `kwargs` parses both; `old_type` replaces it for the old spelling, whose unit
    differed). The help of `name` mentions the old spelling, so people find the new one."""
    old_type = kwargs.pop("old_type", kwargs.get("type"))
    help_text = kwargs.get("help")
    if help_text is not None and help_text is not argparse.SUPPRESS:
        kwargs["help"] = f"{help_text} (formerly {old})"
    action = group.add_argument(name, **kwargs)
    alias = {"dest": action.dest, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
    if old_type is not None:
        alias["type"] = old_type
    if "metavar" in kwargs:
        alias["metavar"] = kwargs["metavar"]
    group.add_argument(old, **alias)
    return action
