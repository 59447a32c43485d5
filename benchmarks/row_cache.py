"""The daemon's row cache over a table on disk vs. the plain mmap store, in one process (a quick figure).

    python -m benchmarks.row_cache                                  # 4M rows x 264 B (1 GiB), 256 MiB cache
    python -m benchmarks.row_cache --limit-bytes 384MiB             # each store in a 384 MiB memory cgroup (root)
    python -m benchmarks.row_cache --rows 500000 --batches 40       # smoke test

Writes one flat row file of `--rows` rows of 264 bytes (float16, dim 132: a V4.1-style row) in a
temporary directory on the disk, then replays the same skewed id stream through each store:
`--batches` batches of `--batch` ids, ranks drawn from a power law (exponent `--skew`) over all
rows and scattered over the file. Before each store the file is dropped from the page cache
(posix_fadvise DONTNEED), so both start cold. "mmap" is MmapRowStore (page faults, the page cache
keeps what it read, no limit here); "row cache" is CachedRowStore over it with a `--cache-bytes`
budget (misses read with O_DIRECT). Prints rows/s over the first quarter of the batches (cold) and
over the last quarter (warm), the row cache's hit rate in each, and the file's pages left in the
page cache (`fincore`, when util-linux has it). Without `--limit-bytes` the mmap store may keep the
whole file in the page cache; with it, each store replays in a child process inside a cgroup-v1
memory group of that limit (the page cache and the cache's shared memory count against it; needs
root and /sys/fs/cgroup/memory; the group is removed after).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from memstore.cli_args import parse_bytes
from memstore.dtypes import DType
from memstore.rowcache import RowCache, RowCacheConfig
from memstore.storage import MmapRowStore, RowStore
from memstore.storage.cached import CachedRowStore

DIM = 132  # float16: 264-byte rows
CHUNK_ROWS = 1 << 18


def write_rows(path: Path, num_rows: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, num_rows, CHUNK_ROWS):
            count = min(CHUNK_ROWS, num_rows - start)
            f.write(rng.standard_normal((count, DIM), dtype=np.float32).astype(np.float16).tobytes())
        f.flush()
        os.fsync(f.fileno())


def id_stream(num_rows: int, batches: int, batch: int, skew: float, seed: int = 1) -> list[np.ndarray]:
    """Batches of ids whose ranks follow p(r) ~ r^-skew over 1..num_rows, ranks scattered over the file."""
    rng = np.random.default_rng(seed)
    u = rng.random((batches, batch))
    exponent = 1.0 - skew
    ranks = np.floor(((num_rows**exponent - 1.0) * u + 1.0) ** (1.0 / exponent)).astype(np.int64) - 1
    ranks = np.clip(ranks, 0, num_rows - 1)
    return list((ranks * 2_654_435_761) % num_rows)  # a fixed scatter of ranks over rows


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache(path: Path) -> str:
    if shutil.which("fincore") is None:
        return "n/a (no fincore)"
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True)
    return _mib(int(out.stdout.split()[0])) if out.returncode == 0 and out.stdout.split() else "n/a"


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB"


def replay(store: RowStore, stream: list[np.ndarray], cache: RowCache | None) -> list[str]:
    quarter = max(1, len(stream) // 4)
    lines = []
    for name, part in (("cold", stream[:quarter]), ("warm", stream[-quarter:])):
        if name == "warm":
            for ids in stream[quarter:-quarter]:
                store.gather(ids)
        before = cache.snapshot() if cache is not None else None
        start = time.perf_counter()
        for ids in part:
            store.gather(ids)
        seconds = time.perf_counter() - start
        rows = sum(len(ids) for ids in part)
        line = f"{name}: {rows / seconds / 1e3:7.1f} k rows/s"
        if cache is not None and before is not None:
            after = cache.snapshot()
            hits, misses = after.hits - before.hits, after.misses - before.misses
            disk = after.disk_bytes - before.disk_bytes
            line += f", hit rate {hits / (hits + misses):6.1%}, {_mib(disk)} read from disk"
        lines.append(line)
    return lines


def run_store(kind: str, path: Path, num_rows: int, stream: list[np.ndarray], cache_bytes: int) -> list[str]:
    """Replay `stream` through the mmap store or the row cache over it, from a cold page cache."""
    drop_cache(path)
    lines = []
    if kind == "mmap":
        plain = MmapRowStore(path, num_rows, DIM, DType.FLOAT16)
        try:
            lines += [f"mmap       {line}" for line in replay(plain, stream, None)]
        finally:
            plain.close()
        return lines + [f"mmap       page cache after: {page_cache(path)}"]
    cache = RowCache(RowCacheConfig(bytes=cache_bytes), DIM * 2)
    cached = CachedRowStore(MmapRowStore(path, num_rows, DIM, DType.FLOAT16), cache, 0)
    try:
        lines.append(f"row cache  {_mib(cache.size_bytes)}: {cache.slots:,} rows")
        lines += [f"row cache  {line}" for line in replay(cached, stream, cache)]
        lines.append(f"row cache  page cache after: {page_cache(path)}")
    finally:
        cached.close()
        cache.close()
    return lines


def run_limited(kind: str, args: argparse.Namespace, path: Path) -> list[str]:
    """`run_store` in a child process inside a fresh memory cgroup of `args.limit_bytes`."""
    group = Path(f"/sys/fs/cgroup/memory/memstore-row-cache-bench-{os.getpid()}")
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(args.limit_bytes))
        command = [sys.executable, "-m", "benchmarks.row_cache", "--child", kind, "--file", str(path)]
        command += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in _REPLAY_ARGS]
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        (group / "cgroup.procs").write_text(str(child.pid))
        out, _ = child.communicate("go\n", timeout=3600)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failed = int((group / "memory.failcnt").read_text())
        lines = out.splitlines()
        lines.append(f"{kind:<10} cgroup peak {_mib(peak)} of {_mib(args.limit_bytes)}, {failed:,} times at the limit")
        if child.returncode:
            lines.append(f"{kind:<10} exited with {child.returncode} (killed at the limit?)")
        return lines
    finally:
        group.rmdir()


_REPLAY_ARGS = ("rows", "batches", "batch", "skew", "cache_bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4 << 20)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--skew", type=float, default=0.9)
    parser.add_argument("--cache-bytes", type=parse_bytes, default=256 << 20)
    parser.add_argument("--dir", type=Path, default=None, help="where the row file goes (default: the temp dir)")
    parser.add_argument("--limit-bytes", type=parse_bytes, default=None, help="run each store in a memory cgroup")
    parser.add_argument("--child", choices=["mmap", "cache"], help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    stream = id_stream(args.rows, args.batches, args.batch, args.skew)
    if args.child:  # inside the cgroup: wait until moved there
        sys.stdin.readline()
        print("\n".join(run_store(args.child, args.file, args.rows, stream, args.cache_bytes)), flush=True)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "layer.rows"
        write_rows(path, args.rows)
        distinct = len(np.unique(np.concatenate(stream)))
        row_bytes = DIM * 2
        print(
            f"{args.rows:,} rows x {row_bytes} B ({_mib(args.rows * row_bytes)}), {args.batches} batches of "
            f"{args.batch:,} ids, skew {args.skew}: {distinct:,} distinct rows ({_mib(distinct * row_bytes)})"
            + ("" if args.limit_bytes is None else f"; memory limit {_mib(args.limit_bytes)}")
        )
        for kind in ("mmap", "cache"):
            if args.limit_bytes is None:
                lines = run_store(kind, path, args.rows, stream, args.cache_bytes)
            else:
                lines = run_limited(kind, args, path)
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
