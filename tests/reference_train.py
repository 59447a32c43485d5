"""In-process table training with the memstore's own arithmetic, the reference for test_train.py.

`ServerArithmetic` is a torch optimizer for sparse embedding tables that does, on the in-process
gradients, exactly what a training client and the daemon do on the pushed ones: repeated ids are
summed by the client's `sum_duplicate_rows`, then `memstore.optim.apply_update` steps the rows in
float32 with the layer's step count and the scheduled learning rate (table lr times the schedule's
factor, in float64, as the daemon scales it). Whether those operations match PyTorch's own
optimizers is test_optim.py's question; here the only thing left to differ from a memstore run is
the model's forward and backward pass.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from client import sum_duplicate_rows
from memstore.optim import apply_update
from memstore.tabledir.optimizer import OptimizerConfig


class ServerArithmetic(torch.optim.Optimizer):
    """Steps sparse-gradient parameters [rows, dim] with `apply_update` under `config`."""

    def __init__(self, params: list[torch.nn.Parameter], config: OptimizerConfig) -> None:
        super().__init__(params, {"lr": config.lr})
        self.config = config

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every parameter that has a gradient, as one push of its layer would apply it."""
        for group in self.param_groups:
            config = replace(self.config, lr=group["lr"]) if group["lr"] != self.config.lr else self.config
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad  # uncoalesced: one entry per occurrence, in lookup order, as the client sees it
                ids, summed = sum_duplicate_rows(grad._indices()[0].numpy(), grad._values().numpy())
                state = self.state[param]
                if not state:
                    state["slots"] = self.config.initial_state(param.shape[0], param.shape[1])
                    state["step"] = 0
                state["step"] += 1
                slots = {name: values[ids] for name, values in state["slots"].items()}
                rows = param.detach().numpy()
                new_rows, new_slots = apply_update(config, rows[ids], slots, summed, state["step"])
                rows[ids] = new_rows
                for name, values in new_slots.items():
                    state["slots"][name][ids] = values
