"""Engram N-gram hashing speed, and the compression ratio of a tokenizer.

    python -m benchmarks.hashing                                # hash 1M tokens, two layers
    python -m benchmarks.hashing --tokenizer path/tokenizer.json  # also: that tokenizer's compression

Hashing uses Engram's demo config (layers [1, 15], 646,400 rows per order before the prime rule,
orders 2..3, 8 heads each, pad 2, seed 0) with a compressed vocabulary of 100,000 ids, on random
ids of shape [8, 131072]; it reports the median of a few runs of `hash` and of `row_ids`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from model.hashing import NgramHashMapping

DEMO = dict(
    layer_ids=[1, 15],
    vocab_size_per_ngram=[646_400, 646_400],
    max_ngram=3,
    heads_per_ngram=8,
    compressed_vocab_size=100_000,
    pad_id=2,
    seed=0,
)


def _median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: first-touch page faults of the outputs, lazy imports
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_hashing(batch: int, length: int, runs: int) -> None:
    mapping = NgramHashMapping(**DEMO)
    ids = np.random.default_rng(0).integers(0, DEMO["compressed_vocab_size"], (batch, length), dtype=np.int64)
    tokens = batch * length
    heads = (DEMO["max_ngram"] - 1) * DEMO["heads_per_ngram"]
    print(
        f"hashing {tokens:,} tokens ([{batch}, {length}]) for layers {DEMO['layer_ids']}, "
        f"{heads} heads each; median of {runs} runs"
    )
    for name, fn in (("hash", mapping.hash), ("row_ids", mapping.row_ids)):
        seconds = _median_seconds(lambda: fn(ids), runs)
        print(f"  {name:8s} {seconds * 1e3:8.1f} ms   {tokens / seconds / 1e6:6.1f} M tokens/s")


def bench_compression(path: Path) -> None:
    from model.compression import CompressedTokenizer

    start = time.perf_counter()
    compressed = CompressedTokenizer.from_file(path)
    seconds = time.perf_counter() - start
    print(
        f"tokenizer {path}: {compressed.original_vocab_size:,} ids -> {compressed.compressed_vocab_size:,} "
        f"compressed ids, {compressed.ratio:.2%} fewer (built in {seconds:.1f} s)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json whose compression ratio to report")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=131_072)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    bench_hashing(args.batch, args.length, args.runs)
    if args.tokenizer is not None:
        bench_compression(args.tokenizer)


if __name__ == "__main__":
    main()
