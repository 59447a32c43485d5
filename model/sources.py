"""Where an Engram layer's rows come from: in process (trainable or memory-mapped) or the memstore daemon.

A source is called with row ids [B, T, heads] of its layer and returns rows [B, T, heads, dim]
in float32. Both kinds start from the same rows for the same table (the memstore's
deterministic init), so the same weights and ids give the same outputs with either.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch
from torch import nn

from client import ClusterClient, MemstoreClient, PrefetchHandle
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


class MemstoreTable:
    """The layer's table in a memstore daemon, looked up when the layer needs it.

    With `track_gradients`, fetched rows are leaves that require grad, and after backward
    `row_gradients()` returns (row ids [N], gradients [N, dim]) of every row fetched since the
    last call, repeats included: what a training client pushes back (the push sums repeats).
    """

    def __init__(
        self,
        client: MemstoreClient | ClusterClient,
        layer_id: int,
        track_gradients: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self.client = client
        self.layer_id = layer_id
        self.track_gradients = track_gradients
        self.device = None if device is None else torch.device(device)  # None: the row ids' device
        self.rows_fetched = 0
        self.lookup_seconds = 0.0
        self._fetched: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, row_ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        stored = self.client.lookup(self.layer_id, row_ids.cpu())  # [B, T, heads, stored width], host
        # The stored bytes travel (a quarter of float32's for fp8/int8) and decode where the model is.
        device = self.device or row_ids.device
        rows = self.client.describe().dtype.dequantize(stored.to(device))  # [B, T, heads, dim] float32
        self.lookup_seconds += time.perf_counter() - start
        self.rows_fetched += row_ids.numel()
        if self.track_gradients and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)  # a leaf on the model's device
            self._fetched.append((row_ids.reshape(-1).cpu(), rows))
        return rows

    def row_gradients(self) -> tuple[np.ndarray, np.ndarray]:
        """(row ids [N], gradients [N, dim]) of the rows fetched since the last call, repeats included."""
        fetched = [(ids, rows.grad.reshape(len(ids), -1)) for ids, rows in self._fetched if rows.grad is not None]
        self._fetched.clear()
        if not fetched:
            return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
        return torch.cat([i for i, _ in fetched]).numpy(), torch.cat([g for _, g in fetched]).cpu().numpy()


class TrackedRows:
    """A step's prefetched rows made trainable: each layer's rows become a float32 leaf that
    requires grad, and after backward `row_gradients()` maps each layer to (row ids [N],
    gradients [N, dim]), repeats included, ready to push."""

    def __init__(self, prefetched: PrefetchHandle) -> None:
        self.prefetched = prefetched
        self._leaves: dict[int, torch.Tensor] = {}

    def rows(self, layer_id: int) -> torch.Tensor:
        leaf = self.prefetched.rows(layer_id).float().detach().requires_grad_(True)  # [B, T, heads, dim]
        self._leaves[layer_id] = leaf
        return leaf

    def row_gradients(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{layer: (row ids [N], gradients [N, dim])} for the layers whose rows got gradients."""
        grads = {}
        for layer, leaf in self._leaves.items():
            if leaf.grad is not None:
                ids = self.prefetched.row_ids[layer].reshape(-1)  # [N]
                grads[layer] = (ids, leaf.grad.reshape(len(ids), -1).cpu().numpy())  # [N], [N, dim]
        return grads


def local_tables(layout: EngramLayout, seed: int) -> dict[int, RowSource]:
    """An in-process table per Engram layer, initialised exactly as `memstore create` would."""
    return {layer_id: LocalTable(layout, layer_id, seed) for layer_id in layout.layer_ids}


def memstore_tables(
    client: MemstoreClient | ClusterClient,
    layout: EngramLayout,
    track_gradients: bool = False,
    device: torch.device | str | None = None,
) -> dict[int, RowSource]:
    """A memstore-backed table per Engram layer, all through one client, its rows decoded on `device`."""
    return {layer_id: MemstoreTable(client, layer_id, track_gradients, device) for layer_id in layout.layer_ids}
