"""Sharding: a layer's rows split into partitions, partitions assigned to shards.

Row `r` of every layer belongs to partition `r % num_partitions`: Engram's row ids are
hashes, so every partition gets the same share of rows and of traffic. There are more
partitions than shards (64 by default), so a table can later be re-spread over more or
fewer shards by moving whole partitions (`memstore reshard`). Each shard directory is a
table of its own holding only its partitions' rows, partition after partition:

    local index of r = (rows of the shard's partitions before r's) + r // num_partitions

Every shard's manifest records the whole assignment (partition -> shard), so any shard
tells a client the full routing, and a daemon refuses rows of partitions it does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from memstore.errors import InvalidArgumentError, WrongShardError

DEFAULT_PARTITIONS = 64


@dataclass(frozen=True)
class Sharding:
    """Which partitions exist, which shard holds each, and which shard this table directory is."""

    num_partitions: int
    assignment: tuple[int, ...]  # partition -> shard index
    shard: int

    def __post_init__(self) -> None:
        if self.num_partitions < 1 or len(self.assignment) != self.num_partitions:
            raise InvalidArgumentError(
                f"a sharding needs one shard index per partition: {self.num_partitions} partitions, "
                f"{len(self.assignment)} assigned"
            )
        shards = set(self.assignment)
        if shards != set(range(len(shards))):
            raise InvalidArgumentError(
                f"shards must be numbered 0..N-1, each holding a partition; the assignment names {sorted(shards)}"
            )
        if not 0 <= self.shard < len(shards):
            raise InvalidArgumentError(f"shard {self.shard} is not one of the {len(shards)} shards")

    @classmethod
    def spread(cls, num_shards: int, shard: int, num_partitions: int = DEFAULT_PARTITIONS) -> Sharding:
        """Shard `shard` of `num_shards`, each holding a contiguous block of partitions."""
        if not 1 <= num_shards <= num_partitions:
            raise InvalidArgumentError(
                f"{num_shards} shards need 1..{num_partitions} of the {num_partitions} partitions each; "
                "ask for fewer shards or more partitions (--partitions)"
            )
        return cls(num_partitions, tuple(p * num_shards // num_partitions for p in range(num_partitions)), shard)

    @property
    def num_shards(self) -> int:
        return max(self.assignment) + 1

    @cached_property
    def partitions(self) -> tuple[int, ...]:
        """The partitions this shard holds, ascending (the order of its rows on disk)."""
        return tuple(p for p, s in enumerate(self.assignment) if s == self.shard)

    def for_shard(self, shard: int) -> Sharding:
        """The same assignment, seen from another shard."""
        return Sharding(self.num_partitions, self.assignment, shard)

    def partition_rows(self, num_rows: int) -> np.ndarray:
        """Rows of each partition [num_partitions] in a layer of num_rows rows."""
        return (num_rows - np.arange(self.num_partitions) + self.num_partitions - 1) // self.num_partitions

    def local_rows(self, num_rows: int) -> int:
        """Rows this shard stores of a layer of num_rows rows."""
        return int(self.partition_rows(num_rows)[list(self.partitions)].sum())

    def shard_of(self, row_ids: np.ndarray) -> np.ndarray:
        """The shard holding each row (ids already checked to be in range)."""
        return np.asarray(self.assignment, dtype=np.int64)[row_ids % self.num_partitions]

    def to_local(self, row_ids: np.ndarray, num_rows: int) -> np.ndarray:
        """Local indices of global row ids (in range already); WrongShardError for a row held elsewhere."""
        starts = self._local_starts(num_rows)[row_ids % self.num_partitions]  # -1: not held here
        if len(starts) and starts.min() < 0:
            bad = int(row_ids[np.flatnonzero(starts < 0)[0]])
            partition = bad % self.num_partitions
            raise WrongShardError(
                f"row {bad} is in partition {partition}, held by shard {self.assignment[partition]}; this is shard "
                f"{self.shard} of {self.num_shards} (partitions {partition_ranges(self.partitions)}): route it by the "
                "assignment in the manifest"
            )
        return starts + row_ids // self.num_partitions

    def to_global(self, local_ids: np.ndarray, num_rows: int) -> np.ndarray:
        """Global row ids of local indices (0 <= id < local_rows)."""
        held = np.asarray(self.partitions, dtype=np.int64)
        ends = np.cumsum(self.partition_rows(num_rows)[held])  # [H]
        which = np.searchsorted(ends, local_ids, side="right")  # index into held
        first = ends[which] - self.partition_rows(num_rows)[held][which]
        return (local_ids - first) * self.num_partitions + held[which]

    def _local_starts(self, num_rows: int) -> np.ndarray:
        starts = np.full(self.num_partitions, -1, dtype=np.int64)
        held = list(self.partitions)
        sizes = self.partition_rows(num_rows)[held]
        starts[held] = np.cumsum(sizes) - sizes
        return starts

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_partitions": self.num_partitions,
            "num_shards": self.num_shards,
            "shard": self.shard,
            "assignment": list(self.assignment),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sharding:
        known = {"num_partitions", "num_shards", "shard", "assignment"}
        if set(data) != known:
            raise InvalidArgumentError(f"sharding must have exactly the keys {sorted(known)}; got {sorted(data)}")
        sharding = cls(int(data["num_partitions"]), tuple(int(s) for s in data["assignment"]), int(data["shard"]))
        if sharding.num_shards != int(data["num_shards"]):
            raise InvalidArgumentError(
                f"sharding says {data['num_shards']} shards but assigns partitions to {sharding.num_shards}"
            )
        return sharding


def partition_ranges(values: tuple[int, ...]) -> str:
    """(1, 2, 3, 7) -> '1-3,7': partition lists in messages."""
    runs: list[list[int]] = []
    for value in values:
        if runs and runs[-1][1] == value - 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)
