"""Replication: how far a read replica trails its primary while training pushes as fast as it can.

    python -m benchmarks.replication [--seconds 15] [--rows 4096] [--durability fsync]

One float16 table of dim 32 (the Engram LM's row width) trained by Adam, created twice
identically (a primary's and a replica's). Both run as `memstore serve` child processes, the
second with `--follow`. One client pushes steps of `--rows` distinct random rows as fast as it
can (each push waits for its acknowledgement, as synchronous training does) for `--seconds`,
while a sampler asks both daemons for their version every 10 ms. Reports pushes/s (and, first,
the same pushes to a third copy served alone, for what following costs the primary); the
replica's lag in versions (primary minus replica version, sampled together) and in
milliseconds (from a push's acknowledgement to the first sample showing the replica at that
version or later: includes up to one sampling period); the time the replica takes to drain
once pushing stops; and whether the two tables are then byte-identical (rows and optimizer state).

On a small host the pusher, both daemons and the sampler share the cores, so the replica's own
work slows the primary down; the CPU time each daemon spends per push (from /proc, Linux) is
what replication costs wherever the replica runs.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import process_cpu_s
from client import ClientConfig, MemstoreClient
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability

SAMPLE_PERIOD_S = 0.01


def push_table(table_rows: int) -> Manifest:
    """The pushed table of the replication benchmarks: one layer of about `table_rows` rows of 32
    float16 values (orders 2 and 3, 8 heads each), trained with Adam."""
    per_head = table_rows // 16
    layout = EngramLayout(
        layer_ids=(1,), vocab_size_per_ngram=(per_head, per_head), max_ngram=3, heads_per_ngram=8, dim=32
    )
    return Manifest(layout=layout, dtype=DType.FLOAT16, optimizer=OptimizerConfig(kind=OptimizerKind.ADAM))


def table_files(path: Path, manifest: Manifest) -> dict[str, str]:
    """SHA-256 of every row and optimizer-state file of a table."""
    names = [manifest.layer_file(layer) for layer in manifest.layout.layer_ids]
    names += [name for layer in manifest.layout.layer_ids for name, _ in manifest.state_files(layer).values()]
    digests = {}
    for name in names:
        digest = hashlib.sha256()
        with open(path / name, "rb") as f:
            while chunk := f.read(64 << 20):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return digests


def _push_for(client: MemstoreClient, seconds: float, batches: list, acked: dict[int, float]) -> float:
    """Push the batches round-robin for `seconds`, noting when each version was acknowledged; the time taken."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        ids, grads = batches[len(acked) % len(batches)]
        acked[client.push(1, ids, grads).version] = time.monotonic()
    return time.monotonic() - start


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50:.1f}, p99 {p99:.1f}, max {max(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="how long to push")
    parser.add_argument("--rows", type=int, default=4096, help="distinct rows per push")
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--durability", type=Durability, choices=list(Durability), default=Durability.FSYNC)
    args = parser.parse_args()
    manifest = push_table(args.table_rows)
    work = Path(tempfile.mkdtemp(prefix="memstore-replication-"))
    serve_args = ["--durability", args.durability.value, "--no-same-host"]
    try:
        alone_path = create_table(work / "alone", manifest)
        primary_path = create_table(work / "primary", manifest)
        replica_path = create_table(work / "replica", manifest)
        num_rows = manifest.layout.num_rows(1)
        print(
            f"table: {num_rows:,} rows x 32 float16, adam; pushes of {args.rows:,} distinct rows for "
            f"{args.seconds:g} s; durability {args.durability.value} on every daemon"
        )
        rng = np.random.default_rng(0)
        batches = [
            (rng.choice(num_rows, args.rows, replace=False), rng.standard_normal((args.rows, 32), np.float32))
            for _ in range(16)
        ]
        config = ClientConfig(same_host=False)
        alone, alone_address = start_daemon(alone_path, serve_args)
        try:
            with MemstoreClient(alone_address, config) as trainer:
                alone_acked: dict[int, float] = {}
                cpu = process_cpu_s(alone.pid)
                alone_s = _push_for(trainer, args.seconds, batches, alone_acked)
                alone_cpu_ms = 1000 * (process_cpu_s(alone.pid) - cpu) / len(alone_acked)
        finally:
            stop_daemon(alone)
        print(
            f"no replica: {len(alone_acked):,} pushes in {alone_s:.1f} s = {len(alone_acked) / alone_s:,.1f} "
            f"pushes/s; primary CPU {alone_cpu_ms:.2f} ms per push"
        )
        primary, primary_address = start_daemon(primary_path, serve_args)
        replica, replica_address = start_daemon(replica_path, [*serve_args, "--follow", primary_address])
        try:
            with (
                MemstoreClient(primary_address, config) as trainer,
                MemstoreClient(primary_address, config) as primary_probe,
                MemstoreClient(replica_address, config) as replica_probe,
            ):
                acked: dict[int, float] = {}  # version -> when its push was acknowledged
                samples: list[tuple[float, int, int]] = []  # (time, primary version, replica version)
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(SAMPLE_PERIOD_S):
                        samples.append((time.monotonic(), primary_probe.version(), replica_probe.version()))

                sampler = threading.Thread(target=sample)
                sampler.start()
                cpu = process_cpu_s(primary.pid), process_cpu_s(replica.pid)
                pushing_s = _push_for(trainer, args.seconds, batches, acked)
                primary_cpu_ms = 1000 * (process_cpu_s(primary.pid) - cpu[0]) / len(acked)
                stopped = time.monotonic()
                while replica_probe.version() < max(acked):
                    time.sleep(0.001)
                drain_s = time.monotonic() - stopped
                replica_cpu_ms = 1000 * (process_cpu_s(replica.pid) - cpu[1]) / len(acked)
                stop.set()
                sampler.join()
        finally:
            # SIGTERM: both checkpoint their files before exiting, so the files can be compared.
            replica_code = stop_daemon(replica)
            primary_code = stop_daemon(primary)
        lag_versions = [p - r for _, p, r in samples]
        first_seen: dict[int, float] = {}
        seen = 0
        for t, _, replica_version in samples:
            for version in range(seen + 1, replica_version + 1):
                first_seen[version] = t
            seen = max(seen, replica_version)
        lag_ms = [1000 * (first_seen[v] - acked[v]) for v in acked if v in first_seen]
        identical = table_files(primary_path, manifest) == table_files(replica_path, manifest)
        print(
            f"with a replica: {len(acked):,} pushes in {pushing_s:.1f} s = {len(acked) / pushing_s:,.1f} pushes/s; "
            f"CPU per push: primary {primary_cpu_ms:.2f} ms, replica {replica_cpu_ms:.2f} ms (both answering the "
            "sampler's Describe calls too)"
        )
        print(
            f"replica lag, versions ({len(samples):,} samples every {SAMPLE_PERIOD_S * 1000:g} ms): "
            f"{_percentiles(lag_versions)}"
        )
        print(f"replica lag, ms from acknowledgement to the replica showing it: {_percentiles(lag_ms)}")
        print(f"replica caught up {drain_s * 1000:.0f} ms after the last push")
        print(
            f"daemons exited {primary_code} (primary) and {replica_code} (replica); tables byte-identical "
            f"(rows and optimizer state): {identical}"
        )
        return 0 if identical and primary_code == replica_code == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
