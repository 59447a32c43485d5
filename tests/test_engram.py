"""The Engram module: shapes, causality, gradients into table rows, local and memstore sources agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import MemstoreClient
from client.client import sum_duplicate_rows
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.manifest import Manifest
from memstore.table import Table
from model.engram import Engram, EngramConfig, ShortConv
from model.sources import LocalTable, MappedTable, MemstoreTable

CONFIG = EngramConfig(
    layer_ids=(1,), vocab_size_per_ngram=(300, 400), max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16
)
HIDDEN = 24


def _row_ids(config: EngramConfig, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    layout = config.layout()
    layer = config.layer_ids[0]
    rng = np.random.default_rng(seed)
    local = rng.integers(0, np.array(layout.head_sizes(layer)), size=(batch, seq, config.num_heads))  # [B, T, heads]
    return torch.from_numpy(local + np.array(layout.head_offsets(layer)))


def _engram(config: EngramConfig = CONFIG, seed: int = 0) -> Engram:
    torch.manual_seed(seed)
    table = LocalTable(config.layout(), config.layer_ids[0], config.seed)
    module = Engram(config.layer_ids[0], config, HIDDEN, table)
    with torch.no_grad():  # a non-zero convolution, so the tests see it act
        module.short_conv.conv.weight.normal_(std=0.1)
    return module


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_output_shape_and_gate_range(hc_mult: int) -> None:
    config = EngramConfig(**{**CONFIG.__dict__, "hc_mult": hc_mult})
    module = _engram(config)
    hidden = torch.randn(2, 7, hc_mult, HIDDEN)
    out = module(hidden, _row_ids(config, 2, 7))
    assert out.shape == (2, 7, hc_mult, HIDDEN)
    assert module.last_gate.shape == (2, 7, hc_mult)
    assert ((module.last_gate > 0) & (module.last_gate < 1)).all()


def test_output_at_t_does_not_depend_on_later_positions() -> None:
    module = _engram()
    hidden = torch.randn(1, 12, 1, HIDDEN)
    ids = _row_ids(CONFIG, 1, 12)
    base = module(hidden, ids)
    changed_hidden, changed_ids = hidden.clone(), ids.clone()
    changed_hidden[:, 8:] = torch.randn(1, 4, 1, HIDDEN)
    changed_ids[:, 8:] = _row_ids(CONFIG, 1, 4, seed=5)
    changed = module(changed_hidden, changed_ids)
    torch.testing.assert_close(changed[:, :8], base[:, :8])
    assert not torch.allclose(changed[:, 8:], base[:, 8:])


def test_short_conv_starts_at_zero_and_is_causal_with_dilation() -> None:
    conv = ShortConv(HIDDEN, kernel_size=4, dilation=3, hc_mult=1)
    x = torch.randn(1, 20, 1, HIDDEN)
    assert torch.count_nonzero(conv(x)) == 0  # zero-initialised: Engram starts as gated value only
    with torch.no_grad():
        conv.conv.weight.fill_(0.5)
    y = conv(x)
    x2 = x.clone()
    x2[:, 10] += 1.0
    changed = (conv(x2) - y).abs().sum(dim=(0, 2, 3)) > 0  # [T]: which outputs moved
    assert changed.nonzero().flatten().tolist() == [10, 13, 16, 19]  # t, t+3, t+6, t+9: kernel 4, dilation 3


def test_gradients_reach_exactly_the_rows_used() -> None:
    module = _engram()
    ids = _row_ids(CONFIG, 2, 5)
    module(torch.randn(2, 5, 1, HIDDEN), ids).square().sum().backward()
    grad = module.table.embedding.weight.grad.coalesce()  # sparse [num_rows, dim]
    assert set(grad.indices()[0].tolist()) == set(ids.flatten().tolist())
    assert module.value_proj.weight.grad is not None and module.key_projs[0].weight.grad is not None


@pytest.fixture
def float32_table(tmp_path, daemon_factory):
    path = create_table(tmp_path / "engram", Manifest(layout=CONFIG.layout(), dtype=DType.FLOAT32, seed=CONFIG.seed))
    with Table.open(path) as table:
        yield daemon_factory(table)


def test_memstore_and_local_sources_give_the_same_outputs_and_gradients(float32_table) -> None:
    local = _engram()
    with MemstoreClient(float32_table.address) as client:
        remote = Engram(CONFIG.layer_ids[0], CONFIG, HIDDEN, MemstoreTable(client, CONFIG.layer_ids[0], True))
        remote.load_state_dict({k: v for k, v in local.state_dict().items() if not k.startswith("table.")})
        hidden = torch.randn(3, 6, 1, HIDDEN)
        ids = _row_ids(CONFIG, 3, 6)
        out_local, out_remote = local(hidden, ids), remote(hidden, ids)
        torch.testing.assert_close(out_remote, out_local, rtol=0, atol=0)
        out_local.sum().backward()
        out_remote.sum().backward()
        row_ids, grads = sum_duplicate_rows(*remote.table.row_gradients())
    expected = local.table.embedding.weight.grad.coalesce()
    assert row_ids.tolist() == expected.indices()[0].tolist()
    np.testing.assert_allclose(grads, expected.values().numpy(), rtol=1e-6, atol=1e-7)


def test_a_memory_mapped_table_gives_the_local_outputs(tmp_path) -> None:
    local = _engram()
    path = create_table(tmp_path / "mapped", Manifest(layout=CONFIG.layout(), dtype=DType.FLOAT32, seed=CONFIG.seed))
    with Table.open(path) as table:
        mapped = Engram(CONFIG.layer_ids[0], CONFIG, HIDDEN, MappedTable(table, CONFIG.layer_ids[0]))
        mapped.load_state_dict({k: v for k, v in local.state_dict().items() if not k.startswith("table.")})
        hidden, ids = torch.randn(2, 5, 1, HIDDEN), _row_ids(CONFIG, 2, 5)
        torch.testing.assert_close(mapped(hidden, ids), local(hidden, ids), rtol=0, atol=0)
