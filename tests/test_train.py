"""Training through the memstore learns exactly as training the table in process (synchronous pushes)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from client import MemstoreClient, Prefetcher, PushConfig, Pusher
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.live import LiveConfig, LiveTable
from memstore.manifest import Manifest
from memstore.optim import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from model import train as train_module
from model.train import TableSource, TrainConfig, TrainResult, build_model, train
from tests.helpers import SMALL_ENGRAM, small_lm_config
from tests.reference_train import ServerArithmetic

# What the comparison can differ by, and so its tolerance: zero. The reference trains the same
# model in process with the daemon's own arithmetic (tests/reference_train.py: the client's
# duplicate-id sums, then memstore.optim.apply_update in float32, lr times the schedule's factor in
# float64 as the daemon scales it). The dense weights start equal, both runs draw the same batches,
# and a memstore run's rows arrive as the same float32 values an in-process embedding gathers, so
# forward and backward are the same float32 operations on the same inputs in one process (the
# same CPU code path, whatever ATEN_CPU_CAPABILITY picks), and the pushed gradients are the
# in-process ones, summed in the same order by the same function. Every loss and every row update
# must therefore be identical bits, on any CPU. Whether apply_update matches PyTorch's own sparse
# optimizers is test_optim.py's concern (bit for bit with a correctly rounded sqrt).
#
# Comparing at zero is only worth something if a small fault moves the result: the companion test
# below runs the daemon's table at a learning rate 0.1% off and checks this comparison fails.
OPTIMIZERS = {
    "sgd": OptimizerConfig(OptimizerKind.SGD, lr=0.5),
    "adagrad": OptimizerConfig(OptimizerKind.ADAGRAD, lr=0.05, eps=1e-10),
    "adam": OptimizerConfig(OptimizerKind.ADAM, lr=0.015),
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
    # The update itself moved, not just the losses: most touched elements differ from the reference's.
    update, reference_update = remote_rows - initial[ROWS_KEY].numpy(), reference_rows - initial[ROWS_KEY].numpy()
    touched = reference_update != 0
    assert np.mean(update[touched] != reference_update[touched]) > 0.5
