"""The Engram module: shapes, causality, gradients into table rows, local and memstore sources agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import MemstoreClient, RemoteEmbedding
from client.client import sum_duplicate_rows
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from model.engram import Engram, EngramConfig, ShortConv
from model.sources import LocalTable, MappedTable
from tests.reference_engram import FLOAT32_EPS, EngramWeights, engram_reference

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


def _assert_output_ignores_later_positions(forward) -> None:
    """forward(hidden, ids) -> output: positions 0..7 must not move when positions 8.. change.

    Exactly, not within a tolerance: the outputs at t < 8 are the same float32 operations on the
    same values in both calls (nothing at t >= 8 enters them), so they are the same bits; a
    tolerance would let a small leak from the future through (a default assert_close passes a
    leak of 1e-6, see the test below)."""
    hidden = torch.randn(1, 12, 1, HIDDEN)
    ids = _row_ids(CONFIG, 1, 12)
    base = forward(hidden, ids)
    changed_hidden, changed_ids = hidden.clone(), ids.clone()
    changed_hidden[:, 8:] = torch.randn(1, 4, 1, HIDDEN)
    changed_ids[:, 8:] = _row_ids(CONFIG, 1, 4, seed=5)
    changed = forward(changed_hidden, changed_ids)
    torch.testing.assert_close(changed[:, :8], base[:, :8], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 8:], base[:, 8:])


def test_output_at_t_does_not_depend_on_later_positions() -> None:
    _assert_output_ignores_later_positions(_engram())


def test_the_causality_check_catches_a_leak_of_one_millionth() -> None:
    module = _engram()

    def leaky(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return module(hidden, ids) + 1e-6 * hidden.roll(-1, dims=1)  # position t sees t+1, faintly

    with pytest.raises(AssertionError):
        _assert_output_ignores_later_positions(leaky)


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


def _with_repeats(ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T, heads] where sequence 1 repeats sequence 0 and sequence 2's second half its first:
    rows looked up 2 and 3 times, whose gradients the client must sum as the embedding does."""
    ids = ids.clone()
    ids[1] = ids[0]
    half = ids.shape[1] // 2
    ids[2, half : 2 * half] = ids[2, :half]
    ids[0, -1] = ids[0, 0]  # and one row three times
    return ids


def test_memstore_and_local_sources_give_the_same_outputs_and_gradients(float32_table) -> None:
    local = _engram()
    with MemstoreClient(float32_table.address) as client:
        table = RemoteEmbedding(client, CONFIG.layer_ids[0], requires_grad=True)
        returned: list[torch.Tensor] = []  # the rows the module handed the layer: leaves with a .grad
        table.register_forward_hook(lambda module, args, rows: returned.append(rows))
        remote = Engram(CONFIG.layer_ids[0], CONFIG, HIDDEN, table)
        remote.load_state_dict({k: v for k, v in local.state_dict().items() if not k.startswith("table.")})
        hidden = torch.randn(3, 6, 1, HIDDEN)
        ids = _with_repeats(_row_ids(CONFIG, 3, 6))
        out_local, out_remote = local(hidden, ids), remote(hidden, ids)
        torch.testing.assert_close(out_remote, out_local, rtol=0, atol=0)
        out_local.sum().backward()
        out_remote.sum().backward()
        row_ids, grads = table.take_gradients()  # what the module pushes
        assert table.take_gradients()[0].size == 0  # handed over once
    (rows,) = returned
    occurrence_ids, occurrence_grads = ids.reshape(-1).numpy(), rows.grad.reshape(ids.numel(), -1).numpy()
    local_grad = local.table.embedding.weight.grad  # uncoalesced: one entry per lookup
    # Per lookup, both backward passes are the same float32 operations on the same values: identical bits.
    np.testing.assert_array_equal(occurrence_ids, local_grad._indices()[0].numpy())
    np.testing.assert_array_equal(occurrence_grads, local_grad._values().numpy())
    # The module sums per row as the client's push does: the same bits as pushing every occurrence.
    expected_ids, expected_grads = sum_duplicate_rows(occurrence_ids, occurrence_grads)
    np.testing.assert_array_equal(row_ids, expected_ids)
    np.testing.assert_array_equal(grads, expected_grads)
    # Summed per row: the client's sum and torch's coalesce add the same k values, maybe in another
    # order. Each float32 sum of k terms is within (k - 1) * 2^-24 * sum|g_i| of the exact sum, so
    # the two are within twice that of each other: the bound, per row and element.
    counts = np.unique(occurrence_ids, return_counts=True)[1]
    magnitude = sum_duplicate_rows(occurrence_ids, np.abs(occurrence_grads.astype(np.float64)))[1]
    assert counts.max() >= 3 and (counts >= 2).sum() > 10  # repeats are what is being compared
    expected = local_grad.coalesce()
    assert row_ids.tolist() == expected.indices()[0].tolist()
    bound = 2 * (counts[:, None] - 1) * 2.0**-24 * magnitude
    assert (np.abs(grads - expected.values().numpy()) <= bound).all()


def test_a_memory_mapped_table_gives_the_local_outputs(tmp_path) -> None:
    local = _engram()
    path = create_table(tmp_path / "mapped", Manifest(layout=CONFIG.layout(), dtype=DType.FLOAT32, seed=CONFIG.seed))
    with Table.open(path) as table:
        mapped = Engram(CONFIG.layer_ids[0], CONFIG, HIDDEN, MappedTable(table, CONFIG.layer_ids[0]))
        mapped.load_state_dict({k: v for k, v in local.state_dict().items() if not k.startswith("table.")})
        hidden, ids = torch.randn(2, 5, 1, HIDDEN), _row_ids(CONFIG, 2, 5)
        torch.testing.assert_close(mapped(hidden, ids), local(hidden, ids), rtol=0, atol=0)


# The golden test: two branches (hc_mult 2), a sequence longer than the convolution's reach
# ((kernel 4 - 1) * dilation 3 = 9 positions back), small value weights so that the gated value's
# mean square (~1e-4) makes the short convolution's RMSNorm epsilon matter (1e-5 against
# PyTorch's default moves outputs by ~0.2), and every weight non-trivial (norm gains not 1).
GOLDEN_CONFIG = EngramConfig(
    layer_ids=(1,), vocab_size_per_ngram=(300, 400), max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=8, hc_mult=2
)
GOLDEN_HIDDEN, GOLDEN_BATCH, GOLDEN_SEQ = 8, 2, 12
FLOAT64_EPS = float(np.finfo(np.float64).eps)  # nn.RMSNorm(eps=None) on float64 inputs
# Expected values, computed once by tests/reference_engram.py in float64 from _golden_inputs():
# output[1, :, 1, 0] and gate[0, :, 0]. They pin the reference and its inputs, so neither can
# drift together with the module.
GOLDEN_OUTPUT = [
    -0.10198178907619643,
    0.27148489704995316,
    0.705337748441358,
    -0.1252260121972565,
    -0.147540909288461,
    0.12420720207255229,
    0.34036760095790086,
    -0.254192144913412,
    -0.2246840084179655,
    0.9814876777375974,
    -0.07884068559715779,
    -0.2790755859327963,
]
GOLDEN_GATE = [
    0.5259501452595209,
    0.7944031929037193,
    0.6735385841787958,
    0.1768650042811683,
    0.6934077600728575,
    0.6991195190088069,
    0.2721104103254308,
    0.4399226510659137,
    0.3052244261680976,
    0.7231170749105205,
    0.6162987610910448,
    0.6508421365110965,
]
# Module (float64) against reference (float64): the same formulas evaluated in a different order,
# each output a chain of fewer than 100 roundings of at most 2^-53 relative, amplified at most by
# the cancellation in a sum (|terms| / |sum|) and by the signed square root near 0 (here
# |score| > 1e-3, a factor < 16). 1e-10 absolute on outputs of magnitude < 3 allows a combined
# amplification of 10^4 and still sits 9 orders below what the epsilon fault moves (0.2).
GOLDEN_ATOL = 1e-10


def _golden_inputs() -> tuple[EngramWeights, np.ndarray, np.ndarray]:
    """(weights, hidden [B, T, HC, D], memory e_t [B, T, heads*dim]), all float32 values held in float64."""
    rng = np.random.default_rng(7)  # uniform draws of PCG64: the same numbers on every platform

    def draw(low: float, high: float, *shape: int) -> np.ndarray:
        return rng.uniform(low, high, shape).astype(np.float32).astype(np.float64)

    D, M, HC, K = GOLDEN_HIDDEN, GOLDEN_CONFIG.memory_dim, GOLDEN_CONFIG.hc_mult, GOLDEN_CONFIG.kernel_size
    weights = EngramWeights(
        value_w=draw(-0.02, 0.02, D, M),
        value_b=draw(-0.01, 0.01, D),
        key_w=draw(-0.5, 0.5, HC, D, M),
        key_b=draw(-0.1, 0.1, HC, D),
        key_norm=draw(0.5, 1.5, HC, D),
        query_norm=draw(0.5, 1.5, HC, D),
        conv_norm=draw(0.5, 1.5, HC, D),
        conv_w=draw(-1.0, 1.0, HC * D, K),
    )
    return weights, draw(-1.0, 1.0, GOLDEN_BATCH, GOLDEN_SEQ, HC, D), draw(-1.0, 1.0, GOLDEN_BATCH, GOLDEN_SEQ, M)


def _golden_module(weights: EngramWeights, dtype: torch.dtype) -> Engram:
    config = GOLDEN_CONFIG
    module = Engram(config.layer_ids[0], config, GOLDEN_HIDDEN, LocalTable(config.layout(), config.layer_ids[0], 0))
    module = module.to(dtype)

    def put(parameter: torch.nn.Parameter, values: np.ndarray) -> None:
        parameter.copy_(torch.from_numpy(values).reshape(parameter.shape))

    with torch.no_grad():
        put(module.value_proj.weight, weights.value_w)
        put(module.value_proj.bias, weights.value_b)
        for m in range(config.hc_mult):
            put(module.key_projs[m].weight, weights.key_w[m])
            put(module.key_projs[m].bias, weights.key_b[m])
            put(module.key_norms[m].weight, weights.key_norm[m])
            put(module.query_norms[m].weight, weights.query_norm[m])
            put(module.short_conv.norms[m].weight, weights.conv_norm[m])
        put(module.short_conv.conv.weight, weights.conv_w)  # [HC*D, 1, K]
    return module


def _golden_forward(module: Engram, hidden: np.ndarray, memory: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    config = GOLDEN_CONFIG
    rows = torch.from_numpy(memory).to(dtype).reshape(GOLDEN_BATCH, GOLDEN_SEQ, config.num_heads, config.head_dim)
    with torch.no_grad():
        return module(torch.from_numpy(hidden).to(dtype), rows=rows).double().numpy()


def test_golden_output_matches_an_independent_reference() -> None:
    weights, hidden, memory = _golden_inputs()
    expected, gate = engram_reference(weights, hidden, memory, GOLDEN_CONFIG.max_ngram, qk_norm_eps=FLOAT64_EPS)
    np.testing.assert_allclose(expected[1, :, 1, 0], GOLDEN_OUTPUT, rtol=1e-12, atol=0)
    np.testing.assert_allclose(gate[0, :, 0], GOLDEN_GATE, rtol=1e-12, atol=0)
    assert np.abs(np.log(gate / (1 - gate))).min() ** 2 > 1e-3  # |score| > 1e-3, as GOLDEN_ATOL assumes
    module = _golden_module(weights, torch.float64)
    np.testing.assert_allclose(
        _golden_forward(module, hidden, memory, torch.float64), expected, rtol=0, atol=GOLDEN_ATOL
    )
    np.testing.assert_allclose(module.last_gate.numpy(), gate, rtol=0, atol=GOLDEN_ATOL)


def test_golden_inputs_make_the_short_convolution_epsilon_matter() -> None:
    # Without this the golden test could pass with any epsilon: the reference evaluated with
    # PyTorch's default epsilon must land far outside the golden tolerance.
    weights, hidden, memory = _golden_inputs()
    dilation = GOLDEN_CONFIG.max_ngram
    right, _ = engram_reference(weights, hidden, memory, dilation, qk_norm_eps=FLOAT64_EPS)
    default, _ = engram_reference(weights, hidden, memory, dilation, conv_norm_eps=FLOAT64_EPS, qk_norm_eps=FLOAT64_EPS)
    assert np.abs(right - default).max() > 1e6 * GOLDEN_ATOL


def test_float32_module_matches_the_reference_to_float32_rounding() -> None:
    # The module as models run it: float32, where the gate's norms take float32's machine epsilon.
    # Against the float64 reference the difference is float32 rounding only: the same chains of
    # < 100 roundings, now of 2^-24 (6e-8) each, amplified as above (< 10^4 over all), bound
    # every output by 100 * 6e-8 * 16 * max|y| < 3e-4 of its scale, still ~1000x below what the
    # epsilon fault moves; measured ~7e-7 here.
    weights, hidden, memory = _golden_inputs()
    expected, _ = engram_reference(weights, hidden, memory, GOLDEN_CONFIG.max_ngram, qk_norm_eps=FLOAT32_EPS)
    got = _golden_forward(_golden_module(weights, torch.float32), hidden, memory, torch.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=100 * 2.0**-24 * 16 * np.abs(expected).max())
