"""Scale-out on one host: one table served by 1, 2 and 4 daemons, and the memory they share.

    python -m benchmarks.cluster            # 512 MiB table (4M rows x 64 float16)
    python -m benchmarks.cluster --quick    # small table, for a smoke test

1. Throughput of one client against 1, 2 and 4 daemons of the same table, side by side
   (every configuration runs at once; calls alternate between them):
   - shards: the table created in N shards, one daemon each; every lookup is split by shard
     and the parts fetched in parallel (`ClusterClient`);
   - replicas: N daemons serving the same table directory, reached through one round-robin
     channel; 4 client threads keep calls in flight (one call at a time cannot use replicas).
2. Memory: 3 daemons and 3 client processes (same-host path) all read every row of one
   table; the page cache grows by one copy of the table. Per process, /proc/PID/smaps gives
   the table file's resident pages (RSS: counted again in every process that maps them) and
   its proportional share (PSS: each shared page divided among its mappers); the shares add
   up to one copy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, ensure_table
from client import ClientConfig, ClusterClient, ClusterSpec, LoadBalancing, MemstoreClient
from memstore.create import create_sharded
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import shard_dirs

# One layer of 8 heads of 500k rows: 4M rows x 64 float16 = 512 MiB.
FULL = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(500_000,), max_ngram=2, heads_per_ngram=8, dim=64)
QUICK = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(20_000,), max_ngram=2, heads_per_ngram=8, dim=64)
GRPC = ClientConfig(same_host=False, timeout_s=120.0)
DAEMONS = (1, 2, 4)


def _sharded(root: Path, manifest: Manifest, shards: int) -> list[Path]:
    path = root / f"sharded-{shards}"
    dirs = shard_dirs(path)
    if dirs and Manifest.read(dirs[0]).layout == manifest.layout and len(dirs) == shards:
        return dirs
    print(f"creating {path} ...", flush=True)
    return create_sharded(path, manifest, shards, overwrite=path.exists())


def throughput(root: Path, layout: EngramLayout, batches: list[int], repeats: int) -> list[dict]:
    plain = root / "plain"
    manifest = ensure_table(plain, layout)
    processes = []

    def serve(path: Path) -> str:
        _warm(path)
        process, address = start_daemon(path, ["--no-same-host"])
        processes.append(process)
        return address

    try:
        clients: dict[str, object] = {}
        for n in DAEMONS:
            dirs = [plain] if n == 1 else _sharded(root, manifest, n)
            clients[f"shards={n}"] = ClusterClient(ClusterSpec.from_flags([serve(d) for d in dirs]), GRPC)
        for n in DAEMONS[1:]:
            addresses = [serve(plain) for _ in range(n)]
            target = "ipv4:" + ",".join(addresses)
            clients[f"replicas={n}"] = MemstoreClient(target, replace(GRPC, load_balancing=LoadBalancing.ROUND_ROBIN))
        clients["replicas=1"] = clients["shards=1"]
        rng = np.random.default_rng(0)
        results = []
        for batch in batches:
            ids = [rng.integers(0, layout.num_rows(1), batch) for _ in range(repeats)]
            times: dict[str, list[float]] = {name: [] for name in clients}
            for name, client in clients.items():  # warm up every connection and worker
                client.lookup(1, ids[0])
            for i in range(repeats):
                for name, client in clients.items():
                    if name.startswith("shards"):
                        start = time.perf_counter()
                        client.lookup(1, ids[i])
                        times[name].append(time.perf_counter() - start)
                    else:  # 4 calls in flight at once: what replicas are for
                        with ThreadPoolExecutor(4) as pool:
                            start = time.perf_counter()
                            list(pool.map(lambda part: client.lookup(1, part), np.array_split(ids[i], 4)))
                            times[name].append(time.perf_counter() - start)
            row = {"batch": batch}
            for name, spent in times.items():
                row[name] = batch / float(np.median(spent))
            results.append(row)
            print(
                f"{batch:>8,} rows: "
                + "  ".join(
                    f"{name} {row[name] / 1e6:6.2f} M/s ({row[name] / row[name.split('=')[0] + '=1']:.2f}x)"
                    for name in sorted(clients)
                ),
                flush=True,
            )
        for client in {id(c): c for c in clients.values()}.values():
            client.close()
    finally:
        for process in processes:
            stop_daemon(process)
    return results


_READER = textwrap.dedent(
    """
    import sys, numpy as np
    from client import ClientConfig, MemstoreClient
    with MemstoreClient(sys.argv[1], ClientConfig(same_host=True)) as client:
        rows = client.describe().layout.num_rows(1)
        for start in range(0, rows, 1 << 18):
            client.lookup(1, np.arange(start, min(rows, start + (1 << 18))))
        print("ready", flush=True)
        sys.stdin.read()
    """
)


def memory(root: Path, layout: EngramLayout, processes_each: int = 3) -> dict:
    plain = root / "plain"
    manifest = ensure_table(plain, layout)
    table_file = plain / manifest.layer_file(1)
    table_bytes = table_file.stat().st_size
    with open(table_file, "rb") as f:  # start cold: evict the file's pages (clean pages: no root needed)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cached_before = _meminfo("Cached")
    daemons, readers = [], []
    try:
        addresses = []
        for _ in range(processes_each):
            process, address = start_daemon(plain)
            daemons.append(process)
            addresses.append(address)
        for address in addresses:  # every daemon serves every row over gRPC once
            with MemstoreClient(address, GRPC) as client:
                for start in range(0, layout.num_rows(1), 1 << 18):
                    client.lookup(1, np.arange(start, min(layout.num_rows(1), start + (1 << 18))))
        for address in addresses:  # and a model-replica process maps and reads every row itself
            reader = subprocess.Popen(
                [sys.executable, "-c", _READER, address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=REPO,
                text=True,
            )
            readers.append(reader)
            assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        cached_after = _meminfo("Cached")
        mapped = table_file.resolve()
        usage = {f"daemon {i}": _smaps(p.pid, mapped) for i, p in enumerate(daemons)}
        usage |= {f"client {i}": _smaps(p.pid, mapped) for i, p in enumerate(readers)}
    finally:
        for reader in readers:
            reader.communicate("")
        for process in daemons:
            stop_daemon(process)
    result = {
        "table_mib": table_bytes / 2**20,
        "page_cache_growth_mib": (cached_after - cached_before) / 2**20,
        "rss_sum_mib": sum(u["Rss"] for u in usage.values()) / 2**10,
        "pss_sum_mib": sum(u["Pss"] for u in usage.values()) / 2**10,
        "processes": {name: {k: v / 2**10 for k, v in u.items()} for name, u in usage.items()},
    }
    return result


def _warm(table_dir: Path) -> None:
    """Read a table's files once, so every configuration starts from DRAM (a cold page cache
    turns each random row into a disk read and measures the disk instead)."""
    for path in table_dir.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass


def _meminfo(key: str) -> int:
    """A /proc/meminfo value in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(key)


def _smaps(pid: int, path: Path) -> dict[str, int]:
    """Rss and Pss (KiB) of a process's mappings of the file at `path`."""
    totals = {"Rss": 0, "Pss": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header line: address range ... path
            inside = fields[-1] == str(path)
        elif inside and fields[0][:-1] in totals:
            totals[fields[0][:-1]] += int(fields[1])
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--root", type=Path, default=REPO / "tables" / "bench-cluster")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    layout = QUICK if args.quick else FULL
    batches = [1024, 16_384, 65_536, 262_144] if not args.quick else [1024, 16_384]
    print(f"== throughput: one client, 1/2/4 daemons of one table ({os.cpu_count()} cores)")
    throughput(args.root, layout, batches, args.repeats)
    print("\n== memory: 3 daemons + 3 same-host clients reading every row of one table")
    result = memory(args.root, layout)
    for name, usage in result["processes"].items():
        print(
            f"  {name}: the table's pages resident {usage['Rss']:7.1f} MiB, proportional share {usage['Pss']:7.1f} MiB"
        )
    print(
        f"table {result['table_mib']:.0f} MiB; page cache grew {result['page_cache_growth_mib']:.0f} MiB; "
        f"the table's resident pages summed over the 6 processes {result['rss_sum_mib']:.0f} MiB, "
        f"their proportional shares summed {result['pss_sum_mib']:.0f} MiB: one copy in RAM"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
