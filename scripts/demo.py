"""The main job: create an Engram table, serve it, look rows up through the client, report.

    python scripts/demo.py [--table tables/demo] [--steps 20]

The lookups mimic Engram's traffic: for a batch of token sequences, every position
reads one row per hash head (orders 2..N x heads) of every Engram layer; N-gram
frequencies are Zipfian, so many ids repeat within a batch and the client sends each
distinct id once. Every row received is checked against the table file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from client import InvalidArgumentError, MemstoreClient  # noqa: E402
from memstore.cli import describe_table  # noqa: E402
from memstore.errors import TableFormatError  # noqa: E402
from memstore.launch import start_daemon, stop_daemon  # noqa: E402
from memstore.layout import EngramLayout  # noqa: E402
from memstore.manifest import Manifest  # noqa: E402
from memstore.table import Table  # noqa: E402

LAYOUT = EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(50_000, 50_000), max_ngram=3, heads_per_ngram=8, dim=32)
CREATE_ARGS = [
    "--layers",
    "1,4",
    "--vocab-size-per-ngram",
    "50000,50000",
    "--max-ngram",
    "3",
    "--heads-per-ngram",
    "8",
    "--dim",
    "32",
    "--dtype",
    "float16",
    "--seed",
    "0",
]


def _engram_row_ids(
    layout: EngramLayout, layer_id: int, batch: int, seq_len: int, rng: np.random.Generator
) -> np.ndarray:
    """Row ids [batch, seq_len, heads] of one layer for Zipfian N-gram traffic (head offsets added)."""
    sizes = np.array(layout.head_sizes(layer_id))
    offsets = np.array(layout.head_offsets(layer_id))
    ngram_rank = rng.zipf(1.2, size=(batch, seq_len, len(sizes)))  # [B, T, heads], rank 1 is most frequent
    return offsets + (ngram_rank * 2_654_435_761) % sizes  # [B, T, heads]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=REPO / "tables" / "demo")
    parser.add_argument("--steps", type=int, default=20, help="lookup steps (one batch of sequences each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    print("== 1. create the table")
    try:
        existing = Manifest.read(args.table)
    except TableFormatError:
        existing = None
    if existing is not None and existing.layout == LAYOUT:
        print(f"reusing {args.table}\n{describe_table(existing)}")
    else:
        subprocess.run(
            [sys.executable, "-m", "memstore", "create", str(args.table), *CREATE_ARGS, "--overwrite"], check=True
        )

    print("\n== 2. serve it")
    daemon, address = start_daemon(args.table)
    try:
        _use(address, args)
    finally:
        print("\n== 4. stop the daemon (SIGTERM)")
        code = stop_daemon(daemon)
        print(f"daemon exited with code {code}")
    return 0 if code == 0 else 1


def _use(address: str, args: argparse.Namespace) -> None:
    print(f"\n== 3. look rows up through the client at {address}")
    rng = np.random.default_rng(0)
    expected_fingerprint = Manifest(layout=LAYOUT).fingerprint
    with MemstoreClient(address, expected_fingerprint=expected_fingerprint) as client, Table.open(args.table) as table:
        manifest = client.describe()
        print(f"connected: fingerprint {manifest.fingerprint} matches the model's layout; dtype {manifest.dtype.value}")
        ids_total = distinct_total = 0
        latencies = []
        for _ in range(args.steps):
            for layer_id in LAYOUT.layer_ids:
                ids = _engram_row_ids(LAYOUT, layer_id, args.batch, args.seq_len, rng)  # [B, T, heads]
                start = time.perf_counter()
                rows = client.lookup(layer_id, ids)  # [B, T, heads, dim]
                latencies.append(time.perf_counter() - start)
                expected = table.gather(layer_id, ids.reshape(-1)).reshape(rows.shape)
                if not np.array_equal(rows.numpy(), expected):
                    raise SystemExit(f"rows of layer {layer_id} differ from the table file")
                ids_total += ids.size
                distinct_total += len(np.unique(ids))
        lat = np.array(latencies) * 1e3
        print(
            f"{len(latencies)} lookups of [{args.batch}, {args.seq_len}, {ids.shape[-1]}] ids -> rows "
            f"{tuple(rows.shape)} {rows.dtype}, all equal to the table file"
        )
        print(
            f"ids requested {ids_total:,}, distinct per lookup {distinct_total:,} "
            f"({1 - distinct_total / ids_total:.0%} saved by dedup)"
        )
        print(
            f"latency per lookup: p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms; "
            f"{ids_total / lat.sum() * 1e3 / 1e6:.2f} M rows/s"
        )
        try:
            client.lookup(1, [LAYOUT.num_rows(1)])
        except InvalidArgumentError as exc:
            print(f"a bad id is refused with the project's error: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
