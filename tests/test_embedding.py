"""RemoteEmbedding: a served table as an nn.Module, its rows' gradients accumulated and pushed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client import MemstoreClient, Prefetcher, RemoteEmbedding, sum_duplicate_rows
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError
from memstore.live import LiveConfig, LiveTable
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from tests.helpers import FAST_FAIL, SMALL_LAYOUT

LAYER = SMALL_LAYOUT.layer_ids[0]
DIM = SMALL_LAYOUT.dim
# Repeats within and across rows: 5 three times, 9 twice.
IDS = torch.tensor([[5, 9, 2], [5, 5, 9]])
# Small integers: every sum and every SGD step below is exact in float32, in any order.
WEIGHTS = torch.arange(1, 7, dtype=torch.float32).reshape(2, 3, 1) * torch.ones(2, 3, DIM)


@pytest.fixture
def served(tmp_path: Path, daemon_factory):
    """(client, LiveTable) of a float32 table trained by SGD with lr 1 (a push of g subtracts g)."""
    optimizer = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=1, optimizer=optimizer, init_std=0.0)
    live = LiveTable.open(create_table(tmp_path / "t", manifest), config=LiveConfig(durability=Durability.OS))
    try:
        with MemstoreClient(daemon_factory(live).address, FAST_FAIL) as client:
            yield client, live
    finally:
        live.close()


def _expected_gradients() -> tuple[np.ndarray, np.ndarray]:
    return sum_duplicate_rows(IDS.reshape(-1).numpy(), WEIGHTS.reshape(-1, DIM).numpy())


def test_backward_accumulates_and_push_applies_the_summed_gradients(served) -> None:
    client, live = served
    table = RemoteEmbedding(client, LAYER, requires_grad=True)
    rows = table(IDS)
    assert rows.shape == (2, 3, DIM) and rows.dtype == torch.float32 and rows.requires_grad
    (rows * WEIGHTS).sum().backward()
    ack = table.push(step_id=1)
    assert ack.rows == 3 and ack.version == 1
    ids, grads = _expected_gradients()
    np.testing.assert_array_equal(live.gather(LAYER, ids)[0], -grads)  # rows started at 0; SGD lr 1
    assert table.take_gradients()[0].size == 0  # pushed once, then forgotten


def test_gradients_add_up_over_lookups_and_backward_passes(served) -> None:
    client, _ = served
    table = RemoteEmbedding(client, LAYER, requires_grad=True)
    first = table(IDS)
    loss = (first * WEIGHTS).sum()
    loss.backward(retain_graph=True)
    loss.backward()  # twice through the same rows: twice the gradient
    (table(IDS[:1]) * WEIGHTS[:1]).sum().backward()
    ids, grads = table.take_gradients()
    occurrences = torch.cat([IDS.reshape(-1), IDS[:1].reshape(-1)]).numpy()
    values = torch.cat([2 * WEIGHTS.reshape(-1, DIM), WEIGHTS[:1].reshape(-1, DIM)]).numpy()
    expected_ids, expected = sum_duplicate_rows(occurrences, values)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(grads, expected)


def test_prefetched_rows_feed_the_module_and_train_it_alike(served) -> None:
    client, _ = served
    table = RemoteEmbedding(client, LAYER, requires_grad=True)
    with Prefetcher(client, lambda step: {LAYER: IDS}, (LAYER,)) as prefetcher, prefetcher.submit(0) as handle:
        prefetched = handle.rows(LAYER)
        rows = table(handle.row_ids[LAYER], rows=prefetched)
        np.testing.assert_array_equal(rows.detach().numpy(), table(IDS).detach().numpy())
        (rows * WEIGHTS).sum().backward()
        with pytest.raises(InvalidArgumentError, match="not the rows of ids"):
            table(IDS[:1], rows=prefetched)
    assert table.rows_fetched == IDS.numel()  # the one lookup; prefetched rows are the prefetcher's
    ids, grads = table.take_gradients()
    expected_ids, expected = _expected_gradients()
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(grads, expected)


def test_rows_need_no_gradient_unless_asked_or_recorded(served) -> None:
    client, _ = served
    frozen = RemoteEmbedding(client, LAYER)
    assert not frozen(IDS).requires_grad
    trained = RemoteEmbedding(client, LAYER, requires_grad=True)
    with torch.no_grad():
        assert not trained(IDS).requires_grad
    for table in (frozen, trained):
        ids, grads = table.take_gradients()
        assert ids.shape == (0,) and grads.shape == (0, DIM)
    assert list(trained.parameters()) == [] and "layer_id=" in repr(trained)
