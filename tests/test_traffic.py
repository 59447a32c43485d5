"""The traffic statistics (model/cache_sim.py, model/zipf.py, model/traffic.py) on small streams with
known answers: hit counts against brute-force caches, stack distances by hand, the power-law fit on
synthetic samples, the C extension against the Python fallback, and the streaming path's memory."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from model import cache_sim, traffic
from model.cache_sim import Policy, StreamShape
from model.hashing import NgramHashMapping
from model.zipf import fit_power_law, hurwitz_zeta

REPO = Path(__file__).resolve().parents[1]
PATHS = [pytest.param(False, id="python")] + ([pytest.param(True, id="c")] if cache_sim.compiled_available() else [])


# ---- brute-force caches: the definitions, one access at a time ----


def _order(t: int, shape: StreamShape) -> int:
    return (t % shape.heads) // shape.per_order


def _brute_lru(stream: list[int], size: int, shape: StreamShape) -> list[int]:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = [0] * shape.orders
    for t, row in enumerate(stream):
        if row in cache:
            hits[_order(t, shape)] += 1
            cache.move_to_end(row)
        else:
            cache[row] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits


def _brute_lfu(stream: list[int], size: int, shape: StreamShape) -> list[int]:
    counts: dict[int, int] = {}
    last: dict[int, int] = {}
    cache: set[int] = set()
    hits = [0] * shape.orders
    for t, row in enumerate(stream):
        counts[row] = counts.get(row, 0) + 1
        if row in cache:
            hits[_order(t, shape)] += 1
        else:
            if len(cache) == size:  # evict the fewest accesses, the least recently used among equals
                cache.remove(min(cache, key=lambda r: (counts[r], last[r])))
            cache.add(row)
        last[row] = t
    return hits


def _next_use(stream: list[int], t: int, row: int) -> float:
    try:
        return stream.index(row, t + 1)
    except ValueError:
        return math.inf


def _brute_opt(stream: list[int], size: int, shape: StreamShape) -> list[int]:
    cache: set[int] = set()
    hits = [0] * shape.orders
    for t, row in enumerate(stream):
        if row in cache:
            hits[_order(t, shape)] += 1
            continue
        if len(cache) < size:
            cache.add(row)
            continue
        farthest = max(cache | {row}, key=lambda r: (_next_use(stream, t, r), r != row))
        if farthest != row:
            cache.remove(farthest)
            cache.add(row)
    return hits


def _best_possible(stream: tuple[int, ...], size: int) -> int:
    """The most hits any policy can get, by trying every admission and eviction (tiny streams only)."""

    @functools.lru_cache(maxsize=None)
    def best(t: int, cache: frozenset[int]) -> int:
        if t == len(stream):
            return 0
        row = stream[t]
        if row in cache:
            return 1 + best(t + 1, cache)
        options = [best(t + 1, cache)]  # do not admit
        if len(cache) < size:
            options.append(best(t + 1, cache | {row}))
        else:
            options += [best(t + 1, (cache - {victim}) | {row}) for victim in cache]
        return max(options)

    return best(0, frozenset())


def _write(tmp_path: Path, stream: list[int] | np.ndarray) -> Path:
    path = tmp_path / "stream.u32"
    np.asarray(stream, dtype="<u4").tofile(path)
    return path


def _zipf_stream(n: int, rows: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return ((rng.zipf(1.4, size=n) * 7919) % rows).tolist()  # skewed, spread over the rows


# ---- the caches ----


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("chunk", [1 << 20, 37])  # one chunk; many, with state carried across them
def test_hit_counts_match_brute_force_caches(tmp_path, compiled: bool, chunk: int) -> None:
    shape = StreamShape(num_rows=300, heads=6, per_order=3)
    stream = _zipf_stream(1200, shape.num_rows, seed=1)
    path, n = _write(tmp_path, stream), len(stream)
    sizes = [1, 2, 5, 17, 60]
    lru = cache_sim.lru_pass(path, n, shape, np.array(sizes), compiled=compiled, chunk=chunk)
    cache_sim.next_use_pass(path, n, shape, tmp_path / "next.u32", compiled=compiled, chunk=chunk)
    for i, size in enumerate(sizes):
        assert lru.hits[:, i].tolist() == _brute_lru(stream, size, shape), size
        lfu = cache_sim.simulate(Policy.LFU, path, n, shape, size, compiled=compiled, chunk=chunk)
        assert lfu.tolist() == _brute_lfu(stream, size, shape), size
        opt = cache_sim.simulate(
            Policy.OPT, path, n, shape, size, tmp_path / "next.u32", compiled=compiled, chunk=chunk
        )
        assert opt.tolist() == _brute_opt(stream, size, shape), size
        assert opt.sum() >= max(lfu.sum(), lru.hits[:, i].sum())
    distinct = len(set(stream))
    assert lru.compulsory.sum() == distinct
    assert lru.accesses.tolist() == [n // 2, n // 2]


@pytest.mark.parametrize("compiled", PATHS)
def test_lru_stays_exact_across_compactions(tmp_path, compiled: bool) -> None:
    """The markers are compacted every 2 x largest size + 1024 accesses; a compaction that fell on a re-read
    kept the row's old marker beside its new one, a phantom row one deeper in the stack until the next
    compaction, so now and then a hit at the largest sizes was lost (3 of these 40 streams; up to 8 hits)."""
    sizes = [1, 3, 8, 20]
    for seed in range(40):
        rng = np.random.default_rng(seed)
        shape = StreamShape(num_rows=int(rng.integers(20, 400)), heads=1, per_order=1)
        stream = rng.integers(0, shape.num_rows, int(rng.integers(1100, 4000))).tolist()  # 1-3 compactions
        path, n = _write(tmp_path, stream), len(stream)
        lru = cache_sim.lru_pass(path, n, shape, np.array(sizes), compiled=compiled)
        assert lru.hits[0].tolist() == [_brute_lru(stream, size, shape)[0] for size in sizes], seed


@pytest.mark.parametrize("compiled", PATHS)
def test_opt_is_the_best_any_policy_can_do(tmp_path, compiled: bool) -> None:
    shape = StreamShape(num_rows=6, heads=1, per_order=1)
    rng = np.random.default_rng(3)
    for trial in range(4):
        stream = rng.integers(0, 5, size=14).tolist()
        path = _write(tmp_path, stream)
        cache_sim.next_use_pass(path, len(stream), shape, tmp_path / "next.u32", compiled=compiled)
        for size in (1, 2, 3):
            opt = cache_sim.simulate(
                Policy.OPT, path, len(stream), shape, size, tmp_path / "next.u32", compiled=compiled
            )
            assert int(opt.sum()) == _best_possible(tuple(stream), size), (trial, size, stream)


@pytest.mark.parametrize("compiled", PATHS)
def test_stack_distances_by_hand(tmp_path, compiled: bool) -> None:
    # a b c a b d a c: distances -, -, -, 3, 3, -, 3, 4 (distinct rows since the last use, itself included)
    stream = [0, 1, 2, 0, 1, 3, 0, 2]
    shape = StreamShape(num_rows=4, heads=1, per_order=1)
    lru = cache_sim.lru_pass(
        _write(tmp_path, stream), len(stream), shape, np.array([2, 3, 4]), compiled=compiled, chunk=5, checkpoint=3
    )
    assert lru.hits.tolist() == [[0, 3, 4]]
    assert [(t, d.tolist()) for t, d in lru.growth] == [(3, [3]), (6, [4]), (8, [4])]  # distinct rows so far
    assert lru.compulsory.tolist() == [4]
    # log2 bins: (2, 4] holds 3, 3, 3 and 4; nothing deeper than the largest cache (4)
    assert lru.log2hist[0, :3].tolist() == [0, 0, 4]
    assert lru.log2hist[0, cache_sim.LOG2_BINS :].tolist() == [0, 4]


@pytest.mark.parametrize("compiled", PATHS)
def test_rows_deeper_than_the_largest_cache_are_forgotten_but_not_first_touches(tmp_path, compiled: bool) -> None:
    # The tree holds 2 * 2 + 1024 slots: 3000 accesses compact it twice.
    shape = StreamShape(num_rows=50, heads=1, per_order=1)
    stream = (np.arange(3000) % 50).tolist()  # a cycle of 50 rows: every reuse is at distance 50
    lru = cache_sim.lru_pass(_write(tmp_path, stream), len(stream), shape, np.array([1, 2]), compiled=compiled)
    assert lru.hits.tolist() == [[0, 0]]
    assert lru.compulsory.tolist() == [50]
    assert lru.log2hist[0, cache_sim.LOG2_BINS] == 3000 - 50


@pytest.mark.skipif(not cache_sim.compiled_available(), reason="the C extension is not built")
def test_the_c_extension_agrees_with_the_python_fallback(tmp_path) -> None:
    shape = StreamShape(num_rows=2000, heads=8, per_order=4)
    stream = _zipf_stream(6000, shape.num_rows, seed=5)
    path, n = _write(tmp_path, stream), len(stream)
    sizes = np.array([3, 40, 200])
    results = {}
    for compiled in (False, True):
        lru = cache_sim.lru_pass(path, n, shape, sizes, compiled=compiled, chunk=1000)
        nexts = tmp_path / f"next-{compiled}.u32"
        cache_sim.next_use_pass(path, n, shape, nexts, compiled=compiled, chunk=1000)
        sims = [
            cache_sim.simulate(policy, path, n, shape, int(size), nexts, compiled=compiled, chunk=1000).tolist()
            for policy in (Policy.LFU, Policy.OPT)
            for size in sizes
        ]
        results[compiled] = (lru.hits.tolist(), lru.log2hist.tolist(), lru.counts.tolist(), nexts.read_bytes(), sims)
    assert results[False] == results[True]


@pytest.mark.parametrize("compiled", PATHS)
def test_remap_names_rows_in_order_of_first_touch(tmp_path, compiled: bool) -> None:
    stream = [70, 3, 70, 9, 3, 12, 9]
    path = _write(tmp_path, stream)
    rows_of = cache_sim.remap_pass(path, len(stream), 100, tmp_path / "dense.u32", compiled=compiled, chunk=3)
    assert rows_of.tolist() == [70, 3, 9, 12]
    assert np.fromfile(tmp_path / "dense.u32", dtype="<u4").tolist() == [0, 1, 0, 2, 1, 3, 2]


def test_cache_sizes_must_ascend(tmp_path) -> None:
    shape = StreamShape(num_rows=4, heads=1, per_order=1)
    with pytest.raises(ValueError, match="ascending"):
        cache_sim.lru_pass(_write(tmp_path, [0, 1]), 2, shape, np.array([3, 2]))


# ---- the power-law fit ----


def test_hurwitz_zeta() -> None:
    # Known values, and the recurrence zeta(s, q) - zeta(s, q + 1) = q**-s; float64 rounding of ~30 terms.
    assert hurwitz_zeta(2.0, 1.0) == pytest.approx(math.pi**2 / 6, rel=1e-13)
    assert hurwitz_zeta(4.0, 1.0) == pytest.approx(math.pi**4 / 90, rel=1e-13)
    q = np.array([1.0, 2.5, 10.0, 1e4])
    for s in (1.05, 1.7, 3.0, 9.0):
        np.testing.assert_allclose(hurwitz_zeta(s, q) - hurwitz_zeta(s, q + 1), q**-s, rtol=1e-9)


def _power_law_samples(alpha: float, x_min: int, n: int, seed: int) -> np.ndarray:
    """Exact discrete power-law samples on [x_min, 10**6] (the mass beyond is below 1e-8 for alpha >= 2)."""
    support = np.arange(x_min, 10**6 + 1, dtype=np.float64)
    p = support**-alpha
    return np.random.default_rng(seed).choice(support.astype(np.int64), size=n, p=p / p.sum())


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.2])
def test_fit_recovers_the_exponent_at_a_known_x_min(alpha: float) -> None:
    samples = _power_law_samples(alpha, x_min=3, n=20_000, seed=int(alpha * 10))
    fit = fit_power_law(samples, x_min=3)
    # Four standard errors of the MLE, (alpha - 1) / sqrt(n) (Clauset et al., eq. 3.2).
    assert abs(fit.alpha - alpha) <= 4 * (alpha - 1) / math.sqrt(fit.n_tail)
    assert fit.x_min == 3 and fit.n_tail == 20_000


def test_fit_chooses_x_min_above_a_body_that_is_not_a_power_law() -> None:
    rng = np.random.default_rng(7)
    tail = _power_law_samples(2.5, x_min=20, n=20_000, seed=8)
    body = rng.integers(1, 20, size=30_000)  # flat below 20
    fit = fit_power_law(np.concatenate([body, tail]))
    assert fit.x_min >= 20  # the flat body would pull alpha far down
    assert abs(fit.alpha - 2.5) <= 4 * (2.5 - 1) / math.sqrt(fit.n_tail)


# ---- the command ----


def _word_tokenizer(tmp_path: Path, words: int = 300) -> Path:
    vocab = {"[pad]": 0, "[unk]": 1, "[x]": 2} | {f"w{i}": i + 3 for i in range(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[unk]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def _text(tokens: int, words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.5, size=tokens), words) - 1
    lines = [" ".join(f"w{i}" for i in ids[start : start + 12]) for start in range(0, tokens, 12)]
    return "\n".join(lines) + "\n"


def test_streams_are_the_hashes_of_each_document(tmp_path) -> None:
    tokenizer = _word_tokenizer(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(_text(200, 300, seed=1))
    (docs / "b.txt").write_text(_text(150, 300, seed=2))
    config = traffic.TrafficConfig(
        texts=(docs,), layout=traffic.DEMO, tokenizer=tokenizer, chunk_tokens=7, progress=False
    )
    meta = traffic.write_streams(config, tmp_path / "out")
    assert meta["tokens"] == 350 and meta["documents"] == 2
    loaded = Tokenizer.from_file(str(tokenizer))
    from model.compression import CompressedTokenizer

    compression = CompressedTokenizer(loaded)
    layout = traffic.DEMO
    mapping = NgramHashMapping(
        layout.layer_ids, layout.vocab_size_per_ngram, layout.max_ngram, layout.heads_per_ngram,
        compression.compressed_vocab_size, compression.compressed_id(2), seed=0,
    )  # fmt: skip
    expected = {layer: [] for layer in layout.layer_ids}
    for name in ("a.txt", "b.txt"):  # each document hashed whole, padded at its start
        ids = compression.compress(np.array(loaded.encode((docs / name).read_text()).ids))
        for layer, rows in mapping.row_ids(ids[None, :]).items():
            expected[layer].append(rows[0])
    heads = (layout.max_ngram - 1) * layout.heads_per_ngram
    for layer in layout.layer_ids:
        stream = np.fromfile(tmp_path / "out" / f"layer-{layer}.u32", dtype="<u4").reshape(-1, heads)
        np.testing.assert_array_equal(stream, np.concatenate(expected[layer]))
    assert json.loads((tmp_path / "out" / "streams.json").read_text())["tokens"] == 350


@pytest.mark.skipif(not cache_sim.compiled_available(), reason="the C extension is not built")
def test_the_report_is_the_same_from_c_and_python(tmp_path) -> None:
    tokenizer = _word_tokenizer(tmp_path)
    (tmp_path / "t.txt").write_text(_text(1500, 300, seed=3))
    reports = []
    for compiled in (True, False):
        config = traffic.TrafficConfig(
            texts=(tmp_path / "t.txt",),
            layout=traffic.DEMO,
            tokenizer=tokenizer,
            sim_fractions=(1e-3, 1e-2),
            compiled=compiled,
            progress=False,
        )
        report = traffic.run(config)
        for layer in report["layers"].values():
            del layer["seconds"]
        reports.append({k: v for k, v in report.items() if k not in ("compiled", "stream_seconds")})
    assert reports[0] == reports[1]
    printed = traffic.format_report(reports[0])
    assert "layer 1: 160,316 rows; 8 rows = 512 bytes per token" in printed and "infinite" in printed
    layer = reports[0]["layers"]["1"]
    assert layer["rows_per_token"] == 8 and layer["bytes_per_token"] == 8 * 64
    for policy in ("lru", "lfu", "opt"):
        for point in layer["hit_rates"][policy]:
            assert point["all"] <= layer["ceiling"]["all"] + 1e-12


def test_presets() -> None:
    from model.engram import EngramConfig

    assert traffic.DEMO == EngramConfig().layout()
    assert [traffic.V41_FLASH.num_rows(layer) for layer in (1, 14)] == [384_006_168, 384_016_682]


def test_the_memstore_create_flags_give_the_preset_rows(tmp_path) -> None:
    (tmp_path / "t.txt").write_text("w1 w2\n")
    flags = "--layers 1,14 --vocab-size-per-ngram 16000000,16000000,16000000 --max-ngram 4 --heads-per-ngram 8"
    args = traffic._parser().parse_args([*flags.split(), "--row-bytes", "264", str(tmp_path / "t.txt")])
    config = traffic.config_from_args(args)
    for layer in (1, 14):
        assert config.layout.head_sizes(layer) == traffic.V41_FLASH.head_sizes(layer)
    assert config.row_bytes == 264


def test_a_layout_by_flags_needs_its_row_size(tmp_path) -> None:
    (tmp_path / "t.txt").write_text("w1 w2\n")
    args = ["--layers", "1", "--vocab-size-per-ngram", "1000,1000", str(tmp_path / "t.txt")]
    assert traffic.main(args) == 2


def _peak_rss_kib(tmp_path: Path, tokenizer: Path, text: Path, tokens: int) -> int:
    # VmHWM, not ru_maxrss: a child's ru_maxrss counts the forking parent's (pytest's) pages.
    code = (
        "import sys\n"
        "from model.traffic import main\n"
        "main(sys.argv[1:])\n"
        "print('peak', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    args = [str(text), "--layout", "demo", "--tokenizer", str(tokenizer), "--repeat", "1000"]
    args += ["--max-tokens", str(tokens), "--chunk-tokens", "4096", "--chunk-accesses", "65536"]
    args += ["--no-progress", "--sim-sizes", "0.01"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    return int(out.stdout.rsplit("peak", 1)[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_memory_does_not_grow_with_the_text(tmp_path) -> None:
    # Streams of 20k and 200k tokens: holding the second in memory (its rows in two layers, 8 per token,
    # as int64) would take 23 MB more than the first. The peak of the same command moves by a few MB
    # from run to run (allocator arenas, the tokenizer's threads on a loaded host: 6.6 MB seen), so the
    # bound is half of what holding the stream would add.
    tokenizer = _word_tokenizer(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text(_text(5000, 300, seed=4))
    small = _peak_rss_kib(tmp_path, tokenizer, text, 20_000)
    large = _peak_rss_kib(tmp_path, tokenizer, text, 200_000)
    held_kib = (200_000 - 20_000) * 2 * 8 * 8 // 1024  # the larger stream's extra rows, as int64
    assert large - small < held_kib // 2, (small, large)
