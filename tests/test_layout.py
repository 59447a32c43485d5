"""The layout: Engram's prime rule against an independent reference, row arithmetic,
fingerprint stability, validation and the JSON form."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest

from memstore.errors import InvalidArgumentError
from memstore.layout import EngramLayout, engram_primes, fingerprint, is_prime

# --------------------------------------------------------------------------- reference


def _trial_division_is_prime(n: int) -> bool:
    """Primality by trial division: slow, obviously correct."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    for d in range(3, math.isqrt(n) + 1, 2):
        if n % d == 0:
            return False
    return True


def _sieve(limit: int) -> np.ndarray:
    """All primes <= limit (sieve of Eratosthenes)."""
    flags = np.ones(limit + 1, dtype=bool)
    flags[:2] = False
    for p in range(2, math.isqrt(limit) + 1):
        if flags[p]:
            flags[p * p :: p] = False
    return np.flatnonzero(flags)


def _reference_primes(
    layer_ids: Sequence[int], vocab_size_per_ngram: Sequence[int], max_ngram: int, heads_per_ngram: int
) -> dict[int, list[list[int]]]:
    """Engram's rule, re-implemented from its description on a sieve.

    Walk layers in order, then orders 2..N; each order's search starts at vocab - 1 and
    each head takes the smallest prime above the previous start that no earlier head took.
    """
    # Every head needs at most (number of heads overall) primes above its start.
    total_heads = len(layer_ids) * (max_ngram - 1) * heads_per_ngram
    limit = max(vocab_size_per_ngram) * 2 + 64 * total_heads + 100
    primes = [int(p) for p in _sieve(limit)]
    used: set[int] = set()
    result: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order: list[list[int]] = []
        for order in range(2, max_ngram + 1):
            start = vocab_size_per_ngram[order - 2] - 1
            heads: list[int] = []
            for _ in range(heads_per_ngram):
                found = next(p for p in primes if p > start and p not in used)
                used.add(found)
                heads.append(found)
                start = found
            per_order.append(heads)
        result[layer_id] = per_order
    return result


# --------------------------------------------------------------------------- is_prime


def test_is_prime_matches_trial_division_up_to_20000() -> None:
    mismatches = [n for n in range(20_001) if is_prime(n) != _trial_division_is_prime(n)]
    assert mismatches == []


@pytest.mark.parametrize("n", [-7, -1, 0, 1])
def test_is_prime_rejects_below_two(n: int) -> None:
    assert not is_prime(n)


@pytest.mark.parametrize(
    "n",
    [
        2**61 - 1,  # Mersenne prime
        2**31 - 1,  # Mersenne prime
        2**89 - 1,  # Mersenne prime (beyond 2**64)
        1_000_000_007,
        998_244_353,
        646_403,  # first prime of the Engram demo layout
        41,  # the largest witness itself
        43,
    ],
)
def test_is_prime_known_primes(n: int) -> None:
    assert is_prime(n)


@pytest.mark.parametrize(
    "n",
    [
        561,  # Carmichael numbers: fool the Fermat test
        1105,
        1729,
        2465,
        41041,
        825265,
        321197185,
        3215031751,  # strong pseudoprime to bases 2, 3, 5, 7
        3825123056546413051,  # strong pseudoprime to bases 2..23
        318665857834031151167461,  # strong pseudoprime to bases 2..37
        2**61 - 3,
        (2**31 - 1) * (2**61 - 1),
        1_000_000_007**2,
    ],
)
def test_is_prime_known_composites(n: int) -> None:
    assert not is_prime(n)


# --------------------------------------------------------------------------- prime rule

SMALL_CASES = [
    # (layer_ids, vocab_size_per_ngram, max_ngram)
    ((1,), (10,), 2),
    ((1, 4), (10, 12), 3),
    ((4, 1), (10, 12), 3),  # layer order matters
    ((0, 2, 7), (30, 20, 25), 4),  # a later order with a smaller vocab collides with earlier heads
    ((3, 1, 2), (2, 2, 2), 4),  # vocab 2: the search starts at 1, every head collides
    ((5, 6), (100, 97), 3),
    ((9,), (500, 500, 500), 4),
    ((1, 15), (50, 60), 3),
]


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 8])
@pytest.mark.parametrize(("layer_ids", "vocab", "max_ngram"), SMALL_CASES)
def test_engram_primes_matches_reference(
    layer_ids: tuple[int, ...], vocab: tuple[int, ...], max_ngram: int, heads: int
) -> None:
    assert engram_primes(layer_ids, vocab, max_ngram, heads) == _reference_primes(layer_ids, vocab, max_ngram, heads)


def test_engram_primes_hand_worked_collision() -> None:
    # Order 2 takes 11, 13, 17; order 3 starts at 11 too and must skip the used ones.
    assert engram_primes((1,), (10, 12), 3, 3) == {1: [[11, 13, 17], [19, 23, 29]]}
    # The next layer continues above every used prime.
    assert engram_primes((1, 2), (10, 12), 3, 2) == {1: [[11, 13], [17, 19]], 2: [[23, 29], [31, 37]]}


ENGRAM_DEMO = EngramLayout(layer_ids=(1, 15), vocab_size_per_ngram=(646_400, 646_400), max_ngram=3, heads_per_ngram=8)


def test_engram_demo_layout_matches_reference() -> None:
    expected = _reference_primes((1, 15), (646_400, 646_400), 3, 8)
    assert {layer: ENGRAM_DEMO.primes(layer) for layer in ENGRAM_DEMO.layer_ids} == expected


def test_engram_demo_layout_takes_consecutive_primes() -> None:
    # Every order has the same vocab, so the 32 heads are the 32 primes above 646399, in order.
    consecutive = [int(p) for p in _sieve(700_000) if p >= 646_400][:32]
    assigned = [p for layer in ENGRAM_DEMO.layer_ids for p in ENGRAM_DEMO.head_sizes(layer)]
    assert assigned == consecutive
    assert assigned[0] == 646_403


LAYOUTS = [
    EngramLayout(),
    ENGRAM_DEMO,
    EngramLayout(layer_ids=(0, 2, 7), vocab_size_per_ngram=(30, 20, 25), max_ngram=4, heads_per_ngram=5, dim=4),
    EngramLayout(layer_ids=(3, 1), vocab_size_per_ngram=(2, 2), max_ngram=3, heads_per_ngram=4, dim=4),
    EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(500, 700), max_ngram=3, heads_per_ngram=4, dim=16),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
def test_primes_distinct_sorted_and_at_least_vocab(layout: EngramLayout) -> None:
    everything = [p for layer in layout.layer_ids for p in layout.head_sizes(layer)]
    assert len(everything) == len(set(everything)), "a prime was used twice"
    assert all(is_prime(p) for p in everything)
    for layer in layout.layer_ids:
        per_order = layout.primes(layer)
        assert len(per_order) == layout.max_ngram - 1
        for order, heads in enumerate(per_order, start=2):
            assert len(heads) == layout.heads_per_ngram
            assert all(a < b for a, b in zip(heads, heads[1:])), f"layer {layer} order {order} not increasing"
            assert heads[0] >= layout.vocab_size_per_ngram[order - 2]


# --------------------------------------------------------------------------- row arithmetic


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
def test_head_offsets_num_rows_total_rows(layout: EngramLayout) -> None:
    total = 0
    for layer in layout.layer_ids:
        sizes = layout.head_sizes(layer)
        assert sizes == [p for heads in layout.primes(layer) for p in heads]  # order-major
        offsets = layout.head_offsets(layer)
        assert offsets[0] == 0
        assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
        assert layout.num_rows(layer) == sum(sizes) == offsets[-1] + sizes[-1]
        total += layout.num_rows(layer)
    assert layout.total_rows == total
    assert layout.num_params == total * layout.dim


def test_small_layout_rows_by_hand() -> None:
    layout = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(10, 12), max_ngram=3, heads_per_ngram=3, dim=4)
    assert layout.head_sizes(1) == [11, 13, 17, 19, 23, 29]
    assert layout.head_offsets(1) == [0, 11, 24, 41, 60, 83]
    assert layout.num_rows(1) == 112
    assert layout.total_rows == 112
    assert layout.num_params == 448


def test_primes_returns_a_copy() -> None:
    layout = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(10,), max_ngram=2, heads_per_ngram=2, dim=4)
    got = layout.primes(1)
    got[0][0] = 4
    got.append([1])
    assert layout.primes(1) == [[11, 13]]
    assert layout.num_rows(1) == 24


@pytest.mark.parametrize("method", ["primes", "head_sizes", "head_offsets", "num_rows"])
def test_unknown_layer_is_rejected_with_the_known_layers(method: str) -> None:
    layout = EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(10, 12), heads_per_ngram=2, dim=4)
    with pytest.raises(InvalidArgumentError, match=r"unknown Engram layer 2.*\[1, 4\]"):
        getattr(layout, method)(2)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_of_default_layout_is_stable() -> None:
    # Hard-coded on purpose: a change here means every existing table and model mismatch.
    assert fingerprint(EngramLayout(), 0) == "7e1118ea834689f6"


def test_fingerprint_is_deterministic_and_short_hex() -> None:
    a = fingerprint(EngramLayout(), 3)
    assert a == fingerprint(EngramLayout(), 3)
    assert len(a) == 16 and int(a, 16) >= 0


@pytest.mark.parametrize(
    "other",
    [
        {"dim": 33},
        {"layer_ids": (4, 1)},  # layer order changes which layer gets which primes
        {"layer_ids": (1, 5)},
        {"vocab_size_per_ngram": (50_000, 50_001)},
        {"vocab_size_per_ngram": (50_001, 50_000)},
        {"heads_per_ngram": 7},
        {"max_ngram": 4, "vocab_size_per_ngram": (50_000, 50_000, 50_000)},
    ],
    ids=repr,
)
def test_fingerprint_changes_with_layout(other: dict[str, object]) -> None:
    assert fingerprint(EngramLayout(**other), 0) != fingerprint(EngramLayout(), 0)  # type: ignore[arg-type]


def test_fingerprint_changes_with_seed() -> None:
    prints = {fingerprint(EngramLayout(), seed) for seed in (0, 1, 2, 2**32, 2**63 - 1)}
    assert len(prints) == 5


def test_fingerprint_ignores_how_the_layout_was_spelled() -> None:
    spelled = EngramLayout(layer_ids=[1, 4], vocab_size_per_ngram=[50_000, 50_000])  # type: ignore[arg-type]
    assert fingerprint(spelled, 0) == fingerprint(EngramLayout(), 0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_ids": ()}, "layer_ids is empty"),
        ({"layer_ids": (1, 1)}, "duplicates"),
        ({"layer_ids": (-1, 2)}, r"2\*\*32"),
        ({"layer_ids": (2**32,)}, r"2\*\*32"),
        ({"max_ngram": 1, "vocab_size_per_ngram": ()}, "max_ngram is 1"),
        ({"max_ngram": 3, "vocab_size_per_ngram": (100,)}, "vocab_size_per_ngram has 1 entries"),
        ({"max_ngram": 2, "vocab_size_per_ngram": (100, 100)}, "vocab_size_per_ngram has 2 entries"),
        ({"vocab_size_per_ngram": (1, 100)}, "at least 2"),
        ({"vocab_size_per_ngram": (100, -5)}, "at least 2"),
        ({"heads_per_ngram": 0}, "heads_per_ngram is 0"),
        ({"dim": 0}, "dim is 0"),
        ({"dim": -3}, "dim is -3"),
    ],
    ids=repr,
)
def test_invalid_layouts_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        EngramLayout(**kwargs)  # type: ignore[arg-type]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        EngramLayout(layer_ids=(), heads_per_ngram=0, dim=0)
    text = str(info.value)
    assert "layer_ids is empty" in text and "heads_per_ngram is 0" in text and "dim is 0" in text


def test_invalid_layout_is_a_value_error() -> None:
    # Callers that only know ValueError still catch it.
    with pytest.raises(ValueError):
        EngramLayout(dim=0)


# --------------------------------------------------------------------------- JSON form


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
def test_dict_round_trip(layout: EngramLayout) -> None:
    data = layout.to_dict()
    assert EngramLayout.from_dict(data) == layout
    via_json = json.loads(json.dumps(data))
    assert EngramLayout.from_dict(via_json) == layout
    assert fingerprint(EngramLayout.from_dict(via_json), 5) == fingerprint(layout, 5)


def test_to_dict_writes_primes_per_layer() -> None:
    layout = EngramLayout(layer_ids=(1, 2), vocab_size_per_ngram=(10, 12), heads_per_ngram=2, dim=4)
    assert layout.to_dict() == {
        "layer_ids": [1, 2],
        "vocab_size_per_ngram": [10, 12],
        "max_ngram": 3,
        "heads_per_ngram": 2,
        "dim": 4,
        "primes": {"1": [[11, 13], [17, 19]], "2": [[23, 29], [31, 37]]},
    }


def test_from_dict_without_primes_derives_them() -> None:
    data = EngramLayout().to_dict()
    del data["primes"]
    assert EngramLayout.from_dict(data) == EngramLayout()


def test_from_dict_rejects_unknown_keys() -> None:
    data = EngramLayout().to_dict()
    data["n_embed"] = 1024
    with pytest.raises(InvalidArgumentError, match=r"unknown layout keys \['n_embed'\]"):
        EngramLayout.from_dict(data)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda primes: primes["1"][0].__setitem__(0, primes["1"][0][0] + 2),
        lambda primes: primes["1"][1].reverse(),
        lambda primes: primes.pop("4"),
        lambda primes: primes.__setitem__("1", primes.pop("4")),
        lambda primes: primes["4"].append([3]),
    ],
)
def test_from_dict_rejects_wrong_primes(tamper) -> None:  # type: ignore[no-untyped-def]
    data = EngramLayout().to_dict()
    tamper(data["primes"])
    with pytest.raises(InvalidArgumentError, match="prime rule"):
        EngramLayout.from_dict(data)


def test_from_dict_validates_the_sizes() -> None:
    data = EngramLayout().to_dict()
    del data["primes"]
    data["dim"] = 0
    with pytest.raises(InvalidArgumentError, match="dim is 0"):
        EngramLayout.from_dict(data)


EXPLICIT = (((1000, 1001), (997, 5)), ((64, 65), (66, 67)))


def test_explicit_head_sizes_replace_the_prime_rule() -> None:
    layout = EngramLayout(
        layer_ids=(2, 15),
        vocab_size_per_ngram=(10, 10),
        max_ngram=3,
        heads_per_ngram=2,
        dim=4,
        head_sizes_override=EXPLICIT,
    )
    assert layout.primes(2) == [[1000, 1001], [997, 5]] and layout.num_rows(15) == 64 + 65 + 66 + 67
    assert layout.head_offsets(2) == [0, 1000, 2001, 2998]
    data = layout.to_dict()
    assert data["explicit_head_sizes"] is True
    assert EngramLayout.from_dict(json.loads(json.dumps(data))) == layout
    rule = EngramLayout(layer_ids=(2, 15), vocab_size_per_ngram=(10, 10), max_ngram=3, heads_per_ngram=2, dim=4)
    assert fingerprint(layout, 0) != fingerprint(rule, 0)
    without_flag = {k: v for k, v in data.items() if k != "explicit_head_sizes"}
    with pytest.raises(InvalidArgumentError, match="explicit_head_sizes"):
        EngramLayout.from_dict(without_flag)


@pytest.mark.parametrize(
    "sizes, message",
    [(EXPLICIT[:1], "2 layers x 2 orders x 2 heads"), ((((1, 2), (3, 4)),) * 2, "at least 2")],
)
def test_explicit_head_sizes_are_checked(sizes, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        EngramLayout(
            layer_ids=(2, 15), vocab_size_per_ngram=(10, 10), max_ngram=3, heads_per_ngram=2, head_sizes_override=sizes
        )
