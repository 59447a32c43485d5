"""An Engram layer's table served by a memstore, as a module the model holds.

`RemoteEmbedding(client, layer_id)` looks its rows up through a `TableClient` (one daemon or a
cluster) when called, and decodes them where the model is:

    table = RemoteEmbedding(client, layer_id, requires_grad=True)
    rows = table(row_ids)          # [*row_ids.shape, dim] float32, a leaf of autograd
    loss.backward()                # the rows' gradient accumulates in the module
    table.push(step_id=step)       # summed per row and sent to the table's optimizer

Rows fetched ahead by a `Prefetcher` go through the module too, `table(row_ids, rows=handle.rows(layer_id))`,
so their gradients land in the same place. `take_gradients()` hands the gradient over instead
of pushing it (to a `Pusher`, which pushes every layer of a step with bounded staleness).

The module has no parameters: the rows live in the memstore, and the memstore's optimizer
updates them. Gradients are kept per lookup, in lookup order, and summed per row by
`sum_duplicate_rows`, the sum `MemstoreClient.push` makes, so pushing through the module sends
the same bits as pushing every occurrence.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from torch import nn

from client.client import PushAck, sum_duplicate_rows
from client.protocol import TableClient
from memstore.errors import InvalidArgumentError


class _Lookup:
    """The ids of one forward call, and the gradient backward gave its rows (None until then)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids  # [N] int64, CPU
        self.grad: torch.Tensor | None = None  # [N, dim] float32

    def add(self, grad: torch.Tensor) -> None:
        # A tensor hook: called once per backward with the rows' whole gradient (autograd sums the
        # uses of a tensor before its hook); a second backward through the same rows adds to it.
        grad = grad.detach().reshape(len(self.ids), -1)
        self.grad = grad if self.grad is None else self.grad + grad


class RemoteEmbedding(nn.Module):
    """One Engram layer's rows, served by a memstore: forward(row_ids) -> rows [*row_ids.shape, dim] float32.

    The rows land on `device` (default: the row ids' device); the stored bytes travel and are
    decoded there. With `requires_grad`, rows returned while autograd records are leaves that
    require grad, and backward accumulates their gradient here until `take_gradients()` or `push()`.
    """

    def __init__(
        self,
        client: TableClient,
        layer_id: int,
        *,
        requires_grad: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.layer_id = layer_id
        self.requires_grad = requires_grad
        self.device = None if device is None else torch.device(device)
        self.rows_fetched = 0  # rows looked up by forward (prefetched rows are the prefetcher's count)
        self.lookup_seconds = 0.0
        self._lookups: list[_Lookup] = []
        self._lock = threading.Lock()

    def forward(self, row_ids: torch.Tensor | np.ndarray, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [*row_ids.shape, dim] float32 of this layer for `row_ids` (any integer shape).

        `rows`: the same rows fetched ahead (a `PrefetchHandle.rows(layer_id)`), used instead of a
        lookup; they take part in autograd the same way.
        """
        ids = torch.as_tensor(row_ids)
        if rows is None:
            start = time.perf_counter()
            stored = self.client.lookup(self.layer_id, ids.cpu())  # [*shape, stored width], CPU
            # The stored bytes travel (a quarter of float32's for fp8/int8) and decode where the model is.
            device = self.device or ids.device
            rows = self.client.describe().dtype.dequantize(stored.to(device))  # [*shape, dim] float32
            self.lookup_seconds += time.perf_counter() - start
            self.rows_fetched += ids.numel()
        else:
            if tuple(rows.shape[:-1]) != tuple(ids.shape):
                raise InvalidArgumentError(
                    f"layer {self.layer_id}: rows {tuple(rows.shape)} are not the rows of ids {tuple(ids.shape)}; "
                    "pass the prefetched rows of these very ids"
                )
            rows = rows.float()  # [*shape, dim]
        if self.requires_grad and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)  # a leaf on the model's device
            lookup = _Lookup(ids.detach().to("cpu", torch.int64).reshape(-1))
            rows.register_hook(lookup.add)
            with self._lock:
                self._lookups.append(lookup)
        return rows

    def take_gradients(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct row ids ascending [U], their gradients summed [U, dim] float32) of the rows
        returned since the last call that got a gradient; the module forgets them."""
        with self._lock:
            lookups, self._lookups = self._lookups, []
        done = [lookup for lookup in lookups if lookup.grad is not None]
        if not done:
            dim = self.client.describe().layout.dim
            return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
        ids = torch.cat([lookup.ids for lookup in done]).numpy()  # [N], lookup order
        grads = torch.cat([lookup.grad for lookup in done]).to("cpu", torch.float32).numpy()  # [N, dim]
        return sum_duplicate_rows(ids, grads)

    def push(self, step_id: int = 0, lr_scale: float | None = None, timeout: float | None = None) -> PushAck:
        """Send the accumulated gradients to the table's optimizer (`TableClient.push`) and forget them.

        `step_id` (> 0, increasing) makes the push safe to retry; `lr_scale` multiplies the table's rate.
        """
        ids, grads = self.take_gradients()
        return self.client.push(self.layer_id, ids, grads, step_id=step_id, lr_scale=lr_scale, timeout=timeout)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, requires_grad={self.requires_grad}, device={self.device}"
