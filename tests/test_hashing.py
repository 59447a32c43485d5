"""Engram's N-gram hashing against the written rule, computed the slow way with Python ints."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.errors import InvalidArgumentError
from memstore.layout import engram_primes
from model.hashing import NgramHashMapping, _remainder

INT64_MAX = 2**63 - 1


def _wrap64(x: int) -> int:
    """A Python int as int64 arithmetic leaves it: wrapped into [-2**63, 2**63)."""
    return (x + 2**63) % 2**64 - 2**63


def _multipliers(seed: int, layer_id: int, max_ngram: int, vocab: int) -> list[int]:
    half_bound = max(1, (INT64_MAX // vocab) // 2)
    r = np.random.default_rng(seed + 10007 * layer_id).integers(0, half_bound, size=max_ngram, dtype=np.int64)
    return [2 * int(x) + 1 for x in r]


def _slow(mapping: NgramHashMapping, ids: np.ndarray, layer_id: int) -> list:
    """The rule, one position at a time, in Python ints with explicit 64-bit wrap-around: [B][T][heads]."""
    mult = _multipliers(mapping.seed, layer_id, mapping.max_ngram, mapping.compressed_vocab_size)
    primes = engram_primes(mapping.layer_ids, mapping.vocab_size_per_ngram, mapping.max_ngram, mapping.heads_per_ngram)
    out = []
    for row in ids.tolist():
        out.append([])
        for t in range(len(row)):
            tok = [row[t - k] if t - k >= 0 else mapping.pad_id for k in range(mapping.max_ngram)]
            hashes = []
            for n in range(2, mapping.max_ngram + 1):
                mix = 0
                for k in range(n):
                    mix ^= _wrap64(tok[k] * mult[k])
                hashes += [mix % p for p in primes[layer_id][n - 2]]  # Python's % is numpy's for p > 0
            out[-1].append(hashes)
    return out


def _reference_numpy(mapping: NgramHashMapping, ids: np.ndarray, layer_id: int) -> np.ndarray:
    """engram_demo_v1.py's NgramHashMapping._get_ngram_hashes, transcribed (np.pad shifts, `%`, stack)."""
    x = np.asarray(ids, dtype=np.int64)
    _, T = x.shape
    m = np.array(_multipliers(mapping.seed, layer_id, mapping.max_ngram, mapping.compressed_vocab_size))
    shifts = [x] + [
        np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=mapping.pad_id)[:, :T]
        for k in range(1, mapping.max_ngram)
    ]
    hashes = []
    for n in range(2, mapping.max_ngram + 1):
        mix = shifts[0] * m[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * m[k])
        hashes += [mix % int(p) for p in mapping.primes(layer_id)[n - 2]]
    return np.stack(hashes, axis=2)


def _mapping(max_ngram: int = 3, heads: int = 2, vocab: int = 1000, pad: int = 2, seed: int = 0) -> NgramHashMapping:
    return NgramHashMapping([1, 4], [97] * (max_ngram - 1), max_ngram, heads, vocab, pad, seed)


def test_one_row_by_hand() -> None:
    mapping = _mapping(max_ngram=3, heads=2)
    a, b, c, d = 17, 999, 0, 512
    pad = mapping.pad_id
    hashed = mapping.hash(np.array([[a, b, c, d]]))[4]
    m = _multipliers(0, 4, 3, 1000)  # default_rng(0 + 10007 * 4)
    (p2, q2), (p3, q3) = engram_primes([1, 4], [97, 97], 3, 2)[4]
    # position t reads (id[t], id[t-1], id[t-2]), padded before the start
    for t, (x0, x1, x2) in enumerate([(a, pad, pad), (b, a, pad), (c, b, a), (d, c, b)]):
        mix2 = _wrap64(x0 * m[0]) ^ _wrap64(x1 * m[1])
        mix3 = mix2 ^ _wrap64(x2 * m[2])
        assert hashed[0, t].tolist() == [mix2 % p2, mix2 % q2, mix3 % p3, mix3 % q3]


@pytest.mark.parametrize("max_ngram", [3, 4])
@pytest.mark.parametrize("shape", [(1, 4), (2, 5)])
def test_hash_equals_the_rule_on_small_cases(max_ngram: int, shape: tuple[int, int]) -> None:
    mapping = _mapping(max_ngram)
    ids = np.random.default_rng(3).integers(0, 1000, shape)
    hashed = mapping.hash(ids)
    assert sorted(hashed) == [1, 4]
    for layer_id in (1, 4):
        assert hashed[layer_id].dtype == np.int64
        assert hashed[layer_id].shape == (*shape, (max_ngram - 1) * 2)
        assert hashed[layer_id].tolist() == _slow(mapping, ids, layer_id)


def test_demo_config_equals_the_reference_code_across_chunks() -> None:
    # Engram's demo config; 2 x 20,000 positions crosses the module's internal chunking.
    mapping = NgramHashMapping([1, 15], [646400, 646400], 3, 8, 100_000, 2, 0)
    ids = np.random.default_rng(5).integers(0, 100_000, (2, 20_000))
    ids[:, 100:200] = 99_999  # the largest id: the largest products
    for layer_id, hashed in mapping.hash(ids).items():
        np.testing.assert_array_equal(hashed, _reference_numpy(mapping, ids, layer_id))


def test_output_is_order_major() -> None:
    mapping = _mapping(max_ngram=4, heads=3)
    ids = np.random.default_rng(4).integers(0, 1000, (1, 8))
    changed = ids.copy()
    changed[0, 2] = (ids[0, 2] + 1) % 1000  # token t-2 for position 4: in orders 3 and 4 only
    before, after = mapping.hash(ids)[1][0, 4], mapping.hash(changed)[1][0, 4]
    np.testing.assert_array_equal(before[:3], after[:3])  # order 2's heads come first
    assert np.all(before[3:] != after[3:])  # order 3's, then order 4's (distinct with these values)
    flat_primes = [p for heads in mapping.primes(1) for p in heads]
    assert np.all(mapping.hash(ids)[1] < np.array(flat_primes))


def test_each_row_starts_from_padding() -> None:
    mapping = _mapping(max_ngram=3, pad=7)
    ids = np.random.default_rng(0).integers(0, 1000, (3, 6))
    batched = mapping.hash(ids)[1]
    for b in range(3):  # rows are independent sequences
        np.testing.assert_array_equal(batched[b], mapping.hash(ids[b : b + 1])[1][0])
    padded = np.concatenate([np.full((3, 2), 7), ids], axis=1)  # explicit padding changes nothing
    np.testing.assert_array_equal(mapping.hash(padded)[1][:, 2:], batched)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 1)])
def test_short_and_empty_inputs(shape: tuple[int, int]) -> None:
    mapping = _mapping(max_ngram=4)
    ids = np.ones(shape, dtype=np.int64)
    for layer_id, hashed in mapping.hash(ids).items():
        assert hashed.shape == (*shape, 6)
        assert hashed.tolist() == _slow(mapping, ids, layer_id)


def test_integer_dtypes_and_lists_give_the_same_hashes() -> None:
    mapping = _mapping()
    ids = np.random.default_rng(6).integers(0, 1000, (2, 7))
    expected = mapping.hash(ids)[1]
    for variant in (ids.astype(np.uint16), ids.astype(np.int32), ids.tolist(), np.asfortranarray(ids)):
        np.testing.assert_array_equal(mapping.hash(variant)[1], expected)


def test_primes_come_from_the_layout_rule() -> None:
    mapping = NgramHashMapping([1, 15], [646400, 646400], 3, 8, 100_000, 2, 0)
    rule = engram_primes([1, 15], [646400, 646400], 3, 8)
    layout = mapping.layout(dim=64)
    for layer_id in (1, 15):
        assert mapping.primes(layer_id) == rule[layer_id] == layout.primes(layer_id)
    assert layout.dim == 64 and layout.layer_ids == (1, 15)
    with pytest.raises(InvalidArgumentError, match="unknown Engram layer"):
        mapping.primes(2)


def test_row_ids_are_hash_plus_head_offsets() -> None:
    mapping = _mapping(max_ngram=4, heads=3)
    layout = mapping.layout(dim=8)
    ids = np.random.default_rng(1).integers(0, 1000, (2, 9))
    hashed = mapping.hash(ids)
    for layer_id, rows in mapping.row_ids(ids).items():
        offsets = np.array(layout.head_offsets(layer_id))
        np.testing.assert_array_equal(rows, hashed[layer_id] + offsets)
        assert rows.dtype == np.int64
        assert rows.min() >= 0 and rows.max() < layout.num_rows(layer_id)
        head_of_row = np.searchsorted(offsets, rows, side="right") - 1  # each column stays in its head's range
        np.testing.assert_array_equal(head_of_row, np.broadcast_to(np.arange(rows.shape[-1]), rows.shape))


def test_multipliers_follow_the_formula_and_are_odd() -> None:
    mapping = NgramHashMapping([1, 15], [646400, 646400], 3, 8, 129_280, 2, 0)
    half_bound = max(1, (np.iinfo(np.int64).max // 129_280) // 2)
    for layer_id in (1, 15):
        r = np.random.default_rng(0 + 10007 * layer_id).integers(0, half_bound, size=3, dtype=np.int64)
        np.testing.assert_array_equal(mapping.multipliers[layer_id], 2 * r + 1)
        assert mapping.multipliers[layer_id].dtype == np.int64
        assert all(int(m) % 2 == 1 for m in mapping.multipliers[layer_id])
    assert mapping.multipliers[1].tolist() != mapping.multipliers[15].tolist()
    again = NgramHashMapping([1, 15], [646400, 646400], 3, 8, 129_280, 2, 0)
    np.testing.assert_array_equal(again.multipliers[15], mapping.multipliers[15])


@pytest.mark.parametrize("vocab", [1, 2, 3, 1000, 129_280, 2**31 - 1, 2**40])
def test_valid_products_never_leave_int64(vocab: int) -> None:
    mapping = NgramHashMapping([0, 9], [50, 50, 50], 4, 1, vocab, 0, 123)
    for layer_id in (0, 9):
        assert max(int(m) for m in mapping.multipliers[layer_id]) * (vocab - 1) <= INT64_MAX


def test_hashing_is_deterministic_and_seeded() -> None:
    ids = np.random.default_rng(2).integers(0, 1000, (4, 16))
    np.testing.assert_array_equal(_mapping().hash(ids)[4], _mapping().hash(ids)[4])
    assert not np.array_equal(_mapping(seed=1).hash(ids)[4], _mapping().hash(ids)[4])
    assert not np.array_equal(_mapping().hash(ids)[1], _mapping().hash(ids)[4])


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.zeros(5, dtype=np.int64), "2-D integer array"),
        (np.zeros((1, 2, 3), dtype=np.int64), "2-D integer array"),
        (np.zeros((2, 3), dtype=np.float32), "2-D integer array"),
        (np.zeros((2, 3), dtype=bool), "2-D integer array"),
        (np.array([[0, 1000]]), r"compressed id 1000 is out of range: ids must be in \[0, 1000\)"),
        (np.array([[-1, 0]]), "compressed id -1 is out of range"),
        (np.array([[2**64 - 1]], dtype=np.uint64), "out of range"),
    ],
)
def test_bad_input_is_rejected(ids: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _mapping().hash(ids)
    with pytest.raises(InvalidArgumentError, match=message):
        _mapping().row_ids(ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pad_id": 1000}, "pad_id 1000 is not a compressed id"),
        ({"pad_id": -1}, "pad_id -1"),
        ({"compressed_vocab_size": 0, "pad_id": 0}, "compressed_vocab_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"max_ngram": 1, "vocab_size_per_ngram": []}, "max_ngram"),
        ({"vocab_size_per_ngram": [97]}, "vocab_size_per_ngram has 1 entries"),
        ({"layer_ids": [1, 1]}, "duplicates"),
        ({"heads_per_ngram": 0}, "heads_per_ngram"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict, message: str) -> None:
    config = dict(
        layer_ids=[1, 4],
        vocab_size_per_ngram=[97, 97],
        max_ngram=3,
        heads_per_ngram=2,
        compressed_vocab_size=1000,
        pad_id=2,
        seed=0,
    )
    with pytest.raises(InvalidArgumentError, match=message):
        NgramHashMapping(**{**config, **kwargs})


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20),
    prime=st.integers(2, 2**40),
    offset=st.integers(0, 2**40),
)
def test_floor_division_remainder_is_numpys_remainder(values: list[int], prime: int, offset: int) -> None:
    mix = np.array(values, dtype=np.int64)
    out, scratch = np.empty_like(mix), np.empty_like(mix)
    _remainder(mix, prime, out, scratch)
    np.testing.assert_array_equal(out, mix % prime)
    assert out.tolist() == [v % prime for v in values]
    _remainder(mix, prime, out, scratch, offset)
    assert out.tolist() == [v % prime + offset for v in values]


@settings(max_examples=50, deadline=None)
@given(
    max_ngram=st.integers(2, 5),
    heads=st.integers(1, 3),
    vocab=st.integers(1, 2**40),
    seed=st.integers(0, 2**32),
    sizes=st.lists(st.integers(2, 500), min_size=4, max_size=4),
    data=st.data(),
)
def test_vectorised_hash_equals_the_slow_rule(
    max_ngram: int, heads: int, vocab: int, seed: int, sizes: list[int], data: st.DataObject
) -> None:
    layer_ids = data.draw(st.lists(st.integers(0, 60), min_size=1, max_size=2, unique=True))
    pad = data.draw(st.integers(0, vocab - 1))
    mapping = NgramHashMapping(layer_ids, sizes[: max_ngram - 1], max_ngram, heads, vocab, pad, seed)
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 7))
    ids = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=B * T, max_size=B * T))).reshape(B, T)
    hashed, rows = mapping.hash(ids), mapping.row_ids(ids)
    layout = mapping.layout(dim=4)
    for layer_id in layer_ids:
        assert hashed[layer_id].tolist() == _slow(mapping, ids, layer_id)
        np.testing.assert_array_equal(rows[layer_id], hashed[layer_id] + layout.head_offsets(layer_id))


def test_explicit_head_sizes_drive_the_hash_and_the_layout() -> None:
    sizes = (((1000, 1001), (997, 5)),)
    mapping = NgramHashMapping([3], [50, 50], 3, 2, compressed_vocab_size=40, pad_id=0, seed=1, head_sizes=sizes)
    assert mapping.primes(3) == [[1000, 1001], [997, 5]]
    hashes = mapping.hash(np.random.default_rng(0).integers(0, 40, (4, 30)))[3]  # [B, T, heads]
    assert (hashes < np.array([1000, 1001, 997, 5])).all() and (hashes >= 0).all()
    layout = mapping.layout(dim=8)
    assert layout.head_sizes_override == sizes and layout.num_rows(3) == 1000 + 1001 + 997 + 5
    assert (mapping.row_ids(np.zeros((1, 3), np.int64))[3] < layout.num_rows(3)).all()
