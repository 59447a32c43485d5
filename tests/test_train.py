"""Training through the memstore learns exactly as training the table in process (synchronous pushes)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from client import MemstoreClient, Prefetcher, PushConfig, Pusher, sum_duplicate_rows
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.live import LiveConfig, LiveTable
from memstore.optim import apply_update
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from model import train as train_module
from model.train import TableSource, TrainConfig, TrainResult, build_model, train
from tests.helpers import SMALL_ENGRAM, small_lm_config
from tests.reference_train import ServerArithmetic

# cuBLAS picks deterministic reductions only with a fixed workspace, read when its first handle is
# made: set before any test of the session runs a matmul on a GPU (no effect on the CPU).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# What the comparison can differ by, and so its tolerance: zero. The reference trains the same
# model in process with the daemon's own arithmetic (tests/reference_train.py: the client's
# duplicate-id sums, then memstore.optim.apply_update in float32, lr times the schedule's factor in
# float64 as the daemon scales it). The dense weights start equal, both runs draw the same batches,
# and a memstore run's rows arrive as the same float32 values an in-process embedding gathers, so
# forward and backward are the same float32 operations on the same inputs in one process (the
# same CPU code path, whatever ATEN_CPU_CAPABILITY picks), and the pushed gradients are the
# in-process ones, summed in the same order by the same function. Every loss and every row update
# must therefore be identical bits, on any CPU. That apply_update steps as the PyTorch optimizers
# train() uses for in-process tables is checked step by step further down (and in test_optim.py).
#
# Comparing at zero is only worth something if a small fault moves the result: the companion test
# below runs the daemon's table at a learning rate 0.1% off and checks this comparison fails.

# Every hyperparameter away from PyTorch's defaults, so that one the in-process optimizer drops shows.
OPTIMIZERS = {
    "sgd": OptimizerConfig(OptimizerKind.SGD, lr=0.5),
    "adagrad": OptimizerConfig(OptimizerKind.ADAGRAD, lr=0.05, eps=1e-6, initial_accumulator_value=0.1),
    "adam": OptimizerConfig(OptimizerKind.ADAM, lr=0.015, betas=(0.8, 0.99), eps=1e-6),
}
LAYER = SMALL_ENGRAM.layer_ids[0]
ROWS_KEY = f"blocks.{LAYER}.engram.table.embedding.weight"


def _config(optimizer: OptimizerConfig) -> TrainConfig:
    return TrainConfig(steps=12, batch_size=4, eval_every=6, eval_batches=1, table_optimizer=optimizer)


def _train_in_process(lm_data, optimizer: OptimizerConfig, monkeypatch) -> tuple[dict, TrainResult, np.ndarray]:
    """(initial state dict, result, trained rows of LAYER) of in-process training with the daemon's arithmetic."""
    torch.manual_seed(0)
    local = build_model(small_lm_config(lm_data.vocab_size), lm_data, TableSource.LOCAL)
    initial = {k: v.clone() for k, v in local.state_dict().items()}
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_torch_table_optimizer", ServerArithmetic)
        result = train(local, lm_data, _config(optimizer), progress=False)
    return initial, result, local.blocks[LAYER].engram.table.embedding.weight.detach().numpy().copy()


def _train_through_memstore(
    lm_data, path, daemon_factory, table_optimizer: OptimizerConfig, initial: dict, prefetch: bool
) -> tuple[TrainResult, np.ndarray]:
    """(result, trained rows of LAYER) of training with the table in a daemon whose optimizer is `table_optimizer`."""
    config = _config(table_optimizer)
    manifest = Manifest(
        layout=SMALL_ENGRAM.layout(), dtype=DType.FLOAT32, seed=SMALL_ENGRAM.seed, optimizer=table_optimizer
    )
    table = create_table(path, manifest)
    with (
        LiveTable.open(table, config=LiveConfig(durability=Durability.OS)) as live,
        MemstoreClient(daemon_factory(live).address) as client,
    ):
        remote = build_model(
            small_lm_config(lm_data.vocab_size), lm_data, TableSource.MEMSTORE, client, track_gradients=not prefetch
        )
        remote.load_state_dict(initial, strict=False)  # the same dense weights
        layers = SMALL_ENGRAM.layer_ids
        prefetcher = Prefetcher(client, remote.row_ids, layers) if prefetch else None
        try:
            with Pusher(client, layers, PushConfig(max_in_flight_steps=0)) as pusher:
                result = train(remote, lm_data, config, progress=False, prefetcher=prefetcher, pusher=pusher)
        finally:
            if prefetcher is not None:
                prefetcher.close()
        assert live.version == config.steps * len(layers)
        rows = live.gather(LAYER, np.arange(SMALL_ENGRAM.layout().num_rows(LAYER)))[0]
    return result, rows


def _assert_same_training(
    remote: TrainResult,
    remote_rows: np.ndarray,
    reference: TrainResult,
    reference_rows: np.ndarray,
    initial: np.ndarray,
) -> None:
    """Identical losses and identical row updates (trained minus initial), tolerance zero (see the top)."""
    np.testing.assert_array_equal(np.array(remote.train_loss), np.array(reference.train_loss))
    np.testing.assert_array_equal(np.array(remote.val_loss), np.array(reference.val_loss))
    reference_update = reference_rows - initial
    touched = np.flatnonzero(np.abs(reference_update).max(axis=1) > 0)
    assert touched.size > 0  # the reference trained the table at all
    np.testing.assert_array_equal(remote_rows - initial, reference_update)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "lookup"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_memstore_training_matches_in_process_training(
    lm_data, tmp_path, daemon_factory, monkeypatch, name, prefetch
) -> None:
    optimizer = OPTIMIZERS[name]
    initial, reference, reference_rows = _train_in_process(lm_data, optimizer, monkeypatch)
    remote, remote_rows = _train_through_memstore(lm_data, tmp_path / "t", daemon_factory, optimizer, initial, prefetch)
    _assert_same_training(remote, remote_rows, reference, reference_rows, initial[ROWS_KEY].numpy())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_comparison_catches_a_learning_rate_off_by_a_tenth_of_a_percent(
    lm_data, tmp_path, daemon_factory, monkeypatch, name
) -> None:
    optimizer = OPTIMIZERS[name]
    initial, reference, reference_rows = _train_in_process(lm_data, optimizer, monkeypatch)
    off = replace(optimizer, lr=optimizer.lr * 1.001)
    remote, remote_rows = _train_through_memstore(lm_data, tmp_path / "t", daemon_factory, off, initial, prefetch=True)
    with pytest.raises(AssertionError):
        _assert_same_training(remote, remote_rows, reference, reference_rows, initial[ROWS_KEY].numpy())
    # The row updates alone reveal it, not only the losses.
    initial_rows = initial[ROWS_KEY].numpy()
    assert not np.array_equal(remote_rows - initial_rows, reference_rows - initial_rows)


# The other half of "as in process": the PyTorch optimizer that train() builds for in-process
# tables (model.train._torch_table_optimizer) must take the steps apply_update takes. Checked at
# every step of a real training run, from torch's own rows, state and coalesced gradient, so
# errors cannot compound and each step has a bound of its own (u = 2^-24, float32's unit roundoff):
# - state (Adagrad's sum, Adam's moments): the same correctly rounded operations, identical bits.
# - Adagrad and Adam rows: torch's CPU sqrt may be 1 ulp (2u relative) off, and with the eps added
#   the denominators differ by at most 4u relative; both sides round the quotient (u each), maybe
#   the product with the step size (u each, Adam, or an unfused axpy) and the sum into the row
#   (half an ulp of the new row each): |diff| <= 8u |update| + ulp(new row).
# - SGD rows: torch adds an uncoalesced gradient one occurrence at a time (k roundings of half an
#   ulp of at most |w0| + lr sum|g_i|), the daemon once with the k gradients summed (k - 1
#   roundings of at most u sum|g_i|, times lr): |diff| <= k ulp(|w0| + lr sum|g_i|) + k u lr sum|g_i|.
_TORCH_TABLE_OPTIMIZER = train_module._torch_table_optimizer
_U = 2.0**-24


@dataclass
class _Before:
    """One table's rows, state and gradient just before a step, by coalesced row id."""

    param: torch.nn.Parameter
    ids: np.ndarray  # [N] distinct, ascending
    grads: np.ndarray  # [N, dim] torch's coalesced sums
    occurrences: np.ndarray  # [N, 1] lookups per row this step
    magnitude: np.ndarray  # [N, dim] sum of |gradient| over the lookups (float64)
    rows: np.ndarray  # [N, dim]
    state: dict[str, np.ndarray]  # torch's state of the rows
    lr: float


class _StepChecker:
    """Stands in for train()'s table optimizer: the real torch optimizer, every step checked.

    Counts state that differs from apply_update's (including the state of rows on their first
    step, which must be the daemon's initial state) and keeps the worst row error against its
    bound (above the class)."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        given: OptimizerConfig,
        expected: OptimizerConfig,
        train_config: TrainConfig,
        lr_factor: float,
    ) -> None:
        # The torch optimizer as train() asks for it (`given`), checked against the daemon's `expected`.
        self.inner = _TORCH_TABLE_OPTIMIZER(params, replace(given, lr=given.lr * lr_factor))
        self.config = expected
        self.train_config = train_config
        self.param_groups = self.inner.param_groups
        self.steps = 0
        self.worst = 0.0  # largest |torch - apply_update| / bound over all row elements and steps
        self.state_mismatches = 0
        self._stepped = {id(p): np.zeros(p.shape[0], dtype=bool) for g in self.param_groups for p in g["params"]}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def _before(self, param: torch.nn.Parameter, lr: float) -> _Before:
        lookups = param.grad._indices()[0].numpy()
        grad = param.grad.coalesce()
        ids = grad.indices()[0].numpy()
        counted, occurrences = np.unique(lookups, return_counts=True)
        summed_ids, magnitude = sum_duplicate_rows(lookups, np.abs(param.grad._values().numpy().astype(np.float64)))
        assert np.array_equal(counted, ids) and np.array_equal(summed_ids, ids)
        fresh = self.config.initial_state(len(ids), param.shape[1])
        torch_state = self.inner.state[param]  # SparseAdam creates its state on its first step
        state = {name: torch_state[name][ids].numpy().copy() if name in torch_state else fresh[name] for name in fresh}
        first = ~self._stepped[id(param)][ids]
        self.state_mismatches += sum(not np.array_equal(state[n][first], fresh[n][first]) for n in state)
        self._stepped[id(param)][ids] = True
        rows = param.detach()[ids].numpy().copy()
        return _Before(param, ids, grad.values().numpy().copy(), occurrences[:, None], magnitude, rows, state, lr)

    def _check(self, before: _Before) -> None:
        config = replace(self.config, lr=before.lr)
        ours, our_state = apply_update(config, before.rows, before.state, before.grads, self.steps)
        theirs = before.param.detach()[before.ids].numpy()
        torch_state = self.inner.state[before.param]
        self.state_mismatches += sum(
            not np.array_equal(values, torch_state[name][before.ids].numpy()) for name, values in our_state.items()
        )
        if config.kind is OptimizerKind.SGD:
            k, lr_sum = before.occurrences, before.lr * before.magnitude
            bound = k * np.spacing((np.abs(before.rows) + lr_sum).astype(np.float32)) + k * _U * lr_sum
        else:
            bound = 8 * _U * np.abs(theirs - before.rows) + np.spacing(np.maximum(np.abs(theirs), np.abs(ours)))
        self.worst = max(self.worst, float((np.abs(theirs - ours) / bound).max()))

    def step(self) -> None:
        self.steps += 1
        # The learning rate the daemon applies: its table's lr times the schedule's factor of the step
        # (what train() pushes as lr_scale), not whatever rate the torch optimizer was given.
        lr = self.config.lr * train_module._lr_at(self.steps - 1, self.train_config)
        pending = [
            self._before(param, lr)
            for group in self.param_groups
            for param in group["params"]
            if param.grad is not None
        ]
        self.inner.step()
        for before in pending:
            self._check(before)


def _train_with_checked_torch_optimizer(
    lm_data, optimizer: OptimizerConfig, monkeypatch, lr_factor: float = 1.0
) -> _StepChecker:
    """In-process training with train()'s own table optimizer (given lr_factor times the rate), each step checked."""
    checkers: list[_StepChecker] = []

    def build(params, config):
        checkers.append(_StepChecker(params, config, optimizer, _config(optimizer), lr_factor))
        return checkers[-1]

    torch.manual_seed(0)
    local = build_model(small_lm_config(lm_data.vocab_size), lm_data, TableSource.LOCAL)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_torch_table_optimizer", build)
        train(local, lm_data, _config(optimizer), progress=False)
    (checker,) = checkers
    assert checker.steps == _config(optimizer).steps
    return checker


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_in_process_tables_step_as_the_daemon_does(lm_data, monkeypatch, name) -> None:
    checker = _train_with_checked_torch_optimizer(lm_data, OPTIMIZERS[name], monkeypatch)
    assert checker.state_mismatches == 0
    assert checker.worst <= 1.0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_step_check_catches_a_learning_rate_off_by_a_tenth_of_a_percent(lm_data, monkeypatch, name) -> None:
    checker = _train_with_checked_torch_optimizer(lm_data, OPTIMIZERS[name], monkeypatch, lr_factor=1.001)
    assert checker.worst > 1.0


# The same comparison with the model on a GPU: training through the daemon, rows prefetched onto
# the GPU (pinned buffers, side stream) and gradients pushed back from it, against the table trained
# in process on the same GPU with the daemon's arithmetic. What can differ, and so the tolerance:
# again zero. Both runs do the same float32 kernels on the same values on one device; the only
# source of different bits on a GPU is a kernel whose reduction order varies from run to run
# (atomics, cuBLAS split reductions, cuDNN algorithm choice, the fused attention kernels), and
# those are ruled out: deterministic algorithms are required (an op without one raises instead of
# passing silently), cuBLAS has a fixed workspace (above), and attention runs on the math backend.
# The rows' gradients leave the GPU by an exact copy, and the daemon's update of them is the CPU
# arithmetic the tests above pin down; so the row updates must be equal bit for bit, as on the CPU.
# CPU-vs-GPU runs are not compared bit for bit: the GPU's matmuls and convolution sum in another
# order (and cuDNN may use TF32), so their gradients differ by rounding that 20 steps of training
# compound; what carries over from the CPU is the daemon's arithmetic on whatever gradients arrive.
# The CPU run of the same test checks the harness itself on any machine.


class _ServerArithmeticOnDevice(ServerArithmetic):
    """ServerArithmetic for tables on any device: the same step on a host copy of each table (the copies
    both ways are exact), written back; the host copies carry the optimizer state across steps."""

    def __init__(self, params: list[torch.nn.Parameter], config: OptimizerConfig) -> None:
        super().__init__(params, config)
        self._host = {
            id(p): torch.nn.Parameter(p.detach().cpu().clone()) for g in self.param_groups for p in g["params"]
        }

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        on_device = [list(group["params"]) for group in self.param_groups]
        for group in self.param_groups:
            hosts = [self._host[id(param)] for param in group["params"]]
            for host, param in zip(hosts, group["params"]):
                host.grad = None if param.grad is None else param.grad.cpu()  # uncoalesced, in lookup order
            group["params"] = hosts
        try:
            super().step()
        finally:
            for group, params in zip(self.param_groups, on_device):
                group["params"] = params
                for param in params:
                    param.copy_(self._host[id(param)])


def _train_on(device: str, lm_data, path, daemon_factory, monkeypatch) -> tuple:
    """(reference result, its rows, memstore result, its rows, initial rows) of 20 steps on `device`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from client import PrefetchConfig

    optimizer = OPTIMIZERS["adam"]
    config = replace(_config(optimizer), steps=20, eval_every=10)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            torch.manual_seed(0)
            local = build_model(small_lm_config(lm_data.vocab_size), lm_data, TableSource.LOCAL, device=device)
            initial = {k: v.clone() for k, v in local.state_dict().items()}
            with monkeypatch.context() as patch:
                patch.setattr(train_module, "_torch_table_optimizer", _ServerArithmeticOnDevice)
                reference = train(local, lm_data, config, progress=False)
            reference_rows = local.blocks[LAYER].engram.table.embedding.weight.detach().cpu().numpy()

            manifest = Manifest(
                layout=SMALL_ENGRAM.layout(), dtype=DType.FLOAT32, seed=SMALL_ENGRAM.seed, optimizer=optimizer
            )
            layers = SMALL_ENGRAM.layer_ids
            with (
                LiveTable.open(create_table(path, manifest), config=LiveConfig(durability=Durability.OS)) as live,
                MemstoreClient(daemon_factory(live).address) as client,
            ):
                lm_config = small_lm_config(lm_data.vocab_size)
                remote = build_model(lm_config, lm_data, TableSource.MEMSTORE, client, device=device)
                remote.load_state_dict(initial, strict=False)  # the same dense weights
                with (
                    Prefetcher(client, remote.row_ids, layers, PrefetchConfig(device=device)) as prefetcher,
                    Pusher(client, layers, PushConfig(max_in_flight_steps=0)) as pusher,
                ):
                    remote_result = train(remote, lm_data, config, progress=False, prefetcher=prefetcher, pusher=pusher)
                assert live.version == config.steps * len(layers)
                remote_rows = live.gather(LAYER, np.arange(SMALL_ENGRAM.layout().num_rows(LAYER)))[0]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert next(remote.parameters()).device.type == torch.device(device).type
    # The model's stream's waits for the rows' copies: reported per layer on CUDA, none on the CPU.
    assert set(remote_result.gpu_stall_seconds) <= set(layers)
    assert all(s >= 0 for s in remote_result.gpu_stall_seconds.values())
    assert device == "cuda" or not remote_result.gpu_stall_seconds
    return reference, reference_rows, remote_result, remote_rows, initial[ROWS_KEY].cpu().numpy()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_training_on_a_device_through_the_prefetcher_matches_in_process(
    lm_data, tmp_path, daemon_factory, monkeypatch, device
) -> None:
    reference, reference_rows, remote, remote_rows, initial = _train_on(
        device, lm_data, tmp_path / "t", daemon_factory, monkeypatch
    )
    assert len(remote.train_loss) == 20
    _assert_same_training(remote, remote_rows, reference, reference_rows, initial)
