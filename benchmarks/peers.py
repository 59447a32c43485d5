"""What users would pick instead, side by side: lookups of random rows through each peer.

    python -m benchmarks.peers                      # 2 GiB table; starts and stops every server itself
    python -m benchmarks.peers --quick              # small table, smoke test

Peers, all on one table of 64-value float16 rows, the same random ids per batch size:
- in-process: memstore's row gather on a memmap of the file (the limit on this machine);
- memstore daemon over gRPC (the project's client, `same_host=False`);
- memstore same-host fast path (the project's client, files mapped in place);
- Redis: a real redis-server started here, one key per row, MGET in chunks, hiredis parser;
- naive gRPC: one unary call, rows as `repeated float` (to show what the wire format costs).
A peer whose software is missing is skipped with a line saying so. Writes a PNG plot of
throughput against batch size (docs/results/peers.png) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from matplotlib.figure import Figure

from benchmarks.common import REPO, ensure_table
from benchmarks.lookup import FULL, QUICK
from client import ClientConfig, MemstoreClient
from memstore.launch import daemon_process
from memstore.table import Table

Lookup = Callable[[np.ndarray], object]


def _naive_messages() -> tuple[type, type]:
    """NaiveRequest {repeated int64 ids}, NaiveRows {repeated float values}, built at run time."""
    file = descriptor_pb2.FileDescriptorProto(name="naive.proto", package="naive", syntax="proto3")
    request = file.message_type.add(name="NaiveRequest")
    request.field.add(name="ids", number=1, type=3, label=3)  # repeated int64
    rows = file.message_type.add(name="NaiveRows")
    rows.field.add(name="values", number=1, type=2, label=3)  # repeated float
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    get = message_factory.GetMessageClass
    return get(pool.FindMessageTypeByName("naive.NaiveRequest")), get(pool.FindMessageTypeByName("naive.NaiveRows"))


def _start_naive_server(table: Table, layer_id: int) -> tuple[grpc.Server, int]:
    request_cls, rows_cls = _naive_messages()

    def lookup(request, context):
        rows = table.gather(layer_id, np.asarray(request.ids, dtype=np.int64))
        return rows_cls(values=rows.astype(np.float32).reshape(-1).tolist())

    handler = grpc.unary_unary_rpc_method_handler(
        lookup, request_deserializer=request_cls.FromString, response_serializer=rows_cls.SerializeToString
    )
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("naive.Naive", {"Lookup": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _naive_client(port: int, dim: int) -> Lookup:
    request_cls, rows_cls = _naive_messages()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)])
    call = channel.unary_unary(
        "/naive.Naive/Lookup",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=rows_cls.FromString,
    )
    return lambda ids: np.asarray(call(request_cls(ids=ids.tolist()), timeout=600).values, np.float32).reshape(-1, dim)


def _start_redis(directory: Path) -> tuple[subprocess.Popen, int] | None:
    if shutil.which("redis-server") is None:
        print("skipping Redis: redis-server is not installed (apt-get install redis-server)")
        return None
    try:
        import redis  # noqa: F401
    except ImportError:
        print("skipping Redis: the redis Python package is not installed (pip install redis hiredis)")
        return None
    port = 20000 + (time.monotonic_ns() // 1000) % 20000
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    return process, int(port)


def _load_redis(port: int, table: Table, layer_id: int) -> Lookup:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    store = table.store(layer_id)
    start = time.perf_counter()
    for first in range(0, store.num_rows, 20_000):  # one key per row, as users would store it
        ids = np.arange(first, min(first + 20_000, store.num_rows))
        rows = store.gather(ids)
        client.mset({int(i): rows[k].tobytes() for k, i in enumerate(ids)})
    print(f"loaded {store.num_rows:,} rows into Redis in {time.perf_counter() - start:.0f} s")
    dtype, dim = table.manifest.dtype.numpy, store.dim

    def lookup(ids: np.ndarray) -> np.ndarray:
        values = []
        for first in range(0, len(ids), 10_000):
            values += client.mget(ids[first : first + 10_000].tolist())
        return np.frombuffer(b"".join(values), dtype=dtype).reshape(-1, dim)

    return lookup


def _measure(
    paths: dict[str, Lookup], num_rows: int, batches: list[int], calls: int
) -> dict[str, dict[int, np.ndarray]]:
    rng = np.random.default_rng(0)
    times: dict[str, dict[int, np.ndarray]] = {name: {} for name in paths}
    for batch in batches:
        n = calls if batch < 1 << 20 else max(3, calls // 5)
        id_sets = [rng.integers(0, num_rows, batch) for _ in range(n + 1)]
        for name, fn in paths.items():
            fn(id_sets[-1])  # warm-up
            times[name][batch] = np.empty(n)
        for i, ids in enumerate(id_sets[:-1]):  # interleaved: every peer sees the same machine state
            for name, fn in paths.items():
                start = time.perf_counter()
                fn(ids)
                times[name][batch][i] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--batches", default="32,1024,65536,1048576")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "peers.png")
    args = parser.parse_args()
    layout = QUICK if args.quick else FULL
    path = REPO / "bench-out" / ("lookup-quick" if args.quick else "lookup-2gib")
    manifest = ensure_table(path, layout)
    layer_id = layout.layer_ids[0]
    batches = [int(b) for b in args.batches.split(",")]
    row_bytes = layout.dim * manifest.dtype.itemsize
    with Table.open(path) as table, tempfile.TemporaryDirectory() as tmp:
        store = table.store(layer_id)
        with daemon_process(path, stderr=subprocess.DEVNULL) as address:
            grpc_client = MemstoreClient(address, ClientConfig(timeout_s=600, same_host=False))
            same_host = MemstoreClient(address, ClientConfig(timeout_s=600, same_host=True))
            naive_server, naive_port = _start_naive_server(table, layer_id)
            paths: dict[str, Lookup] = {
                "in-process gather": store.gather,
                "memstore daemon (gRPC)": lambda ids: grpc_client.lookup(layer_id, ids),
                "memstore same-host path": lambda ids: same_host.lookup(layer_id, ids),
                "naive gRPC (repeated float)": _naive_client(naive_port, layout.dim),
            }
            redis_server = _start_redis(Path(tmp))
            try:
                if redis_server is not None:
                    paths["Redis (MGET, one key per row)"] = _load_redis(redis_server[1], table, layer_id)
                times = _measure(paths, store.num_rows, batches, args.calls)
            finally:
                if redis_server is not None:
                    redis_server[0].terminate()
                    redis_server[0].wait()
                naive_server.stop(None)
                grpc_client.close()
                same_host.close()

    size = f"{manifest.total_bytes / 2**30:.2f} GiB"
    print(f"\ntable: {store.num_rows:,} rows x {layout.dim} float16 ({size}), random ids\n")
    print("| peer | batch | rows/s | GB/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, by_batch in times.items():
        for batch, t in by_batch.items():
            median = float(np.median(t))
            print(
                f"| {name} | {batch:,} | {batch / median / 1e6:.3f} M | {batch * row_bytes / median / 1e9:.3f} | "
                f"{median * 1e3:.2f} | {np.percentile(t, 99) * 1e3:.2f} |"
            )
    redis_name = next((n for n in times if n.startswith("Redis")), None)
    daemon = times["memstore daemon (gRPC)"]
    if redis_name and 65536 in daemon:
        ratio = np.median(times[redis_name][65536]) / np.median(daemon[65536])
        print(f"\ndaemon vs Redis at 64k rows: {ratio:.1f}x")

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for name, by_batch in times.items():
        xs = sorted(by_batch)
        ax.plot(xs, [x / np.median(by_batch[x]) for x in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows per lookup")
    ax.set_ylabel("rows/s (median)")
    ax.set_title("Random-row lookups, 64 x float16 rows, 2 cores")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
