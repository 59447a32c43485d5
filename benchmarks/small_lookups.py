"""Small lookups on the daemon's host: the same-host path against an in-process gather, call by call.

    python -m benchmarks.small_lookups            # benchmarks.lookup's 2 GiB table; ~30 s once it exists
    python -m benchmarks.small_lookups --trained  # the same table taking pushes: reads under its sequence lock
    python -m benchmarks.small_lookups --quick    # its small table and fewer calls, a smoke test

Decoding asks for a few dozen rows per token, so a lookup's fixed cost matters as much as its copy.
For each batch size, many calls alternate call by call between `MmapRowStore.gather` on a mapping of the
table in this process and `MemstoreClient.lookup` on the same-host path (the daemon's files mapped by the
client): with numpy ids, with a torch tensor of ids (what the model's embedding passes) and into a reused
`out` tensor (what the prefetcher does). Which goes first rotates, and each call gets its own random ids,
so none finds rows another just pulled into the CPU's cache. The garbage collector stays on, as in a
user's process. Then each step of a same-host lookup is timed alone, to show where its time goes.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO, ensure_table
from benchmarks.lookup import FULL, QUICK
from client import ClientConfig, MemstoreClient
from client.client import as_int64_array, check_layer_id, out_rows
from memstore.launch import daemon_process
from memstore.storage.base import RowStore, take_rows
from memstore.table import Table
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.tabledir.seqlock import SeqLock

PATHS = (
    "in-process",
    "same-host",
    "same-host, torch ids",
    "same-host, torch ids, into out",
    "in-process, into out",
)


def compare(
    store: RowStore, client: MemstoreClient, layer_id: int, batch: int, calls: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Nanoseconds of `calls` in-process gathers and as many same-host lookups of each kind (PATHS), `batch`
    random rows each."""

    def id_sets(as_torch: bool = False) -> list:
        sets = [rng.integers(0, store.num_rows, batch) for _ in range(calls)]
        return [torch.from_numpy(ids) for ids in sets] if as_torch else sets

    out = torch.empty((batch, store.dim), dtype=client.describe().dtype.torch)
    own_out = np.empty((batch, store.dim), dtype=store.dtype.numpy)
    paths: list[tuple[str, Callable[[Any], object], list]] = [
        (PATHS[0], store.gather, id_sets()),
        (PATHS[1], lambda ids: client.lookup(layer_id, ids), id_sets()),
        (PATHS[2], lambda ids: client.lookup(layer_id, ids), id_sets(as_torch=True)),
        (PATHS[3], lambda ids: client.lookup(layer_id, ids, out=out), id_sets(as_torch=True)),
        (PATHS[4], lambda ids: store.gather(ids, own_out), id_sets()),
    ]
    times = {name: np.empty(calls, dtype=np.int64) for name, _, _ in paths}
    for _, fn, sets in paths:  # warm-up: first-call work (Describe, mapping, imports) is not measured
        for ids in sets[:20]:
            fn(ids)
    clock = time.perf_counter_ns
    for i in range(calls):
        first = i % len(paths)
        for name, fn, sets in paths[first:] + paths[:first]:
            ids = sets[i]
            start = clock()
            fn(ids)
            times[name][i] = clock() - start
    return times


def breakdown(
    store: RowStore, client: MemstoreClient, layer_id: int, batch: int, reps: int, rng: np.random.Generator
) -> list[tuple[str, float]]:
    """(step, median ns) of each step of a same-host lookup of `batch` rows, each timed alone, in the order
    the call takes them; then whole calls, and the in-process gather's steps for comparison.

    The steps take turns call by call (as `compare`'s paths do) and each has its own random ids, so a copy
    never finds rows another step just read in the CPU's cache. The timer's own cost is subtracted.
    """
    local = client._same_host_table(None)  # the reader the client's lookups use
    if local is None:
        raise RuntimeError("the client is not on the same-host path")
    layer = local.layer(layer_id)
    manifest = client.describe()
    rows = layer.gather(np.arange(batch))
    out = torch.empty((batch, store.dim), dtype=manifest.dtype.torch)
    raw_out = out_rows(out, (batch,), manifest)
    mapped = getattr(store, "plain_rows", None)
    tmp = tempfile.TemporaryDirectory()
    trained = local.seqlock is not None
    # A frozen table has no sequence lock: time a read of one like it, apart from the call's steps.
    seqlock = local.seqlock if trained else SeqLock(Path(tmp.name) / "seqlock", create=True)
    seqlock_step = "sequence lock, read twice" if trained else "(sequence lock, read twice: a trained table's)"

    def ids_in(ids: Any) -> np.ndarray:
        check_layer_id(layer_id)
        return as_int64_array(ids).reshape(-1)

    def deadline(ids: Any) -> float:
        return time.monotonic() + client._timeout(None) - time.monotonic()

    numpy_ids, torch_ids = False, True
    steps: list[tuple[str, Callable[[Any], object], bool]] = [
        ("(timer overhead, subtracted from each figure)", lambda ids: None, numpy_ids),
        ("layer id check + ids to int64 (numpy ids)", ids_in, numpy_ids),
        ("(the same from a torch tensor of ids)", ids_in, torch_ids),
        ("deadline", deadline, numpy_ids),
        ("same-host reader (found once, then kept)", lambda ids: client._same_host_table(1.0), numpy_ids),
        ("row limit (kept with the reader)", lambda ids: len(ids) > local.max_rows_per_request, numpy_ids),
        ("layer (found once, then kept)", lambda ids: local.layer(layer_id), numpy_ids),
        ("id check (one pass)", layer.check, numpy_ids),
        (seqlock_step, lambda ids: (seqlock.read(), seqlock.read()), numpy_ids),
        ("copy rows from the map", layer.gather, numpy_ids),
        ("version (seen_version)", lambda ids: client.note_version(0), numpy_ids),
        ("to a torch tensor", lambda ids: local.manifest.dtype.to_torch(rows), numpy_ids),
        ("(into out: check out and view it raw)", lambda ids: out_rows(out, (batch,), manifest), numpy_ids),
        ("(into out: copy rows from the map into it)", lambda ids: layer.gather(ids, raw_out), numpy_ids),
        ("whole same-host lookup", lambda ids: client.lookup(layer_id, ids), numpy_ids),
        ("whole same-host lookup, torch ids", lambda ids: client.lookup(layer_id, ids), torch_ids),
        ("whole same-host lookup, torch ids, into out", lambda ids: client.lookup(layer_id, ids, out=out), torch_ids),
        ("in-process gather: id check (min and max)", store.check_ids, numpy_ids),
        *(
            [("in-process gather: copy rows (take_rows)", lambda ids: take_rows(mapped, ids), numpy_ids)]
            if mapped is not None
            else []
        ),
        ("whole in-process gather", store.gather, numpy_ids),
    ]
    id_sets = []
    for _, _, as_torch in steps:
        sets = [rng.integers(0, store.num_rows, batch) for _ in range(reps)]
        id_sets.append([torch.from_numpy(ids) for ids in sets] if as_torch else sets)
    times = np.empty((len(steps), reps), dtype=np.int64)
    clock = time.perf_counter_ns
    try:
        for (_, fn, _), sets in zip(steps, id_sets):  # warm-up
            for ids in sets[:20]:
                fn(ids)
        for i in range(reps):
            first = i % len(steps)
            for k in [*range(first, len(steps)), *range(first)]:
                fn, ids = steps[k][1], id_sets[k][i]
                start = clock()
                fn(ids)
                times[k, i] = clock() - start
    finally:
        if not trained:
            seqlock.close()
        tmp.cleanup()
    medians = np.median(times, axis=1)
    overhead = float(medians[0])
    result = [(name, max(0.0, float(m) - overhead)) for (name, _, _), m in zip(steps[1:], medians[1:])]
    whole = [name for name, _ in result].index("whole same-host lookup")
    counted = [ns for name, ns in result[:whole] if not name.startswith("(")]
    result.insert(whole, ("sum of the steps above (numpy ids)", sum(counted)))
    return [*result, (steps[0][0], overhead)]


def _percentiles(ns: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(ns, 50)) / 1e3, float(np.percentile(ns, 99)) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small table and few calls (smoke test)")
    parser.add_argument("--table", type=Path, default=None, help="table directory (created if missing)")
    parser.add_argument("--batches", default="32,256,1024", help="rows per call")
    parser.add_argument("--calls", type=int, default=10_000, help="calls of each path per batch size and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every batch size")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the step-by-step timing")
    parser.add_argument(
        "--trained",
        action="store_true",
        help="a table that takes pushes (SGD): the daemon and the same-host path read it under its sequence lock",
    )
    args = parser.parse_args()
    layout = QUICK if args.quick else FULL
    calls, rounds = (300, 1) if args.quick else (args.calls, args.rounds)
    name = ("lookup-quick" if args.quick else "lookup-2gib") + ("-trained" if args.trained else "")
    path = args.table or REPO / "bench-out" / name
    manifest = ensure_table(
        path, layout, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.01) if args.trained else None
    )
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"table {path}: {layout.total_rows:,} rows x {layout.dim} {manifest.dtype.value} = "
        f"{manifest.total_bytes / 2**30:.2f} GiB; python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); gc enabled: {gc.isenabled()}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}\n"
    )
    rng = np.random.default_rng(0)
    with Table.open(path) as table, daemon_process(path, stderr=subprocess.DEVNULL) as address:
        layer_id = layout.layer_ids[0]
        store = table.store(layer_id)
        with MemstoreClient(address, ClientConfig(timeout_s=120, same_host=True)) as client:
            ids = rng.integers(0, store.num_rows, 1000)
            if not np.array_equal(client.lookup(layer_id, ids).numpy(), store.gather(ids)):
                raise RuntimeError("the same-host path returned other rows than the table holds")
            served = "takes pushes: read under its sequence lock" if client.trainable else "frozen"
            print(f"client transport: {client.transport}; table {served}; {calls:,} calls per path, batch and round\n")
            results = [
                (str(round_), batch, compare(store, client, layer_id, batch, calls, rng))
                for round_ in range(1, rounds + 1)
                for batch in batches
            ]
            if rounds > 1:  # every round's calls together: a p99 over more calls, less at the mercy of one round
                results += [
                    (
                        "all",
                        batch,
                        {name: np.concatenate([t[name] for _, b, t in results if b == batch]) for name in PATHS},
                    )
                    for batch in batches
                ]
            print(
                "| round | rows | in-process p50 µs | in-process p99 µs | same-host p50 µs | same-host p99 µs "
                "| p50 ratio | p99 ratio |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for round_, batch, times in results:
                (ip50, ip99), (sp50, sp99) = _percentiles(times[PATHS[0]]), _percentiles(times[PATHS[1]])
                print(
                    f"| {round_} | {batch:,} | {ip50:.1f} | {ip99:.1f} | {sp50:.1f} | {sp99:.1f} | "
                    f"{sp50 / ip50:.2f} | {sp99 / ip99:.2f} |"
                )
            print(
                "\nThe same rounds: same-host lookups of a torch tensor of ids (p99 ratio to the in-process gather's),"
            )
            print("and into a reused out tensor, against the in-process gather into a reused array (µs):\n")
            print(
                "| round | rows | torch ids p50 | torch ids p99 | p99 ratio | into out p50 | into out p99 "
                "| in-process into out p50 | in-process into out p99 | p99 ratio |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for round_, batch, times in results:
                ip99 = _percentiles(times[PATHS[0]])[1]
                (tp50, tp99), (op50, op99) = _percentiles(times[PATHS[2]]), _percentiles(times[PATHS[3]])
                (jp50, jp99) = _percentiles(times[PATHS[4]])
                print(
                    f"| {round_} | {batch:,} | {tp50:.1f} | {tp99:.1f} | {tp99 / ip99:.2f} | {op50:.1f} | "
                    f"{op99:.1f} | {jp50:.1f} | {jp99:.1f} | {op99 / jp99:.2f} |"
                )
            biggest = batches[-1]
            pooled = {name: np.concatenate([t[name] for _, b, t in results if b == biggest]) for name in PATHS[:2]}
            shares = (50, 90, 95, 98, 99, 99.5, 99.9)
            print(f"\nThe tail at {biggest:,} rows, every round's calls (µs):\n")
            print("| path | " + " | ".join(f"p{share:g}" for share in shares) + " |")
            print("|---|" + "---:|" * len(shares))
            for name, ns in pooled.items():
                print(f"| {name} | " + " | ".join(f"{v / 1e3:.1f}" for v in np.percentile(ns, shares)) + " |")
            for batch in () if args.no_breakdown else (batches[0], batches[-1]):
                steps = breakdown(store, client, layer_id, batch, max(200, calls // 2), rng)
                print(f"\nWhere a same-host lookup of {batch:,} rows spends its time (each step alone, median µs):")
                print("| step | µs |\n|---|---:|")
                for name, ns in steps:
                    print(f"| {name} | {ns / 1e3:.2f} |")


if __name__ == "__main__":
    main()
