"""Engram's N-gram hashing against the written rule, computed the slow way with Python ints."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.errors import InvalidArgumentError
from memstore.layout import engram_primes
from model.hashing import NgramHashMapping


def _wrap64(x: int) -> int:
    return (x + 2**63) % 2**64 - 2**63


def _reference(mapping: NgramHashMapping, ids: np.ndarray, layer_id: int) -> np.ndarray:
    """The rule, one position at a time, in Python ints with explicit 64-bit wrap-around."""
    half_bound = max(1, (2**63 - 1) // mapping.compressed_vocab_size // 2)
    rng = np.random.default_rng(mapping.seed + 10007 * layer_id)
    mult = [2 * int(r) + 1 for r in rng.integers(0, half_bound, size=mapping.max_ngram, dtype=np.int64)]
    primes = engram_primes(mapping.layer_ids, mapping.vocab_size_per_ngram, mapping.max_ngram, mapping.heads_per_ngram)
    B, T = ids.shape
    out = np.zeros((B, T, (mapping.max_ngram - 1) * mapping.heads_per_ngram), dtype=np.int64)
    for b in range(B):
        for t in range(T):
            tok = [int(ids[b, t - k]) if t - k >= 0 else mapping.pad_id for k in range(mapping.max_ngram)]
            col = 0
            for n in range(2, mapping.max_ngram + 1):
                mix = 0
                for k in range(n):
                    mix ^= _wrap64(tok[k] * mult[k])
                for prime in primes[layer_id][n - 2]:
                    out[b, t, col] = mix % prime
                    col += 1
    return out


def _mapping(max_ngram: int = 3, heads: int = 2, vocab: int = 1000, pad: int = 2, seed: int = 0) -> NgramHashMapping:
    return NgramHashMapping([1, 4], [97] * (max_ngram - 1), max_ngram, heads, vocab, pad, seed)


@pytest.mark.parametrize("max_ngram", [3, 4])
@pytest.mark.parametrize("shape", [(1, 4), (2, 5)])
def test_hash_equals_the_rule_on_small_cases(max_ngram: int, shape: tuple[int, int]) -> None:
    mapping = _mapping(max_ngram)
    ids = np.random.default_rng(3).integers(0, 1000, shape)
    hashed = mapping.hash(ids)
    for layer_id in (1, 4):
        assert hashed[layer_id].shape == (*shape, (max_ngram - 1) * 2)
        np.testing.assert_array_equal(hashed[layer_id], _reference(mapping, ids, layer_id))


def test_multipliers_follow_the_formula_and_are_odd() -> None:
    mapping = _mapping(vocab=129_280)
    half_bound = max(1, (np.iinfo(np.int64).max // 129_280) // 2)
    expected = np.random.default_rng(0 + 10007 * 4).integers(0, half_bound, size=3, dtype=np.int64) * 2 + 1
    np.testing.assert_array_equal(mapping.multipliers[4], expected)
    assert all(m % 2 == 1 for m in mapping.multipliers[1])


def test_rows_of_a_batch_are_independent_and_start_from_padding() -> None:
    mapping = _mapping()
    ids = np.random.default_rng(0).integers(0, 1000, (3, 6))
    batched = mapping.hash(ids)[1]
    for b in range(3):
        np.testing.assert_array_equal(batched[b], mapping.hash(ids[b : b + 1])[1][0])
    padded = mapping.hash(np.full((1, 3), mapping.pad_id))[1]
    np.testing.assert_array_equal(padded[0, 0], padded[0, 2])  # all-pad N-grams hash alike


def test_primes_and_row_ids_match_the_table_layout() -> None:
    mapping = _mapping()
    layout = mapping.layout(dim=8)
    ids = np.random.default_rng(1).integers(0, 1000, (2, 9))
    for layer_id, rows in mapping.row_ids(ids).items():
        assert mapping.primes(layer_id) == layout.primes(layer_id)
        np.testing.assert_array_equal(rows - np.array(layout.head_offsets(layer_id)), mapping.hash(ids)[layer_id])
        assert rows.min() >= 0 and rows.max() < layout.num_rows(layer_id)
        head_of_row = np.searchsorted(np.array(layout.head_offsets(layer_id)), rows, side="right") - 1
        np.testing.assert_array_equal(head_of_row, np.broadcast_to(np.arange(rows.shape[-1]), rows.shape))


def test_hashing_is_deterministic_across_instances() -> None:
    ids = np.random.default_rng(2).integers(0, 1000, (4, 16))
    np.testing.assert_array_equal(_mapping().hash(ids)[4], _mapping().hash(ids)[4])
    assert not np.array_equal(_mapping(seed=1).hash(ids)[4], _mapping().hash(ids)[4])


@pytest.mark.parametrize(
    "ids",
    [np.zeros(5, dtype=np.int64), np.zeros((2, 3), dtype=np.float32), np.array([[0, 1000]]), np.array([[-1, 0]])],
)
def test_bad_input_is_rejected(ids: np.ndarray) -> None:
    with pytest.raises(InvalidArgumentError):
        _mapping().hash(ids)


@settings(max_examples=40, deadline=None)
@given(
    max_ngram=st.integers(2, 4),
    heads=st.integers(1, 3),
    vocab=st.integers(2, 5000),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_vectorised_hash_equals_the_slow_rule(max_ngram: int, heads: int, vocab: int, seed: int, data) -> None:
    mapping = NgramHashMapping([0, 7], [50] * (max_ngram - 1), max_ngram, heads, vocab, vocab - 1, seed)
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 7))
    ids = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=B * T, max_size=B * T))).reshape(B, T)
    for layer_id in (0, 7):
        np.testing.assert_array_equal(mapping.hash(ids)[layer_id], _reference(mapping, ids, layer_id))
