"""Row store backends side by side: gather throughput of the mmap and the LMDB backend.

    python -m benchmarks.backends                       # 2M rows x 64 float16 (256 MiB per backend)
    python -m benchmarks.backends --rows 200000 --repeats 3   # smoke test

Builds one table in both backends under a temporary directory (initial rows streamed from
`memstore.rowgen.initial_rows` in chunks into the mmap file, then from that file into LMDB),
reads every row of both once (page cache, page tables, LMDB's located-block addresses), then
gathers batches of uniformly random ids, the same ids for every backend, alternating backends
call by call; prints the median throughput. "lmdb, located" is the LMDB backend with its address
cache off: every needed block looked up in LMDB on every gather, what a gather costs on the first
read of a new snapshot (after another process commits). Then the 256k batch for other block sizes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from memstore.dtypes import DType
from memstore.rowgen import initial_rows
from memstore.storage import MmapRowStore, RowStore
from memstore.storage.lmdb_store import LmdbRowStore

CHUNK_ROWS = 65_536


def build_mmap(path: Path, num_rows: int, dim: int, dtype: DType, seed: int) -> None:
    with open(path, "wb") as f:
        for start in range(0, num_rows, CHUNK_ROWS):
            count = min(CHUNK_ROWS, num_rows - start)
            f.write(initial_rows(seed, 0, start, count, dim, 1.0, dtype).tobytes())


def chunks_of(rows: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), CHUNK_ROWS):
        yield rows[start : start + CHUNK_ROWS]


def warm(store: RowStore) -> None:
    """Read every row once."""
    for start in range(0, store.num_rows, 262_144):
        store.gather(np.arange(start, min(start + 262_144, store.num_rows)))


def disk(store: RowStore) -> str:
    return f"{store.bytes_on_disk / 2**20:.0f} MiB"


def timed(paths: dict[str, Callable[[np.ndarray], np.ndarray]], id_sets: list[np.ndarray]) -> dict[str, float]:
    """Median seconds per call of each path, calls alternating path by path over the same ids."""
    for fn in paths.values():
        fn(id_sets[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    for ids in id_sets:
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def located(store: LmdbRowStore) -> Callable[[np.ndarray], np.ndarray]:
    def gather(ids: np.ndarray) -> np.ndarray:
        store.use_address_cache = False
        try:
            return store.gather(ids)
        finally:
            store.use_address_cache = True

    return gather


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float16", choices=[d.value for d in DType])
    parser.add_argument("--block-rows", type=int, default=64, help="rows per LMDB value of the main comparison")
    parser.add_argument("--batches", default="1024,65536,262144")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sweep", default="16,63,256", help="other block_rows for the largest batch ('' skips)")
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: a temporary directory)")
    args = parser.parse_args()
    dtype = DType(args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    sweep = [int(b) for b in args.sweep.split(",") if b]
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_mmap(root / "layer.rows", args.rows, args.dim, dtype, seed=0)
        print(f"mmap file: {time.perf_counter() - t0:.1f} s", flush=True)
        mmap = MmapRowStore(root / "layer.rows", args.rows, args.dim, dtype)
        source = np.memmap(root / "layer.rows", dtype=dtype.numpy, mode="r", shape=(args.rows, args.dim))

        def build_lmdb(block_rows: int) -> LmdbRowStore:
            path = root / f"lmdb-{block_rows}"
            t0 = time.perf_counter()
            LmdbRowStore.create(path, args.rows, args.dim, dtype, chunks_of(source), block_rows=block_rows)
            print(f"lmdb block_rows={block_rows}: {time.perf_counter() - t0:.1f} s", flush=True)
            store = LmdbRowStore(path, args.rows, args.dim, dtype)
            warm(store)
            check = rng.integers(0, args.rows, 10_000)
            assert store.gather(check).tobytes() == source[check].tobytes()
            return store

        lmdb = build_lmdb(args.block_rows)
        warm(mmap)

        print(
            f"\n{args.rows:,} rows x {args.dim} {dtype.value}, uniformly random ids, median of {args.repeats}; "
            f"LMDB {args.block_rows} rows per block\n"
        )
        print("| batch | mmap Mrows/s | lmdb Mrows/s | lmdb/mmap | lmdb, located Mrows/s | located/mmap |")
        print("|---:|---:|---:|---:|---:|---:|")
        paths = {"mmap": mmap.gather, "lmdb": lmdb.gather, "located": located(lmdb)}
        for batch in batches:
            medians = timed(paths, [rng.integers(0, args.rows, batch) for _ in range(args.repeats)])
            rate = {name: batch / s / 1e6 for name, s in medians.items()}
            print(
                f"| {batch:,} | {rate['mmap']:.1f} | {rate['lmdb']:.1f} | {rate['lmdb'] / rate['mmap']:.2f} "
                f"| {rate['located']:.1f} | {rate['located'] / rate['mmap']:.2f} |",
                flush=True,
            )
        print(f"\nOn disk: mmap {disk(mmap)}, lmdb (block_rows={args.block_rows}) {disk(lmdb)}")

        if sweep:
            batch = max(batches)
            stores = {args.block_rows: lmdb}
            for block_rows in sweep:
                stores[block_rows] = build_lmdb(block_rows)
            print(f"\nBlock size, {batch:,}-row batches (same ids for all):\n")
            print("| block_rows | block bytes | on disk | lmdb Mrows/s | lmdb/mmap | located Mrows/s |")
            print("|---:|---:|---:|---:|---:|---:|")
            paths = {"mmap": mmap.gather}
            for block_rows, store in sorted(stores.items()):
                paths[f"lmdb {block_rows}"] = store.gather
                paths[f"located {block_rows}"] = located(store)
            medians = timed(paths, [rng.integers(0, args.rows, batch) for _ in range(args.repeats)])
            rate = {name: batch / s / 1e6 for name, s in medians.items()}
            for block_rows, store in sorted(stores.items()):
                print(
                    f"| {block_rows} | {block_rows * args.dim * dtype.itemsize:,} | {disk(store)} "
                    f"| {rate[f'lmdb {block_rows}']:.1f} | {rate[f'lmdb {block_rows}'] / rate['mmap']:.2f} "
                    f"| {rate[f'located {block_rows}']:.1f} |"
                )
            for store in stores.values():
                store.close()
        else:
            lmdb.close()
        mmap.close()


if __name__ == "__main__":
    main()
