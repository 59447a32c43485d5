"""The server-side sparse optimizers against PyTorch's own (and row-wise Adagrad against its formula)."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math

import numpy as np
import pytest
import torch

from memstore.errors import InvalidArgumentError
from memstore.optim import _fma32, apply_update
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind

ROWS, DIM, STEPS = 50, 8, 20
TOUCHABLE = 40  # rows 40..49 are never pushed


def _bits(array: np.ndarray) -> np.ndarray:
    """Raw float32 bits: "bit-exact" means these are equal (so 0.0 != -0.0 and NaN == same NaN)."""
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def assert_bit_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(_bits(actual), _bits(expected))


def _pushes(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """~20 sparse steps: distinct ids within a step, overlapping across steps, some zero gradients."""
    rng = np.random.default_rng(seed)
    pushes = []
    for _ in range(STEPS):
        ids = rng.choice(TOUCHABLE, size=int(rng.integers(1, 13)), replace=False)
        grads = (rng.standard_normal((ids.size, DIM)) * rng.choice([0.01, 1.0, 10.0])).astype(np.float32)
        if rng.random() < 0.3:
            grads[0] = 0.0  # a touched row with a zero gradient still counts as touched
        pushes.append((ids, grads))
    return pushes


def _initial_table(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, DIM)).astype(np.float32)


def _run_memstore(config: OptimizerConfig, table: np.ndarray, pushes) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    table = table.copy()
    state = config.initial_state(ROWS, DIM)
    for step, (ids, grads) in enumerate(pushes, start=1):
        rows, row_state = table[ids], {name: values[ids] for name, values in state.items()}
        new_rows, new_state = apply_update(config, rows, row_state, grads, step)
        table[ids] = new_rows
        for name, values in new_state.items():
            state[name][ids] = values
    return table, state


def _torch_optimizer(config: OptimizerConfig, param: torch.nn.Parameter) -> torch.optim.Optimizer:
    if config.kind is OptimizerKind.SGD:
        return torch.optim.SGD([param], lr=config.lr)
    if config.kind is OptimizerKind.ADAGRAD:
        return torch.optim.Adagrad(
            [param], lr=config.lr, eps=config.eps, initial_accumulator_value=config.initial_accumulator_value
        )
    assert config.kind is OptimizerKind.ADAM
    return torch.optim.SparseAdam([param], lr=config.lr, betas=config.betas, eps=config.eps)


def _run_torch(config: OptimizerConfig, table: np.ndarray, pushes) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    param = torch.nn.Parameter(torch.from_numpy(table.copy()))
    optimizer = _torch_optimizer(config, param)
    # One thread: these tensors are tiny, and OpenMP workers spinning against a busy machine made
    # each step ~100x slower. Invariant checks on, also for torch's internal sparse tensors.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            for ids, grads in pushes:
                # What nn.Embedding(sparse=True) would give, already coalesced (one entry per id).
                indices = torch.from_numpy(ids)[None]
                param.grad = torch.sparse_coo_tensor(indices, torch.from_numpy(grads), (ROWS, DIM))
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    state = {name: value.numpy() for name, value in optimizer.state[param].items() if name != "step"}
    return param.detach().numpy(), state


def _torch_sparse_add_is_fused() -> bool:
    """Whether torch's dense += alpha * sparse rounds once (BLAS axpy with FMA, every modern CPU).

    (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24, halfway between two float32 values: a separate multiply
    rounds it to 1 + 2^-11 before the subtraction, an FMA keeps the 2^-24.
    """
    a = 1 + 2.0**-12
    param = torch.ones((1, 1), dtype=torch.float32)
    param.add_(torch.sparse_coo_tensor([[0]], [[a]], (1, 1), dtype=torch.float32, check_invariants=True), alpha=-a)
    return param.item() == -(2.0**-11 + 2.0**-24)


@pytest.fixture
def ieee_sqrt(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make torch's in-place float32 sqrt correctly rounded, as IEEE 754 (and numpy) have it.

    torch's CPU sqrt goes through MKL VML in its "high accuracy" mode, which is not correctly
    rounded: here ~17% of results are 1 ulp off. Adagrad and SparseAdam call `sqrt_` and
    nothing else that is not correctly rounded, so with it swapped the rest of torch's own code
    (its operation order, its fused axpy) must reproduce memstore bit for bit.
    """
    calls = [0]

    def sqrt_(self: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return self.copy_(torch.from_numpy(np.sqrt(self.numpy())))

    monkeypatch.setattr(torch.Tensor, "sqrt_", sqrt_)
    return calls


needs_fused_torch = pytest.mark.skipif(
    not _torch_sparse_add_is_fused(),
    reason="this torch's CPU BLAS does not fuse y += a*x; memstore's SGD/Adagrad match the fused (FMA) rounding",
)

TORCH_CONFIGS = [
    pytest.param(OptimizerConfig(OptimizerKind.SGD, lr=0.1), marks=needs_fused_torch, id="sgd"),
    pytest.param(
        OptimizerConfig(OptimizerKind.ADAGRAD, lr=0.1, eps=1e-10, initial_accumulator_value=0.1),
        marks=needs_fused_torch,
        id="adagrad-torch-defaults",
    ),
    pytest.param(OptimizerConfig(OptimizerKind.ADAGRAD, lr=0.05), marks=needs_fused_torch, id="adagrad-zero-acc"),
    pytest.param(OptimizerConfig(OptimizerKind.ADAM, lr=0.01), id="adam"),
    pytest.param(OptimizerConfig(OptimizerKind.ADAM, lr=0.03, betas=(0.8, 0.99), eps=1e-6), id="adam-betas"),
]


def _check_untouched(config: OptimizerConfig, table: np.ndarray, ours: np.ndarray, our_state) -> None:
    assert not np.array_equal(ours[:TOUCHABLE], table[:TOUCHABLE])  # the steps did something
    assert_bit_exact(ours[TOUCHABLE:], table[TOUCHABLE:])
    for name, values in config.initial_state(ROWS - TOUCHABLE, DIM).items():
        assert_bit_exact(our_state[name][TOUCHABLE:], values)


@pytest.mark.parametrize("config", TORCH_CONFIGS)
def test_matches_torch_bit_for_bit(config: OptimizerConfig, ieee_sqrt: list[int]) -> None:
    # Tolerance zero: every step is the same float32 operations in the same order as torch's
    # sparse branch (SGD, Adagrad, SparseAdam), each correctly rounded, so the tables and the
    # state must be identical bits, after 20 steps as after one.
    table, pushes = _initial_table(1), _pushes(2)
    ours, our_state = _run_memstore(config, table, pushes)
    theirs, their_state = _run_torch(config, table, pushes)
    assert (ieee_sqrt[0] > 0) == (config.kind is not OptimizerKind.SGD)  # the patch was in the path
    assert_bit_exact(ours, theirs)
    assert list(our_state) == list(their_state)  # same slot names, in the same order
    for name in our_state:
        assert_bit_exact(our_state[name], their_state[name])
    _check_untouched(config, table, ours, our_state)


@pytest.mark.parametrize("config", [c.values[0] for c in TORCH_CONFIGS], ids=[c.id for c in TORCH_CONFIGS])
def test_matches_stock_torch_closely(config: OptimizerConfig) -> None:
    # Against torch as installed (MKL sqrt up to 1 ulp off; maybe an unfused axpy elsewhere):
    # the state is bit-exact (Adagrad's sum and Adam's moments never see a sqrt or the rows), the
    # rows differ by at most one float32 rounding per step, i.e. < 20 ulp of |w| < 4 (4.8e-7)
    # over 20 steps, so an absolute 1e-5 is a bound, not a fit (the observed error is ~1e-7).
    table, pushes = _initial_table(1), _pushes(2)
    ours, our_state = _run_memstore(config, table, pushes)
    theirs, their_state = _run_torch(config, table, pushes)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    for name in our_state:
        assert_bit_exact(our_state[name], their_state[name])
    _check_untouched(config, table, ours, our_state)


def test_rowwise_adagrad_matches_formula() -> None:
    config = OptimizerConfig(OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, eps=1e-8, initial_accumulator_value=0.01)
    table, pushes = _initial_table(3), _pushes(4)
    ours, our_state = _run_memstore(config, table, pushes)

    weights = torch.from_numpy(table).double()
    sums = torch.full((ROWS,), config.initial_accumulator_value, dtype=torch.float64)
    for ids, grads in pushes:
        index, grad = torch.from_numpy(ids), torch.from_numpy(grads).double()
        sums[index] += (grad * grad).mean(dim=1)
        weights[index] -= config.lr * grad / (sums[index].sqrt() + config.eps)[:, None]

    # Not bit-exact by design (the reference is float64). Each float32 step rounds the row once
    # (<= 0.5 ulp, about 1.2e-7 for |w| < 2) and the multiplier to a few ulp of the update;
    # with at most 20 steps per row that bounds the drift by ~20 * 2.4e-7 ~ 5e-6 absolute for
    # the |w| < 4 seen here, and the sums, only accumulated, by ~20 float32 ulp relative.
    np.testing.assert_allclose(ours, weights.numpy(), rtol=0, atol=5e-6)
    np.testing.assert_allclose(our_state["sum"][:, 0], sums.numpy(), rtol=20 * 2.0**-23, atol=0)
    assert_bit_exact(ours[TOUCHABLE:], table[TOUCHABLE:])
    assert (our_state["sum"][TOUCHABLE:] == np.float32(0.01)).all()


def test_fma32_crafted_double_rounding_cases() -> None:
    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 is exactly halfway between two float32 values; any tiny
    # addend decides the direction, which a float64 sum would lose before rounding to float32.
    a = np.array([1 + 2.0**-12] * 4, dtype=np.float32)
    y = np.array([2.0**-80, -(2.0**-80), 0.0, 1e-30], dtype=np.float32)
    expected = np.array([1 + 2.0**-11 + 2.0**-23, 1 + 2.0**-11, 1 + 2.0**-11, 1 + 2.0**-11 + 2.0**-23])
    assert_bit_exact(_fma32(a, a, y), expected.astype(np.float32))


def test_fma32_non_finite_addend_passes_through() -> None:
    y = np.array([np.inf, -np.inf, np.nan, 1.0], dtype=np.float32)
    out = _fma32(np.float32(-0.1), np.ones(4, np.float32), y)
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2]) and out[3] == np.float32(0.9)


def _libm_fmaf():
    path = ctypes.util.find_library("m")
    if path is None:
        return None
    fmaf = getattr(ctypes.CDLL(path), "fmaf", None)
    if fmaf is not None:
        fmaf.restype = ctypes.c_float
        fmaf.argtypes = [ctypes.c_float] * 3
    return fmaf


def test_fma32_matches_libm_fmaf() -> None:
    fmaf = _libm_fmaf()
    if fmaf is None:
        pytest.skip("no C library fmaf to compare with")
    rng = np.random.default_rng(5)
    n = 4000
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    product = a.astype(np.float64) * x
    # Addends near cancellation, far below the product (sticky bits) and of any size.
    y = np.concatenate(
        [
            (-product[: n // 4] * (1 + rng.standard_normal(n // 4) * 1e-6)),
            (product[n // 4 : n // 2] * 2.0 ** -rng.integers(20, 60, n // 4)),
            (rng.standard_normal(n // 2) * 2.0 ** rng.integers(-60, 60, n // 2)),
        ]
    ).astype(np.float32)
    expected = np.array([fmaf(ai, xi, yi) for ai, xi, yi in zip(a.tolist(), x.tolist(), y.tolist())], np.float32)
    assert_bit_exact(_fma32(a, x, y), expected)


def _push(config: OptimizerConfig, n: int = 6, seed: int = 7):
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, DIM)).astype(np.float32)
    state = {name: rng.random(values.shape).astype(np.float32) for name, values in config.initial_state(n, DIM).items()}
    grads = rng.standard_normal((n, DIM)).astype(np.float32)
    return rows, state, grads


ALL_KINDS = [OptimizerConfig(kind) for kind in OptimizerKind]
KIND_IDS = [kind.value for kind in OptimizerKind]


@pytest.mark.parametrize("config", ALL_KINDS, ids=KIND_IDS)
def test_inputs_not_mutated_and_outputs_fresh(config: OptimizerConfig) -> None:
    rows, state, grads = _push(config)
    before = (rows.copy(), {name: values.copy() for name, values in state.items()}, grads.copy())
    new_rows, new_state = apply_update(config, rows, state, grads, 3)
    assert_bit_exact(rows, before[0])
    assert_bit_exact(grads, before[2])
    for name in state:
        assert_bit_exact(state[name], before[1][name])
    assert new_rows.dtype == np.float32 and new_rows.shape == rows.shape
    assert not np.shares_memory(new_rows, rows)
    assert list(new_state) == list(config.state_slots(DIM))
    for name, values in new_state.items():
        assert values.dtype == np.float32 and values.shape == state[name].shape
        assert not np.shares_memory(values, state[name])
    assert not np.array_equal(new_rows, rows)


@pytest.mark.parametrize("config", ALL_KINDS, ids=KIND_IDS)
def test_empty_push(config: OptimizerConfig) -> None:
    rows, state, grads = _push(config, n=0)
    new_rows, new_state = apply_update(config, rows, state, grads, 1)
    assert new_rows.shape == (0, DIM)
    assert {name: values.shape for name, values in new_state.items()} == {
        name: (0, width) for name, width in config.state_slots(DIM).items()
    }


@pytest.mark.parametrize("config", ALL_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_rejected(config: OptimizerConfig, bad: float) -> None:
    rows, state, grads = _push(config)
    grads[2, 3] = bad
    grads[5, 0] = np.nan
    before = (rows.copy(), {name: values.copy() for name, values in state.items()})
    with pytest.raises(InvalidArgumentError, match=r"positions \[2, 5\].*not finite.*nothing changed"):
        apply_update(config, rows, state, grads, 1)
    assert_bit_exact(rows, before[0])
    for name in state:
        assert_bit_exact(state[name], before[1][name])


def test_non_finite_message_is_bounded() -> None:
    config = OptimizerConfig(OptimizerKind.SGD)
    rows, state, grads = _push(config, n=20)
    grads[:] = np.nan
    with pytest.raises(InvalidArgumentError, match=r"\[0, 1, 2, 3, 4, 5, 6, 7\] and 12 more \(of 20"):
        apply_update(config, rows, state, grads, 1)


def _bad_calls():
    adam = OptimizerConfig(OptimizerKind.ADAM)
    rows, state, grads = _push(adam)
    yield "step 0", (adam, rows, state, grads, 0), "step must be an integer >= 1"
    yield "step float", (adam, rows, state, grads, 1.0), "step must be an integer"
    yield "step bool", (adam, rows, state, grads, True), "step must be an integer"
    yield "rows float64", (adam, rows.astype(np.float64), state, grads, 1), "rows must be float32"
    yield "grads float16", (adam, rows, state, grads.astype(np.float16), 1), "grads must be float32"
    yield "rows list", (adam, rows.tolist(), state, grads, 1), "rows must be a numpy array"
    yield "rows 1-D", (adam, rows[0], state, grads[0], 1), "rows must be 2-D"
    yield "grads fewer rows", (adam, rows, state, grads[:-1], 1), "grads have shape"
    yield "grads other dim", (adam, rows, state, grads[:, :-1], 1), "grads have shape"
    yield "dim 0", (adam, rows[:, :0], {}, grads[:, :0], 1), "dim 0"
    yield "slot missing", (adam, rows, {"exp_avg": state["exp_avg"]}, grads, 1), "needs state slots"
    yield "slot extra", (adam, rows, {**state, "sum": state["exp_avg"]}, grads, 1), "needs state slots"
    short = {**state, "exp_avg": state["exp_avg"][:-1]}
    yield "slot rows", (adam, rows, short, grads, 1), r"state\['exp_avg'\] has shape"
    wide = {**state, "exp_avg_sq": np.zeros((rows.shape[0], 1), np.float32)}
    yield "slot width", (adam, rows, wide, grads, 1), r"state\['exp_avg_sq'\] has shape"
    f64 = {**state, "exp_avg": state["exp_avg"].astype(np.float64)}
    yield "slot float64", (adam, rows, f64, grads, 1), r"state\['exp_avg'\] must be float32"
    rowwise = OptimizerConfig(OptimizerKind.ROWWISE_ADAGRAD)
    yield "rowwise full sum", (rowwise, rows, {"sum": np.zeros_like(rows)}, grads, 1), r"state\['sum'\] has shape"
    yield "config dict", (adam.to_dict(), rows, state, grads, 1), "config must be an OptimizerConfig"


BAD_CALLS = list(_bad_calls())


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_rejected(args, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        apply_update(*args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": -0.1}, "lr must be a finite number > 0"),
        ({"lr": math.nan}, "lr must be a finite number > 0"),
        ({"lr": math.inf}, "lr must be a finite number > 0"),
        ({"lr": "0.1"}, "lr must be a finite number > 0"),
        ({"lr": True}, "lr must be a finite number > 0"),
        ({"lr": 1e39}, "lr=1e\\+39 is not representable as a positive float32"),
        ({"eps": 0.0}, "eps must be a finite number > 0"),
        ({"eps": 1e-50}, "eps=1e-50 is not representable as a positive float32"),
        ({"betas": (0.9,)}, "betas must be a pair"),
        ({"betas": "ab"}, "betas must be a pair"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\] must be a number in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\] must be a number in \[0, 1\)"),
        ({"initial_accumulator_value": -1.0}, "initial_accumulator_value must be a finite number >= 0"),
        ({"initial_accumulator_value": math.inf}, "initial_accumulator_value must be a finite number >= 0"),
        ({"kind": "momentum"}, "unknown optimizer kind 'momentum'; use one of 'sgd', 'adagrad'"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        OptimizerConfig(**kwargs)


def test_config_normalizes() -> None:
    config = OptimizerConfig(kind="adagrad", lr=1, betas=[0, 0.5], initial_accumulator_value=0)
    assert config.kind is OptimizerKind.ADAGRAD
    assert config.betas == (0.0, 0.5) and isinstance(config.lr, float)
    assert config == OptimizerConfig(OptimizerKind.ADAGRAD, lr=1.0, betas=(0.0, 0.5))


@pytest.mark.parametrize("kind", list(OptimizerKind), ids=KIND_IDS)
def test_dict_round_trip(kind: OptimizerKind) -> None:
    config = OptimizerConfig(kind, lr=0.003, betas=(0.5, 0.75), eps=1e-10, initial_accumulator_value=0.25)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["kind"] == kind.value
    assert OptimizerConfig.from_dict(data) == config


def test_from_dict_rejects_unknown_and_incomplete() -> None:
    data = OptimizerConfig().to_dict()
    with pytest.raises(InvalidArgumentError, match=r"unknown optimizer config keys \['momentum', 'weight_decay'\]"):
        OptimizerConfig.from_dict({**data, "weight_decay": 0.1, "momentum": 0.9})
    with pytest.raises(InvalidArgumentError, match="unknown optimizer kind 'lamb'"):
        OptimizerConfig.from_dict({**data, "kind": "lamb"})
    with pytest.raises(InvalidArgumentError, match="has no 'kind'"):
        OptimizerConfig.from_dict({"lr": 0.1})
    with pytest.raises(InvalidArgumentError, match="must be a JSON object"):
        OptimizerConfig.from_dict([("kind", "sgd")])
    assert OptimizerConfig.from_dict({"kind": "sgd"}) == OptimizerConfig(OptimizerKind.SGD)


def test_state_slots_and_initial_state() -> None:
    expected = {
        OptimizerKind.SGD: {},
        OptimizerKind.ADAGRAD: {"sum": DIM},
        OptimizerKind.ROWWISE_ADAGRAD: {"sum": 1},
        OptimizerKind.ADAM: {"exp_avg": DIM, "exp_avg_sq": DIM},
    }
    for kind, slots in expected.items():
        config = OptimizerConfig(kind, initial_accumulator_value=0.5)
        assert list(config.state_slots(DIM).items()) == list(slots.items())
        state = config.initial_state(ROWS, DIM)
        assert list(state) == list(slots)
        fill = 0.5 if kind in (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD) else 0.0
        for name, values in state.items():
            assert values.dtype == np.float32 and values.shape == (ROWS, slots[name])
            assert (values == np.float32(fill)).all()
    assert OptimizerConfig().initial_state(0, DIM)["exp_avg"].shape == (0, DIM)
    with pytest.raises(InvalidArgumentError, match="dim must be an integer >= 1"):
        OptimizerConfig().state_slots(0)
    with pytest.raises(InvalidArgumentError, match="num_rows must be an integer >= 0"):
        OptimizerConfig().initial_state(-1, DIM)
