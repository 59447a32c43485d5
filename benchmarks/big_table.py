"""A 100B-parameter table on one small host: lazy create, lookups vs. a 1B-parameter table, daemon RSS.

    python -m benchmarks.big_table [--batches 1024,65536] [--repeats 20]

Creates (or reuses, under tables/) a lazy float16 table of 1.0e11 parameters (200 GB if
written; sparse files, almost no disk) and an eager 1B-parameter table (2 GB), serves each with
`memstore serve` (gRPC, same-host path off), and looks up uniformly random row ids, alternating
tables per repeat. Prints rows/s per table and batch, the ratio, and each daemon's resident
memory before and after the lookups.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, ensure_table
from client import ClientConfig, MemstoreClient
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import TableFormatError
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.tabledir.manifest import Init, Manifest

HUNDRED_BILLION = EngramLayout(
    layer_ids=(2, 15), vocab_size_per_ngram=(97_700_000, 97_700_000), max_ngram=3, heads_per_ngram=8, dim=32
)
ONE_BILLION = EngramLayout(
    layer_ids=(2, 15), vocab_size_per_ngram=(977_000, 977_000), max_ngram=3, heads_per_ngram=8, dim=32
)


def _rss_mib(pid: int) -> str:
    """Resident memory: anonymous (the daemon's own) and file-backed (mapped table pages, reclaimable)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    anon, files = (int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile"))
    return f"{anon:.0f} MiB anonymous + {files:.0f} MiB mapped file pages"


def _lazy_table(path: Path) -> Manifest:
    manifest = Manifest(layout=HUNDRED_BILLION, dtype=DType.FLOAT16, init=Init.LAZY)
    try:
        if Manifest.read(path) == manifest:
            return manifest
    except TableFormatError:
        pass
    start = time.perf_counter()
    create_table(path, manifest, overwrite=path.exists())
    print(f"created the lazy table in {time.perf_counter() - start:.2f} s")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1024,65536")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    big_path, small_path = REPO / "tables" / "bench-100b-lazy", REPO / "tables" / "bench-1b"
    big = _lazy_table(big_path)
    small = ensure_table(small_path, ONE_BILLION)
    for name, manifest, path in (("100B lazy", big, big_path), ("1B eager", small, small_path)):
        on_disk = sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())
        print(f"{name}: {manifest.layout.num_params:,} parameters, {on_disk / 2**20:,.1f} MiB on disk")
    layer = HUNDRED_BILLION.layer_ids[1]
    daemons = {name: start_daemon(path, ["--no-same-host"]) for name, path in (("100B", big_path), ("1B", small_path))}
    try:
        clients = {
            name: MemstoreClient(address, ClientConfig(same_host=False)) for name, (_, address) in daemons.items()
        }
        rss_before = {name: _rss_mib(process.pid) for name, (process, _) in daemons.items()}
        rng = np.random.default_rng(0)
        print("\n| batch | 100B lazy rows/s | 1B eager rows/s | 1B / 100B |")
        print("|---:|---:|---:|---:|")
        for batch in batches:
            times: dict[str, list[float]] = {"100B": [], "1B": []}
            for repeat in range(args.repeats):
                for name in ("100B", "1B") if repeat % 2 == 0 else ("1B", "100B"):
                    layout = HUNDRED_BILLION if name == "100B" else ONE_BILLION
                    ids = rng.integers(0, layout.num_rows(layer), batch)
                    start = time.perf_counter()
                    clients[name].lookup(layer, ids)
                    times[name].append(time.perf_counter() - start)
            big_rate, small_rate = (batch / statistics.median(times[n]) for n in ("100B", "1B"))
            print(f"| {batch:,} | {big_rate / 1e6:.2f} M | {small_rate / 1e6:.2f} M | {small_rate / big_rate:.1f}x |")
        rss_after = {name: _rss_mib(process.pid) for name, (process, _) in daemons.items()}
        for name in daemons:
            print(f"daemon RSS {name}: before {rss_before[name]}; after {rss_after[name]}")
        for client in clients.values():
            client.close()
    finally:
        for process, _ in daemons.values():
            stop_daemon(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
