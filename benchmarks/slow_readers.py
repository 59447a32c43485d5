"""Slow readers against the in-flight budget: the daemon's resident memory while lookups go unread.

Starts `memstore serve` on a small table, opens `--calls` lookups of `--rows` ids each on
connections of their own, reads only the first message of each (flow control then stops the
daemon mid-stream), and prints the daemon's RSS before and while they are held, and how many
lookups the daemon admitted and refused. Extra arguments after `--` go to `memstore serve`.

    .venv/bin/python -m benchmarks.slow_readers -- --max-calls-per-peer 0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from memstore.create import create_table
from memstore.dtypes import DType
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.tabledir.manifest import Manifest
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

_LAYOUT = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(500, 700), max_ngram=3, heads_per_ngram=4, dim=16)


def _rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmRSS")


def main() -> None:
    """Run the measurement and print one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--rows", type=int, default=4 << 20)
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = create_table(Path(tmp) / "table", Manifest(layout=_LAYOUT, dtype=DType.FLOAT16, seed=0))
        process, address = start_daemon(path, args.serve_args)
        channels: list[grpc.Channel] = []
        try:
            before = _rss_gb(process.pid)
            ids = np.arange(args.rows, dtype=np.int64) % 500
            request = pb.LookupRequest(layer_id=1, row_ids=ids.tobytes())
            held, refused = [], 0
            for i in range(args.calls):
                options = [("grpc.http2.lookahead_bytes", 1 << 16), ("grpc.http2.bdp_probe", 0)]
                channels.append(
                    grpc.insecure_channel(address, options=[*options, ("grpc.primary_user_agent", f"c{i}")])
                )
                stream = pb_grpc.MemstoreStub(channels[-1]).Lookup(request, timeout=120)
                try:
                    next(stream)
                    held.append(stream)
                except grpc.RpcError:
                    refused += 1
            time.sleep(3)  # let every admitted call fill what flow control lets it queue
            print(
                f"serve args {args.serve_args}: RSS {before:.2f} GB idle, {_rss_gb(process.pid):.2f} GB with "
                f"{args.calls} unread lookups of {args.rows:,} rows; admitted {len(held)}, refused {refused}"
            )
        finally:
            for channel in channels:
                channel.close()
            stop_daemon(process)


if __name__ == "__main__":
    main()
