"""Engram's table layout: which rows exist, and the prime rule that sizes them.

One Engram layer hashes the suffix N-grams of orders 2..max_ngram with `heads_per_ngram`
heads each; every head owns a table whose size is a distinct prime. The heads of one
layer are stored as one contiguous row range, order-major (order 2's heads first), so
head h's rows start at the sum of the earlier heads' primes.

The prime rule is Engram's reference rule, exactly: walking layers in the given order,
then orders 2..N, each order's search starts at `vocab_size_per_ngram[order-2] - 1`, and
each head takes the next prime above the previous start that no earlier head of any
layer took. The model's hashing (issue: model/hashing.py) calls `engram_primes` too, so
table and model can never disagree.

A table imported from a checkpoint made elsewhere may have other head sizes: `head_sizes`
then lists them explicitly (per layer, per order, per head; the manifest records them and the
model's hashing takes the same list), instead of the rule.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

from memstore.errors import InvalidArgumentError

# Deterministic Miller-Rabin witnesses: exact for every n < 3.3e24.
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Exact primality test for any n below 3.3e24 (far beyond any table size)."""
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_unused_prime(start: int, used: set[int]) -> int:
    candidate = start + 1
    while candidate in used or not is_prime(candidate):
        candidate += 1
    return candidate


def engram_primes(
    layer_ids: Sequence[int], vocab_size_per_ngram: Sequence[int], max_ngram: int, heads_per_ngram: int
) -> dict[int, list[list[int]]]:
    """Per layer, per order (2..max_ngram), per head: the head's prime table size (Engram's rule)."""
    used: set[int] = set()
    primes: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for order in range(2, max_ngram + 1):
            start = vocab_size_per_ngram[order - 2] - 1
            heads = []
            for _ in range(heads_per_ngram):
                start = _next_unused_prime(start, used)
                used.add(start)
                heads.append(start)
            per_order.append(heads)
        primes[layer_id] = per_order
    return primes


def as_int(name: str, value: Any) -> int:
    """An int (numpy ints too) or InvalidArgumentError: 4.5 or True are not sizes or ids."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidArgumentError(f"{name} must be an integer; got {value!r}")
    return int(value)


@dataclass(frozen=True)
class EngramLayout:
    """The shape of an Engram table; defaults are small enough for a laptop."""

    layer_ids: tuple[int, ...] = (1, 4)
    vocab_size_per_ngram: tuple[int, ...] = (50_000, 50_000)
    max_ngram: int = 3
    heads_per_ngram: int = 8
    dim: int = 32
    # Explicit head sizes [layer][order - 2][head], in layer_ids order, instead of the prime rule.
    head_sizes_override: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    _primes: dict[int, list[list[int]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_ids", tuple(as_int("layer_ids", x) for x in self.layer_ids))
        object.__setattr__(
            self, "vocab_size_per_ngram", tuple(as_int("vocab_size_per_ngram", x) for x in self.vocab_size_per_ngram)
        )
        for name in ("max_ngram", "heads_per_ngram", "dim"):
            object.__setattr__(self, name, as_int(name, getattr(self, name)))
        problems = []
        if not self.layer_ids:
            problems.append("layer_ids is empty")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            problems.append(f"layer_ids {list(self.layer_ids)} has duplicates")
        if any(x < 0 or x >= 2**32 for x in self.layer_ids):
            problems.append(f"layer_ids {list(self.layer_ids)} must be in [0, 2**32)")
        if self.max_ngram < 2:
            problems.append(f"max_ngram is {self.max_ngram}; it must be at least 2")
        elif len(self.vocab_size_per_ngram) != self.max_ngram - 1:
            problems.append(
                f"vocab_size_per_ngram has {len(self.vocab_size_per_ngram)} entries; "
                f"max_ngram {self.max_ngram} needs one per order 2..{self.max_ngram}, i.e. {self.max_ngram - 1}"
            )
        if any(v < 2 for v in self.vocab_size_per_ngram):
            problems.append(f"vocab_size_per_ngram {list(self.vocab_size_per_ngram)} must all be at least 2")
        if self.heads_per_ngram < 1:
            problems.append(f"heads_per_ngram is {self.heads_per_ngram}; it must be at least 1")
        if self.dim < 1:
            problems.append(f"dim is {self.dim}; it must be at least 1")
        if self.head_sizes_override is not None:
            override = tuple(
                tuple(tuple(as_int("head_sizes", size) for size in order) for order in layer)
                for layer in self.head_sizes_override
            )
            object.__setattr__(self, "head_sizes_override", override)
            expected = (len(self.layer_ids), self.max_ngram - 1, self.heads_per_ngram)
            shape_ok = len(override) == expected[0] and all(
                len(layer) == expected[1] and all(len(order) == expected[2] for order in layer) for layer in override
            )
            if not shape_ok:
                problems.append(
                    f"head_sizes must list {expected[0]} layers x {expected[1]} orders x {expected[2]} heads"
                )
            elif any(size < 2 for layer in override for order in layer for size in order):
                problems.append("head_sizes must all be at least 2")
        if problems:
            raise InvalidArgumentError("invalid Engram layout: " + "; ".join(problems))
        if self.head_sizes_override is None:
            primes = engram_primes(self.layer_ids, self.vocab_size_per_ngram, self.max_ngram, self.heads_per_ngram)
        else:
            primes = {
                layer: [list(order) for order in sizes]
                for layer, sizes in zip(self.layer_ids, self.head_sizes_override)
            }
        object.__setattr__(self, "_primes", primes)

    def primes(self, layer_id: int) -> list[list[int]]:
        """[order - 2][head] table sizes of one layer (primes by Engram's rule, or the explicit sizes)."""
        return [list(heads) for heads in self._primes[self._checked(layer_id)]]

    def head_sizes(self, layer_id: int) -> list[int]:
        """Every head's size in storage order (order-major)."""
        return [p for heads in self._primes[self._checked(layer_id)] for p in heads]

    def head_offsets(self, layer_id: int) -> list[int]:
        """First row of each head within the layer's row range (storage order)."""
        offsets, total = [], 0
        for size in self.head_sizes(layer_id):
            offsets.append(total)
            total += size
        return offsets

    def num_rows(self, layer_id: int) -> int:
        """Rows of one layer: the sum of its heads' primes."""
        return sum(self.head_sizes(layer_id))

    @cached_property
    def total_rows(self) -> int:
        return sum(self.num_rows(layer_id) for layer_id in self.layer_ids)

    @property
    def num_params(self) -> int:
        return self.total_rows * self.dim

    def _checked(self, layer_id: int) -> int:
        if layer_id not in self._primes:
            raise InvalidArgumentError(f"unknown Engram layer {layer_id}; the table has layers {list(self.layer_ids)}")
        return layer_id

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the head sizes written out for readers in other languages (`primes`;
        `explicit_head_sizes` true when they are not the prime rule's)."""
        data: dict[str, Any] = {
            "layer_ids": list(self.layer_ids),
            "vocab_size_per_ngram": list(self.vocab_size_per_ngram),
            "max_ngram": self.max_ngram,
            "heads_per_ngram": self.heads_per_ngram,
            "dim": self.dim,
            "primes": {str(layer_id): self.primes(layer_id) for layer_id in self.layer_ids},
        }
        if self.head_sizes_override is not None:
            data["explicit_head_sizes"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngramLayout:
        """Inverse of to_dict; rejects unknown keys, and rule-derived primes that disagree with the rule."""
        known = {"layer_ids", "vocab_size_per_ngram", "max_ngram", "heads_per_ngram", "dim", "primes"}
        known.add("explicit_head_sizes")
        unknown = set(data) - known
        if unknown:
            raise InvalidArgumentError(f"unknown layout keys {sorted(unknown)}; known keys are {sorted(known)}")
        fields_ = {k: v for k, v in data.items() if k not in ("primes", "explicit_head_sizes")}
        if data.get("explicit_head_sizes"):
            if "primes" not in data:
                raise InvalidArgumentError("a layout with explicit_head_sizes must list them under 'primes'")
            fields_["head_sizes_override"] = tuple(
                tuple(tuple(order) for order in data["primes"][str(layer)]) for layer in data["layer_ids"]
            )
            return cls(**fields_)
        layout = cls(**fields_)
        if "primes" in data and data["primes"] != layout.to_dict()["primes"]:
            raise InvalidArgumentError(
                "layout primes do not follow Engram's prime rule for these sizes; set explicit_head_sizes for "
                "a table whose head sizes came from elsewhere"
            )
        return layout


def fingerprint(layout: EngramLayout, seed: int) -> str:
    """A short hash of the layout and seed: what a model and a table must agree on."""
    canonical = json.dumps({"layout": layout.to_dict(), "seed": int(seed)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
