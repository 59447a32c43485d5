"""Where an Engram layer's rows come from: in process (trainable or memory-mapped) or a memstore
(`client.RemoteEmbedding`, through a daemon or a cluster).

A source is called with row ids [B, T, heads] of its layer and returns rows [B, T, heads, dim]
in float32. Both kinds start from the same rows for the same table (the memstore's
deterministic init), so the same weights and ids give the same outputs with either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from client import PrefetchHandle, RemoteEmbedding, TableClient
from memstore.dtypes import DType
from memstore.layout import EngramLayout
from memstore.rowgen import initial_rows
from memstore.table import Table


class RowSource(Protocol):
    """One Engram layer's table, as seen by the model."""

    def __call__(self, row_ids: torch.Tensor) -> torch.Tensor: ...


class LocalTable(nn.Module):
    """The layer's table in process, as a sparse nn.Embedding (trainable, sparse gradients)."""

    def __init__(self, layout: EngramLayout, layer_id: int, seed: int, init_std: float = 1.0) -> None:
        super().__init__()
        num_rows = layout.num_rows(layer_id)
        self.embedding = nn.Embedding(num_rows, layout.dim, sparse=True)
        values = initial_rows(seed, layer_id, 0, num_rows, layout.dim, init_std, DType.FLOAT32)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.from_numpy(values))

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(row_ids)  # [B, T, heads, dim]


class MappedTable:
    """The layer's rows read in process from a memstore table directory (memory-mapped, read-only)."""

    def __init__(self, table: Table, layer_id: int) -> None:
        self.table = table
        self.layer_id = layer_id

    def __call__(self, row_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.gather(self.layer_id, row_ids.reshape(-1).cpu().numpy())  # [N, stored width] raw
        dtype = self.table.manifest.dtype
        stored = dtype.to_torch(rows).reshape(*row_ids.shape, -1).to(row_ids.device)  # [B, T, heads, stored width]
        return dtype.dequantize(stored)  # [B, T, heads, dim] float32


class TrackedRows:
    """A step's prefetched rows fed through the layers' `RemoteEmbedding`s, so that training on
    them accumulates the rows' gradients in those modules, as their own lookups do; push them
    with `take_gradients()` (model.train does)."""

    def __init__(self, prefetched: PrefetchHandle, tables: Mapping[int, RemoteEmbedding]) -> None:
        self.prefetched = prefetched
        self.tables = tables

    def rows(self, layer_id: int) -> torch.Tensor:
        ids = self.prefetched.row_ids[layer_id]  # [B, T, heads]
        return self.tables[layer_id](ids, rows=self.prefetched.rows(layer_id))  # [B, T, heads, dim] float32


def local_tables(layout: EngramLayout, seed: int) -> dict[int, RowSource]:
    """An in-process table per Engram layer, initialised exactly as `memstore create` would."""
    return {layer_id: LocalTable(layout, layer_id, seed) for layer_id in layout.layer_ids}


def memstore_tables(
    client: TableClient,
    layout: EngramLayout,
    track_gradients: bool = False,
    device: torch.device | str | None = None,
) -> dict[int, RemoteEmbedding]:
    """A `RemoteEmbedding` per Engram layer, all through one client, its rows decoded on `device`;
    with `track_gradients`, the rows' gradients accumulate in it for pushing."""
    return {
        layer_id: RemoteEmbedding(client, layer_id, requires_grad=track_gradients, device=device)
        for layer_id in layout.layer_ids
    }
