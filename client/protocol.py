"""The interface both clients implement, for code that reads or trains a served table.

`MemstoreClient` (one daemon) and `ClusterClient` (a sharded, replicated table) are both a
`TableClient`. Code that only reads rows asks for a `RowReader` (a `Prefetcher`; an in-process
`TableFetcher` is one too), code that only pushes gradients for a `RowWriter` (a `Pusher`).

`snapshot` is not part of it: one daemon answers with one (path, version), a cluster with one per
shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from client.client import PushAck
    from memstore.tabledir.manifest import Manifest


@runtime_checkable
class RowReader(Protocol):
    """Reads rows of a table: its manifest, and rows by id."""

    def describe(self, timeout: float | None = None) -> Manifest:
        """The table's manifest (layout, dtype, seed, optimizer)."""
        ...

    def lookup(
        self, layer_id: int, row_ids: Any, *, timeout: float | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows [*row_ids.shape, dim] of one layer in the stored dtype, on the CPU (in `out` when given)."""
        ...


@runtime_checkable
class RowWriter(Protocol):
    """Sends row gradients to a table's optimizer."""

    def push(
        self, layer_id: int, row_ids: Any, grads: Any, *, step_id: int = 0, lr_scale: float | None = None
    ) -> PushAck:
        """Gradients [*row_ids.shape, dim] of one layer; repeated ids are summed first."""
        ...


@runtime_checkable
class TableClient(RowReader, RowWriter, Protocol):
    """A served table: what `MemstoreClient` and `ClusterClient` both offer. A context manager."""

    @property
    def trainable(self) -> bool:
        """Whether the table takes pushes."""
        ...

    @property
    def transport(self) -> str:
        """How lookups travel ("grpc", "same-host", or per shard joined by "+")."""
        ...

    def check_fingerprint(self, expected: str, timeout: float | None = None) -> None:
        """LayoutMismatchError unless the served table has the expected fingerprint."""
        ...

    def lookup(
        self,
        layer_id: int,
        row_ids: Any,
        *,
        timeout: float | None = None,
        out: torch.Tensor | None = None,
        return_version: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, int]:
        """Rows as `RowReader.lookup`; with `return_version`, also the table version they show."""
        ...

    def push(
        self,
        layer_id: int,
        row_ids: Any,
        grads: Any,
        *,
        step_id: int = 0,
        lr_scale: float | None = None,
        timeout: float | None = None,
    ) -> PushAck:
        """As `RowWriter.push`, within `timeout` seconds."""
        ...

    def version(self, timeout: float | None = None) -> int:
        """The table's version now (pushes applied)."""
        ...

    def close(self) -> None:
        """Close the connections; calls in flight are cancelled."""
        ...

    def __enter__(self) -> TableClient: ...

    def __exit__(self, *exc: object) -> None: ...
