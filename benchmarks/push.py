"""Push throughput per optimizer and durability mode: in process (LiveTable.push) and through the daemon.

    python -m benchmarks.push [--rows 8192] [--seconds 2] [--table-rows 1000000]

One float16 table of dim 32 (the Engram LM's row width) per optimizer, created fresh. Each
configuration pushes batches of distinct random row ids with random float32 gradients for
`--seconds`, first in process, then through a `memstore serve` child process (gRPC on
loopback, one client, each push waiting for its acknowledgement as synchronous training does).
Configurations alternate so that machine noise spreads over all of them. Reports pushes/s,
rows/s and the median push latency.
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

from client import ClientConfig, MemstoreClient
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.live import LiveConfig, LiveTable
from memstore.tabledir.manifest import Backend, Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability


def _layout(table_rows: int) -> EngramLayout:
    per_head = table_rows // 16
    return EngramLayout(
        layer_ids=(1,), vocab_size_per_ngram=(per_head, per_head), max_ngram=3, heads_per_ngram=8, dim=32
    )


def _measure(push, num_rows: int, batch: int, seconds: float) -> tuple[float, float]:
    """(pushes per second, median latency in ms) of `push(ids, grads)` for about `seconds`."""
    rng = np.random.default_rng(0)
    batches = [
        (rng.choice(num_rows, batch, replace=False), rng.standard_normal((batch, 32)).astype(np.float32))
        for _ in range(8)
    ]
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        ids, grads = batches[len(latencies) % len(batches)]
        t = time.perf_counter()
        push(ids, grads)
        latencies.append(time.perf_counter() - t)
    return len(latencies) / (time.perf_counter() - start), 1000 * statistics.median(latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192, help="distinct rows per push")
    parser.add_argument("--seconds", type=float, default=2.0, help="per configuration")
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--backend", type=Backend, choices=list(Backend), default=Backend.MMAP)
    args = parser.parse_args()
    layout = _layout(args.table_rows)
    work = Path(tempfile.mkdtemp(prefix="memstore-push-"))
    print(
        f"table: {layout.total_rows:,} rows x 32 float16; pushes of {args.rows:,} distinct rows; {args.seconds} s each"
    )
    print("\n| optimizer | durability | where | pushes/s | rows/s | median push |")
    print("|---|---|---|---:|---:|---:|")
    try:
        for kind in OptimizerKind:
            optimizer = OptimizerConfig(kind=kind, lr=0.01)
            manifest = Manifest(layout=layout, dtype=DType.FLOAT16, optimizer=optimizer, backend=args.backend)
            path = create_table(work / kind.value, manifest)
            num_rows = layout.num_rows(1)
            for durability in Durability:
                config = LiveConfig(durability=durability)
                with LiveTable.open(path, config=config) as live:
                    rate, latency = _measure(lambda i, g: live.push(1, i, g), num_rows, args.rows, args.seconds)
                _row(kind, durability, "in process", rate, args.rows, latency)
                daemon, address = start_daemon(path, ["--durability", durability.value, "--no-same-host"])
                try:
                    with MemstoreClient(address, ClientConfig(same_host=False)) as client:
                        rate, latency = _measure(lambda i, g: client.push(1, i, g), num_rows, args.rows, args.seconds)
                finally:
                    stop_daemon(daemon)
                _row(kind, durability, "daemon (gRPC)", rate, args.rows, latency)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _row(kind: OptimizerKind, durability: Durability, where: str, rate: float, rows: int, latency: float) -> None:
    print(
        f"| {kind.value} | {durability.value} | {where} | {rate:,.0f} | {rate * rows / 1e6:.2f} M | {latency:.2f} ms |"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
