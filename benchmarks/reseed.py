"""Re-seed throughput: a replica's table replaced by its primary's, streamed over StreamSnapshot.

    python -m benchmarks.reseed [--rows-millions 2] [--dim 32] [--runs 3]

One float16 table of dim 32 trained by Adam (rows plus two float32 state files: 320 B per row, about
330 MB for 1 M rows), created twice identically: the primary's, served by `memstore serve` as a
child process, and a replica's copy. After 20 pushes of 256 rows, each run re-seeds the copy from
the primary (`memstore.reseed.reseed_from` in this process: the primary snapshots into a hidden
directory and streams it over loopback gRPC; the receiver writes, checks each file's digest,
fsyncs and swaps the directories) and reports the seconds and MB/s of table data moved end to
end. Then the same for an untrained lazy table of the same shape (sparse: only its written pages
travel). Finally each pair of tables is compared byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
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
from memstore.reseed import reseed_from
from memstore.tabledir.manifest import Init, Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind


def _manifest(rows_millions: float, dim: int, init: Init) -> Manifest:
    per_order = int(rows_millions * 1e6 / 2 / 8)  # 2 orders x 8 heads
    layout = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(per_order, per_order), max_ngram=3, heads_per_ngram=8,
                          dim=dim)  # fmt: skip
    optimizer = OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.01)
    return Manifest(layout=layout, dtype=DType.FLOAT16, seed=1, init=init, optimizer=optimizer)


def _run(root: Path, manifest: Manifest, runs: int, label: str, pushes: int) -> None:
    primary, replica = root / f"{label}-primary", root / f"{label}-replica"
    create_table(primary, manifest)
    shutil.copytree(primary, replica)
    process, address = start_daemon(primary, ["--durability", "os"])
    try:
        with MemstoreClient(address, ClientConfig()) as client:
            rng = np.random.default_rng(0)
            rows = manifest.stored_rows(1)
            for step in range(pushes):  # pushes of 256 rows: something for the snapshot to replay
                ids = rng.choice(rows, size=256, replace=False)
                client.push(
                    1, ids, rng.standard_normal((256, manifest.layout.dim)).astype(np.float32), step_id=step + 1
                )
        for run in range(runs):
            result = reseed_from(address, replica)
            mb = result.data_bytes / 1e6
            print(
                f"{label} run {run + 1}: {result.files} files, {mb:.1f} MB sent of {result.total_bytes / 1e6:.1f} MB "
                f"(holes not sent), {result.seconds:.2f} s, {mb / result.seconds:.0f} MB/s",
                flush=True,
            )
    finally:
        stop_daemon(process)
    names = [p.name for p in primary.iterdir() if p.suffix in (".rows", ".f32", ".sums") or p.name == "manifest.json"]
    _, mismatch, errors = filecmp.cmpfiles(primary, replica, names, shallow=False)
    print(f"{label}: {len(names)} table files compared, identical: {not mismatch and not errors}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-millions", type=float, default=2.0)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where the tables go (default: a temp directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="reseed-bench-") as tmp:
        for init in (Init.EAGER, Init.LAZY):
            started = time.monotonic()
            # The lazy table untrained: pushes through a daemon were seen to fill most of a lazy table's pages
            # (318 of 332 MB after 20 pushes of 256 rows), which would hide what the holes save.
            pushes = 20 if init is Init.EAGER else 0
            _run(Path(tmp), _manifest(args.rows_millions, args.dim, init), args.runs, init.value, pushes)
            print(f"({init.value}: {time.monotonic() - started:.0f} s with creation)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
