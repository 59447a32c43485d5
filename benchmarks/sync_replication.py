"""Synchronous replication: push throughput with 0 and 1 synchronous replicas, side by side.

    python -m benchmarks.sync_replication [--seconds 10] [--rows 4096] [--pushers 1 4] [--durability fsync]

One float16 table of dim 32 trained by Adam (as benchmarks/replication.py), a primary and one
replica following it, both `memstore serve` children with the same --durability. For each number
of concurrent pushers, the same pushes run twice on fresh identical tables: with --sync-replicas 0
(asynchronous: a push is acknowledged once durable on the primary) and with --sync-replicas 1 (once
the replica also logged and applied it and said so). Each pusher is a client pushing steps of
`--rows` distinct random rows, each waiting for its acknowledgement, as synchronous training does.
Reports pushes/s, the push latency the pushers saw (p50, p99), the primary's sync wait (from its
metrics: memstore_sync_wait_seconds), and whether the two tables are byte-identical at the end.

Primary, replica and pushers share this host's cores, so a replica's apply competes with the
primary's own work; across hosts the wait adds a network round trip instead.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.replication import push_table, table_files
from client import ClientConfig, MemstoreClient
from memstore.create import create_table
from memstore.launch import start_daemon, stop_daemon
from memstore.metrics import summarize
from memstore.tabledir.manifest import Manifest
from memstore.wal import Durability


def _run(
    work: Path, manifest: Manifest, serve_args: list[str], sync: int, pushers: int, seconds: float, batches: list
) -> dict[str, float]:
    """One configuration on fresh tables: pushes, pushes/s, latency percentiles and mean sync wait (ms),
    and whether the replica's table is then byte-identical to the primary's."""
    primary_path = create_table(work / f"primary-{sync}-{pushers}", manifest)
    replica_path = create_table(work / f"replica-{sync}-{pushers}", manifest)
    quiet = {"stderr": subprocess.DEVNULL}
    primary, address = start_daemon(primary_path, [*serve_args, "--sync-replicas", str(sync)], **quiet)
    replica, replica_address = start_daemon(replica_path, [*serve_args, "--follow", address], **quiet)
    config = ClientConfig(same_host=False)
    latencies: list[list[float]] = [[] for _ in range(pushers)]
    try:
        with MemstoreClient(address, config) as probe, MemstoreClient(replica_address, config) as replica_probe:
            deadline = time.monotonic() + 60
            while summarize(probe.stats()).values.get("memstore_sync_replicas_reporting", 0) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica never reported to the primary")
                time.sleep(0.05)
            stop = threading.Event()

            def push(index: int) -> None:
                with MemstoreClient(address, config) as trainer:
                    step = 0
                    while not stop.is_set():
                        step += 1
                        ids, grads = batches[(index * 7 + step) % len(batches)]
                        start = time.perf_counter()
                        trainer.push(1, ids, grads, step_id=step)
                        latencies[index].append(time.perf_counter() - start)

            threads = [threading.Thread(target=push, args=(i,)) for i in range(pushers)]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            time.sleep(seconds)
            stop.set()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            stats = summarize(probe.stats()).values
            version = probe.version()
            while replica_probe.version() < version:  # asynchronously the replica may still be behind
                if time.monotonic() > deadline + 60 + seconds:
                    raise RuntimeError("the replica did not catch up")
                time.sleep(0.01)
    finally:
        # SIGTERM: both checkpoint their files before exiting, so the files can be compared.
        codes = stop_daemon(replica), stop_daemon(primary)
    identical = codes == (0, 0) and table_files(primary_path, manifest) == table_files(replica_path, manifest)
    shutil.rmtree(primary_path)
    shutil.rmtree(replica_path)
    done = [value for pusher in latencies for value in pusher]
    waits = stats.get("memstore_sync_wait_seconds_count", 0)
    return {
        "pushes": len(done),
        "per_s": len(done) / elapsed,
        "p50_ms": 1000 * float(np.percentile(done, 50)),
        "p99_ms": 1000 * float(np.percentile(done, 99)),
        "wait_ms": 1000 * stats.get("memstore_sync_wait_seconds_sum", 0.0) / waits if waits else 0.0,
        "identical": identical,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each configuration pushes")
    parser.add_argument("--rows", type=int, default=4096, help="distinct rows per push")
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--pushers", type=int, nargs="+", default=[1, 4], help="concurrent pushing clients")
    parser.add_argument("--durability", type=Durability, choices=list(Durability), default=Durability.FSYNC)
    args = parser.parse_args()
    manifest = push_table(args.table_rows)
    num_rows = manifest.layout.num_rows(1)
    rng = np.random.default_rng(0)
    batches = [
        (rng.choice(num_rows, args.rows, replace=False), rng.standard_normal((args.rows, 32), np.float32))
        for _ in range(16)
    ]
    serve_args = ["--durability", args.durability.value, "--no-same-host"]
    print(
        f"table: {num_rows:,} rows x 32 float16, adam; pushes of {args.rows:,} distinct rows for {args.seconds:g} s "
        f"per configuration; a primary and one replica, durability {args.durability.value} on both"
    )
    print(
        f"{'pushers':>7} {'sync replicas':>13} {'pushes':>7} {'pushes/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'sync wait ms':>12}  identical"
    )
    work = Path(tempfile.mkdtemp(prefix="memstore-sync-replication-"))
    ok = True
    try:
        for pushers in args.pushers:
            for sync in (0, 1):
                got = _run(work, manifest, serve_args, sync, pushers, args.seconds, batches)
                ok = ok and bool(got["identical"])
                print(
                    f"{pushers:>7} {sync:>13} {got['pushes']:>7,} {got['per_s']:>9,.1f} {got['p50_ms']:>7.1f} "
                    f"{got['p99_ms']:>7.1f} {got['wait_ms']:>12.1f}  {got['identical']}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
