"""Lookup throughput: in-process gather vs. the daemon over loopback gRPC, side by side.

    python -m benchmarks.lookup                   # full run (2 GiB table, dim 64 float16)
    python -m benchmarks.lookup --quick           # small table, for a smoke test

Each batch size is measured with the same random ids for both paths, alternating the two
paths call by call so both see the same machine state. Also compares streamed chunk sizes
(one whole-response message vs. chunks), and breaks a daemon lookup into its parts.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from benchmarks.common import REPO, ensure_table
from client import ClientConfig, MemstoreClient
from client.client import _distinct_count
from memstore.codec import decode_row_ids, encode_row_ids
from memstore.launch import daemon_process
from memstore.layout import EngramLayout
from memstore.table import Table
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

# One layer of 8 heads of ~2.1M rows: 16.8M rows x 64 float16 = 2.0 GiB.
FULL = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(2_100_000,), max_ngram=2, heads_per_ngram=8, dim=64)
QUICK = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(100_000,), max_ngram=2, heads_per_ngram=8, dim=64)


def _stats(times: np.ndarray, rows: int, row_bytes: int) -> dict[str, float]:
    median = float(np.median(times))
    return {
        "rows_per_s": rows / median,
        "gb_per_s": rows * row_bytes / median / 1e9,
        "p50_ms": median * 1e3,
        "p99_ms": float(np.percentile(times, 99)) * 1e3,
    }


def compare(table: Table, address: str, batches: list[int], repeats: int) -> list[dict]:
    """Four gathers of the same ids, interleaved call by call: memstore's in-process row gather,
    plain numpy fancy indexing of a memmap of the same file, a lookup through the daemon over
    gRPC, and one through the same-host fast path (the daemon's files mapped by the client)."""
    layer_id = table.manifest.layout.layer_ids[0]
    store = table.store(layer_id)
    plain = np.memmap(
        table.path / table.manifest.layer_file(layer_id),
        dtype=table.manifest.dtype.numpy,
        mode="r",
        shape=(store.num_rows, store.dim),
    )
    row_bytes = table.manifest.layout.dim * table.manifest.dtype.itemsize
    rng = np.random.default_rng(0)
    results = []
    with (
        MemstoreClient(address, ClientConfig(timeout_s=120, same_host=False)) as client,
        MemstoreClient(address, ClientConfig(timeout_s=120, same_host=True)) as same_host,
    ):
        paths = {
            "local": store.gather,
            "numpy": lambda ids: plain[ids],
            "daemon": lambda ids: client.lookup(layer_id, ids),
            "same_host": lambda ids: same_host.lookup(layer_id, ids),
        }
        for batch in batches:
            n_calls = repeats if batch <= 262_144 else max(3, repeats // 4)
            id_sets = [rng.integers(0, store.num_rows, batch) for _ in range(n_calls + 1)]
            times = {name: np.empty(n_calls) for name in paths}
            for fn in paths.values():
                fn(id_sets[-1])  # warm-up
            for i, ids in enumerate(id_sets[:-1]):
                for name, fn in paths.items():
                    start = time.perf_counter()
                    fn(ids)
                    times[name][i] = time.perf_counter() - start
            results.append({"batch": batch, **{name: _stats(t, batch, row_bytes) for name, t in times.items()}})
    return results


def breakdown(table: Table, address: str, batch: int, chunk_bytes: int) -> dict[str, float]:
    """Milliseconds of each step of a daemon lookup, each run alone (the wire step against the daemon)."""
    layer_id = table.manifest.layout.layer_ids[0]
    store = table.store(layer_id)
    ids = np.random.default_rng(1).integers(0, store.num_rows, batch)
    row_bytes = table.manifest.layout.dim * table.manifest.dtype.itemsize
    chunk_rows = max(1, chunk_bytes // row_bytes)
    payload = encode_row_ids(ids)
    gathered = [store.gather(ids[s : s + chunk_rows]) for s in range(0, batch, chunk_rows)]
    messages = [pb.LookupResponse(rows=g.tobytes()).SerializeToString() for g in gathered]
    out = np.empty((batch, table.manifest.layout.dim), dtype=table.manifest.dtype.numpy)
    channel = grpc.insecure_channel(address, options=ClientConfig().channel_options())
    stub = pb_grpc.MemstoreStub(channel)
    request = pb.LookupRequest(layer_id=layer_id, row_ids=payload)

    def client_copy() -> None:
        offset = 0
        for m in messages:
            chunk = np.frombuffer(pb.LookupResponse.FromString(m).rows, dtype=out.dtype)
            out.reshape(-1)[offset : offset + len(chunk)] = chunk
            offset += len(chunk)

    steps = {
        "client: count distinct ids (np.sort)": lambda: _distinct_count(ids),
        "client: encode ids": lambda: encode_row_ids(ids),
        "server: decode ids": lambda: decode_row_ids(payload),
        # One chunk alive at a time, as in the server's stream (holding all would measure page faults).
        "server: gather rows": lambda: [
            store.gather(ids[s : s + chunk_rows]).shape for s in range(0, batch, chunk_rows)
        ],
        "server: tobytes + serialize": lambda: [
            len(pb.LookupResponse(rows=g.tobytes()).SerializeToString()) for g in gathered
        ],
        "client: parse + copy to output": client_copy,
        "whole call through the raw stub (server work + gRPC transport, no client work)": lambda: [
            m.rows for m in stub.Lookup(request, timeout=60)
        ],
    }
    result = {}
    for name, fn in steps.items():
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        result[name] = (time.perf_counter() - start) / 3 * 1e3
    channel.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small table and few repeats (smoke test)")
    parser.add_argument("--table", type=Path, default=None, help="table directory (created if missing)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", default="1024,65536,262144,1048576")
    parser.add_argument("--chunk-bytes", default="262144,1048576,4194304", help="streamed chunk sizes to compare")
    args = parser.parse_args()
    layout = QUICK if args.quick else FULL
    repeats = 3 if args.quick else args.repeats
    path = args.table or REPO / "bench-out" / ("lookup-quick" if args.quick else "lookup-2gib")
    manifest = ensure_table(path, layout)
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"table {path}: {layout.total_rows:,} rows x {layout.dim} {manifest.dtype.value} = "
        f"{manifest.total_bytes / 2**30:.2f} GiB; torch threads {torch.get_num_threads()}\n"
    )

    with Table.open(path) as table:
        with daemon_process(path, stderr=subprocess.DEVNULL) as address:
            results = compare(table, address, batches, repeats)
            steps = breakdown(table, address, 262_144, 1 << 20)
        print(
            "| batch | in-process memstore gather | in-process numpy mm[ids] | daemon (gRPC) | daemon GB/s "
            "| daemon p50 ms | daemon p99 ms | daemon / memstore gather | daemon / numpy mm[ids] "
            "| same-host path | same-host p99 ms | same-host / memstore gather |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            lo, npy, da, sh = r["local"], r["numpy"], r["daemon"], r["same_host"]
            print(
                f"| {r['batch']:,} | {lo['rows_per_s'] / 1e6:.2f} M/s | {npy['rows_per_s'] / 1e6:.2f} M/s | "
                f"{da['rows_per_s'] / 1e6:.2f} M/s | {da['gb_per_s']:.2f} | {da['p50_ms']:.2f} | {da['p99_ms']:.2f} | "
                f"{da['rows_per_s'] / lo['rows_per_s']:.0%} | {da['rows_per_s'] / npy['rows_per_s']:.0%} | "
                f"{sh['rows_per_s'] / 1e6:.2f} M/s | {sh['p99_ms']:.2f} | {sh['rows_per_s'] / lo['rows_per_s']:.0%} |"
            )
        print("\nWhere a 262,144-row daemon lookup spends its time (each step alone, ms):")
        for name, ms in steps.items():
            print(f"- {name}: {ms:.2f}")

        biggest = batches[-1]
        whole = biggest * layout.dim * manifest.dtype.itemsize
        print(f"\nStreamed chunk size at {biggest:,} rows (one message = the whole response, {whole / 2**20:.0f} MiB):")
        print("| chunk bytes | messages | daemon rows/s | daemon / memstore gather |")
        print("|---:|---:|---:|---:|")
        for chunk in [int(c) for c in args.chunk_bytes.split(",")] + [whole]:
            with daemon_process(path, ["--chunk-bytes", str(chunk)], stderr=subprocess.DEVNULL) as address:
                r = compare(table, address, [biggest], max(3, repeats // 2))[0]
            print(
                f"| {chunk:,} | {-(-whole // chunk)} | {r['daemon']['rows_per_s'] / 1e6:.2f} M | "
                f"{r['daemon']['rows_per_s'] / r['local']['rows_per_s']:.0%} |"
            )


if __name__ == "__main__":
    main()
