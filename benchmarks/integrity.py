"""What row checksums cost: lookup and push throughput through a real daemon, checking on and off.

    python -m benchmarks.integrity [--table-rows 1000000] [--rows 4096] [--seconds 2] [--repeats 5]

Two identical trainable tables (float16, dim 32, Adam) are created; one `memstore serve` child
serves each, one with checksums (the default: checked on first read of each block, kept by every
push, a background scrub at its default period), one with `--no-integrity`. Both are warmed
(every block read once, so the on-side's first-read verification is done: its one-off cost is
reported on its own), then measured side by side: one client alternates calls between the two
daemons, one by one, for `--seconds` (lookups, then pushes), so a load spike on the machine hits
both sides alike; each side's rate is its calls over the time its own calls took. Repeated
`--repeats` times: the best rate of each side is compared.
One client over gRPC on loopback (no same-host reads), each call waiting for its answer.
The daemon's CPU time per call (the least over the repeats) is reported too: it is what the checks
add, and far less disturbed by other load on the machine than throughput. Also reported: one
unthrottled pass over every block of the table in process (what a scrub pass costs, spread over
half the scrub period by the daemon).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import process_cpu_s
from client import ClientConfig, MemstoreClient
from memstore.cli_args import enum_choice
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.integrity import IntegrityConfig
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.live import LiveConfig, LiveTable
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig
from memstore.wal import Durability


def _side_by_side(calls: dict, batches: list, seconds: float, pids: dict) -> dict[str, tuple[float, float, float]]:
    """Per side: (calls per second of its own time, median ms, daemon CPU ms per call), the sides'
    calls alternating one by one for about `seconds`: a load spike on the machine hits both alike."""
    spent = {side: [] for side in calls}
    cpu = {side: process_cpu_s(pid) for side, pid in pids.items()}
    start = time.perf_counter()
    done = 0
    while time.perf_counter() - start < seconds:
        for side in calls if done % 2 else reversed(list(calls)):
            t = time.perf_counter()
            calls[side](*batches[done % len(batches)])
            spent[side].append(time.perf_counter() - t)
        done += 1
    return {
        side: (
            len(times) / sum(times),
            1000 * statistics.median(times),
            1000 * (process_cpu_s(pids[side]) - cpu[side]) / len(times),
        )
        for side, times in spent.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=4096, help="rows per lookup and per push")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per side (the best counts)")
    parser.add_argument("--durability", **enum_choice(Durability), default=Durability.OS)
    args = parser.parse_args()
    per_head = args.table_rows // 16
    layout = EngramLayout(
        layer_ids=(1,), vocab_size_per_ngram=(per_head, per_head), max_ngram=3, heads_per_ngram=8, dim=32
    )
    manifest = Manifest(layout=layout, dtype=DType.FLOAT16, optimizer=OptimizerConfig(kind="adam", lr=0.01))
    num_rows = layout.num_rows(1)
    work = Path(tempfile.mkdtemp(prefix="memstore-integrity-"))
    daemons = {}
    try:
        paths = {side: create_table(work / side, manifest) for side in ("on", "off")}
        start = time.perf_counter()
        config = LiveConfig(durability=args.durability, integrity=IntegrityConfig(scrub_period_s=0))
        with LiveTable.open(paths["on"], config=config) as live:
            opened = time.perf_counter()
            assert live.integrity is not None and live.integrity.verify_all() == []
            scrub_s = time.perf_counter() - opened
        print(
            f"table: {num_rows:,} rows x 32 float16, Adam (rows + 2 state stores); {args.durability.value} durability"
        )
        print(f"one pass over every block in process: {scrub_s:.2f} s (open {opened - start:.2f} s)")
        common = ["--durability", args.durability.value, "--no-same-host"]
        daemons["on"] = start_daemon(paths["on"], common)
        daemons["off"] = start_daemon(paths["off"], [*common, "--no-integrity"])
        rng = np.random.default_rng(0)
        lookups = [(1, rng.choice(num_rows, args.rows, replace=False)) for _ in range(16)]
        pushes = [
            (1, rng.choice(num_rows, args.rows, replace=False), rng.standard_normal((args.rows, 32)).astype("f4"))
            for _ in range(16)
        ]
        clients = {
            side: MemstoreClient(address, ClientConfig(same_host=False)) for side, (_, address) in daemons.items()
        }
        try:
            for side, client in clients.items():  # warm: every block read once (verified, on the on-side)
                t = time.perf_counter()
                for first in range(0, num_rows, 65536):
                    client.lookup(1, np.arange(first, min(num_rows, first + 65536)))
                print(f"warm-up read of every row, checksums {side}: {time.perf_counter() - t:.2f} s")
            best = {(kind, side): 0.0 for kind in ("lookup", "push") for side in clients}
            median = {(kind, side): float("inf") for kind in ("lookup", "push") for side in clients}
            cpu = {(kind, side): float("inf") for kind in ("lookup", "push") for side in clients}
            pids = {side: process.pid for side, (process, _) in daemons.items()}
            for kind, batches in (("lookup", lookups), ("push", pushes)):
                calls = {side: c.lookup if kind == "lookup" else c.push for side, c in clients.items()}
                for _ in range(args.repeats):
                    for side, (rate, median_ms, cpu_ms) in _side_by_side(calls, batches, args.seconds, pids).items():
                        best[kind, side] = max(best[kind, side], rate)
                        median[kind, side] = min(median[kind, side], median_ms)
                        cpu[kind, side] = min(cpu[kind, side], cpu_ms)
        finally:
            for client in clients.values():
                client.close()
        print(f"\nbest of {args.repeats} x {args.seconds:g} s, {args.rows:,} rows per call, one client over gRPC:\n")
        print(
            "| call | checksums off | checksums on | throughput cost | median call off / on | "
            "daemon CPU per call off / on | CPU cost |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for kind in ("lookup", "push"):
            off, on = best[kind, "off"], best[kind, "on"]
            cpu_off, cpu_on = cpu[kind, "off"], cpu[kind, "on"]
            print(
                f"| {kind} | {off:,.1f}/s ({off * args.rows / 1e6:.2f} M rows/s) | "
                f"{on:,.1f}/s ({on * args.rows / 1e6:.2f} M rows/s) | {100 * (1 - on / off):.1f}% | "
                f"{median[kind, 'off']:.3f} / {median[kind, 'on']:.3f} ms | "
                f"{cpu_off:.3f} / {cpu_on:.3f} ms | {100 * (cpu_on / cpu_off - 1):.1f}% |"
            )
    finally:
        for process, _ in daemons.values():
            stop_daemon(process)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
