"""Sustained load: many client processes looking up and pushing against one daemon, checked exactly.

    python -m benchmarks.load                      # 16 clients for 60 s, 1M-row float32 table (~1.5 min)
    python -m benchmarks.load --quick              # 4 clients for 5 s, small table: a smoke run
    python -m benchmarks.load --clients 8 --seconds 30 --durability os

One float32 table of 2 layers x ~500k rows x 32 (dim of the Engram LM), trained by server-side
SGD with lr 0.5 and starting from rows that are all zero (a safetensors file of zeros imported
with an SGD manifest). Every pushed gradient is a small integer, so every row is, at any moment,
-lr times an integer sum: exactly representable in float32 whatever order the daemon applies the
pushes in. At the end the expected table is known exactly and compared bit for bit.

The daemon is a `memstore serve` child process (`--no-same-host`: every row crosses loopback
gRPC; `--durability fsync` by default; `--max-rows-per-request` a power of two above every call
the clients make, see `_row_limit`). Every row is read once through the daemon first, so its
mapped pages are all resident before the clock starts. Then `--clients` processes, each with its
own MemstoreClient and channel, run for `--seconds`:

- 73% lookups of 1,024 to 65,536 ids (10% of them from 1,024 hot rows), each checked: the
  version never goes backwards, and sampled rows are finite multiples of lr (no torn or
  garbage rows);
- 25% pushes (acknowledged synchronously, with step ids) of 256 to 8,192 ids, a quarter from
  the hot rows (so clients contend on rows, and repeated ids within a push are summed by the
  client), gradients integers in [-4, 4]. A push's ids and gradients are a function of
  (seed, client, push number), so the clients report only which pushes were acknowledged and
  the expected table is regenerated afterwards;
- 2% deliberately bad calls, each of which must raise exactly the expected project exception:
  a lookup with an id out of range (InvalidArgumentError), a lookup of 1 to 1,000 distinct rows
  more than the server's limit (ResourceExhaustedError), a push with a NaN gradient
  (InvalidArgumentError).

Any other exception is an error (a RESOURCE_EXHAUSTED nobody asked for is reported apart as
backpressure). At the end: the daemon's version must equal the acknowledged pushes, and every
row read back must equal -lr x the sum of the gradients acknowledged for it (a differing row is
a lost or doubled update). Latency is per call as the client sees it (queueing in the daemon's
worker pool included). The daemon's /proc/PID/status is sampled every second: RssAnon (heap:
what would leak; it includes the last `--feed-bytes` (64 MiB) of pushes kept for followers, full a
few seconds into the run) and RssFile (the table's mapped pages and the shared libraries: flat
once every row was read).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import process_cpu_s
from client import ClientConfig, MemstoreClient
from client.client import sum_duplicate_rows
from memstore.cli_args import enum_choice
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, ResourceExhaustedError
from memstore.exchange import import_safetensors, tensor_name
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.metrics import summarize
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability

LR = 0.5  # a power of two: -lr x an integer sum is exact in float32
GRAD_MAX = 4  # gradients are integers in [-GRAD_MAX, GRAD_MAX]
HOT_ROWS = 1024  # rows every client pushes to often: the contention a lost update would show in
PUSH_SHARE = 0.25
BAD_SHARE = 0.02
LOOKUP_HOT_SHARE = 0.1
PUSH_HOT_SHARE = 0.25
CHECKED_ROWS = 256  # rows of each lookup checked to be finite multiples of lr
BAD_KINDS = {
    "lookup id out of range": InvalidArgumentError,
    "lookup above --max-rows-per-request": ResourceExhaustedError,
    "push with a NaN gradient": InvalidArgumentError,
}
MiB = 2**20


@dataclass(frozen=True)
class Spec:
    """What every client process needs to know (picklable: it crosses a spawn)."""

    address: str
    seed: int
    seconds: float
    layer_rows: dict[int, int]
    dim: int
    max_batch: int  # largest lookup
    min_batch: int
    max_rows: int  # the server's --max-rows-per-request
    push_rows: tuple[int, int]


@dataclass
class ClientResult:
    """What one client process reports back."""

    index: int
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    lookup_ms: list[float] = field(default_factory=list)
    push_ms: list[float] = field(default_factory=list)
    lookup_rows: int = 0
    push_rows: int = 0
    acked: list[int] = field(default_factory=list)  # push numbers acknowledged
    unknown: list[int] = field(default_factory=list)  # push numbers that failed unexpectedly: applied or not
    deliberate: dict[str, int] = field(default_factory=dict)  # kind -> raised the expected exception
    backpressure: dict[str, int] = field(default_factory=dict)  # "lookup"/"push" -> unasked RESOURCE_EXHAUSTED
    backpressure_says: dict[str, str] = field(default_factory=dict)  # "lookup"/"push" -> the first one's message
    errors: list[str] = field(default_factory=list)  # everything else, described
    version_backwards: int = 0
    bad_rows: int = 0  # lookups with a sampled row that is not a finite multiple of lr


def push_batch(spec: Spec, client: int, number: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(layer, ids [N], integer gradients [N, dim] int8) of push `number` of `client`: regenerable."""
    rng = np.random.default_rng([spec.seed, client, number])
    layers = sorted(spec.layer_rows)
    layer = layers[int(rng.integers(len(layers)))]
    count = int(rng.integers(spec.push_rows[0], spec.push_rows[1] + 1))
    ids = _ids(rng, count, spec.layer_rows[layer], PUSH_HOT_SHARE)
    grads = rng.integers(-GRAD_MAX, GRAD_MAX + 1, (count, spec.dim), dtype=np.int8)
    return layer, ids, grads


def _ids(rng: np.random.Generator, count: int, num_rows: int, hot_share: float) -> np.ndarray:
    """`count` ids of a layer: uniform, except about `hot_share` of them from the first HOT_ROWS rows."""
    ids = rng.integers(0, num_rows, count)
    hot = rng.random(count) < hot_share
    ids[hot] = rng.integers(0, HOT_ROWS, int(hot.sum()))
    return ids


# --- the client processes ------------------------------------------------------------------------


def run_client(index: int, spec: Spec, barrier: Any, results: Any) -> None:
    """One client process: connect, wait for the others, run the mix for spec.seconds, report."""
    result = ClientResult(index)
    try:
        import torch

        torch.set_num_threads(1)  # 16 processes on a small host: no intra-op thread pools
        with MemstoreClient(spec.address, ClientConfig(same_host=False)) as client:
            client.describe()  # connected before the clock starts
            barrier.wait(timeout=600)
            _run_mix(client, index, spec, result)
    except Exception as exc:  # reported, never lost: the parent counts it as an error
        result.errors.append(f"client {index} stopped: {exc!r}")
    results.put(result)


def _run_mix(client: MemstoreClient, index: int, spec: Spec, result: ClientResult) -> None:
    rng = np.random.default_rng([spec.seed, index, 2**32])  # op choices and lookup ids; pushes have their own
    layers = sorted(spec.layer_rows)
    steps = dict.fromkeys(layers, 0)
    seen_version = 0
    number = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < spec.seconds:
        draw = rng.random()
        if draw < BAD_SHARE:
            _deliberate(client, rng, spec, result)
        elif draw < BAD_SHARE + PUSH_SHARE:
            layer, ids, grads = push_batch(spec, index, number)
            steps[layer] += 1
            t = time.perf_counter()
            try:
                ack = client.push(layer, ids, grads.astype(np.float32), step_id=steps[layer])
            except ResourceExhaustedError as exc:
                _backpressure(result, "push", exc)
            except Exception as exc:
                result.errors.append(f"push {number} of client {index}: {exc!r}")
                result.unknown.append(number)
            else:
                result.push_ms.append(1e3 * (time.perf_counter() - t))
                result.push_rows += len(ids)
                result.acked.append(number)
                # Applied after everything this client saw: its version must be newer.
                result.version_backwards += ack.version <= seen_version
                seen_version = max(seen_version, ack.version)
            number += 1
        else:
            layer = layers[int(rng.integers(len(layers)))]
            count = int(rng.integers(spec.min_batch, spec.max_batch + 1))
            ids = _ids(rng, count, spec.layer_rows[layer], LOOKUP_HOT_SHARE)
            t = time.perf_counter()
            try:
                rows, version = client.lookup(layer, ids, return_version=True)
            except ResourceExhaustedError as exc:
                _backpressure(result, "lookup", exc)
            except Exception as exc:
                result.errors.append(f"lookup of client {index}: {exc!r}")
            else:
                result.lookup_ms.append(1e3 * (time.perf_counter() - t))
                result.lookup_rows += count
                result.version_backwards += version < seen_version
                seen_version = max(seen_version, version)
                sample = rows.numpy()[:: max(1, count // CHECKED_ROWS)] / LR  # integers if every row is whole
                result.bad_rows += not (np.isfinite(sample).all() and (sample == np.round(sample)).all())
    result.elapsed_s = time.perf_counter() - start
    result.cpu_s = time.process_time() - cpu


def _backpressure(result: ClientResult, call: str, exc: Exception) -> None:
    result.backpressure[call] = result.backpressure.get(call, 0) + 1
    result.backpressure_says.setdefault(call, str(exc))


def _deliberate(client: MemstoreClient, rng: np.random.Generator, spec: Spec, result: ClientResult) -> None:
    """One deliberately bad call; it must raise exactly the exception BAD_KINDS names."""
    kind = list(BAD_KINDS)[int(rng.integers(len(BAD_KINDS)))]
    layer = sorted(spec.layer_rows)[int(rng.integers(len(spec.layer_rows)))]
    num_rows = spec.layer_rows[layer]
    try:
        if kind == "lookup id out of range":
            ids = rng.integers(0, num_rows, 100)
            ids[int(rng.integers(100))] = num_rows + int(rng.integers(1000))
            client.lookup(layer, ids)
        elif kind == "lookup above --max-rows-per-request":
            # Distinct ids, so the client's deduplication cannot shrink the request under the limit.
            count = spec.max_rows + 1 + int(rng.integers(1000))
            client.lookup(layer, (int(rng.integers(num_rows)) + np.arange(count)) % num_rows)
        else:
            grads = np.zeros((16, spec.dim), dtype=np.float32)
            grads[int(rng.integers(16)), int(rng.integers(spec.dim))] = np.nan
            client.push(layer, rng.choice(num_rows, 16, replace=False), grads)  # no step id: never retried
    except Exception as exc:
        if type(exc) is BAD_KINDS[kind]:  # exactly it: a subclass would be another failure
            result.deliberate[kind] = result.deliberate.get(kind, 0) + 1
        else:
            result.errors.append(f"deliberate {kind}: raised {exc!r}, expected {BAD_KINDS[kind].__name__}")
    else:
        result.errors.append(f"deliberate {kind}: succeeded, expected {BAD_KINDS[kind].__name__}")


# --- the daemon's memory ---------------------------------------------------------------------------


class MemorySampler(threading.Thread):
    """Samples a process's /proc/PID/status (kB fields) and CPU time every `period_s` seconds."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "Threads")

    def __init__(self, pid: int, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.period_s = pid, period_s
        self.samples: list[dict[str, float]] = []
        self._stop_event = threading.Event()
        self._start = time.perf_counter()

    def run(self) -> None:
        self._start = time.perf_counter()
        while True:
            self.samples.append(self.read())
            if self._stop_event.wait(self.period_s):
                break
        self.samples.append(self.read())

    def read(self) -> dict[str, float]:
        text = Path(f"/proc/{self.pid}/status").read_text()
        sample = {name: float(re.search(rf"^{name}:\s+(\d+)", text, re.M).group(1)) for name in self.FIELDS}
        sample["cpu_s"] = process_cpu_s(self.pid)
        sample["t"] = time.perf_counter() - self._start
        return sample

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def machine_cpu() -> np.ndarray:
    """Jiffies the whole machine spent so far: [busy (user, system, irq), iowait, idle, steal] (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split()[1:9]  # the first line: all CPUs
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields)
    return np.array([user + nice + system + irq + softirq, iowait, idle, steal], dtype=np.float64)


def _memory_report(samples: list[dict[str, float]], seconds: float) -> list[str]:
    """Lines: the daemon's memory after warm-up, mid-run, at the end and at most; RssAnon's slope."""
    warm = round(min(5.0, seconds / 4))

    def at(t: float) -> dict[str, float]:
        return min(samples, key=lambda s: abs(s["t"] - t))

    rows = [
        ("before (0 s)", samples[0]),  # every row read once, no client calling yet
        (f"start ({warm:g} s)", at(warm)),
        (f"middle ({seconds / 2:.0f} s)", at(seconds / 2)),
        ("end", samples[-1]),
        ("max", {name: max(s[name] for s in samples) for name in MemorySampler.FIELDS}),
    ]
    lines = [f"{'':>16} {'VmRSS':>10} {'RssAnon':>10} {'RssFile':>10} {'threads':>8}"]
    for label, s in rows:
        lines.append(
            f"{label:>16} {s['VmRSS'] / 1024:>6.1f} MiB {s['RssAnon'] / 1024:>6.1f} MiB "
            f"{s['RssFile'] / 1024:>6.1f} MiB {s['Threads']:>8.0f}"
        )
    tail = [s for s in samples if s["t"] >= seconds / 4]
    if len(tail) >= 4:
        t = np.array([s["t"] for s in tail]) / 60  # minutes
        for name in ("RssAnon", "RssFile"):
            mib = np.array([s[name] for s in tail]) / 1024
            (slope, _), cov = np.polyfit(t, mib, 1, cov=True)
            # A 95% interval: calls in flight make the heap swing by tens of MiB from one second to the next.
            lines.append(
                f"{name} over the last 3/4 of the run ({len(tail)} samples): {mib.min():.1f}-{mib.max():.1f} MiB, "
                f"slope {slope:+.1f} ± {1.96 * np.sqrt(cov[0, 0]):.1f} MiB/min"
            )
    # Growth that levels off (allocator pools settling) vs. growth that keeps on (a leak): medians per quarter.
    quarters = [
        [s["RssAnon"] / 1024 for s in samples if q * seconds / 4 <= s["t"] < (q + 1) * seconds / 4] for q in range(4)
    ]
    if all(quarters):
        lines.append(
            "RssAnon median per quarter of the run: " + ", ".join(f"{np.median(q):.1f}" for q in quarters) + " MiB"
        )
    return lines


# --- the table ---------------------------------------------------------------------------------------


def make_table(work: Path, table_rows: int) -> Manifest:
    """A float32 SGD table of two layers whose rows are all zero: zeros imported from safetensors."""
    from safetensors.numpy import save_file

    per_head = table_rows // 32  # 2 layers x 2 orders x 8 heads
    layout = EngramLayout(
        layer_ids=(1, 4), vocab_size_per_ngram=(per_head, per_head), max_ngram=3, heads_per_ngram=8, dim=32
    )
    manifest = Manifest(layout=layout, dtype=DType.FLOAT32, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=LR))
    zeros = work / "zeros.safetensors"
    save_file(
        {tensor_name(layer): np.zeros((layout.num_rows(layer), layout.dim), np.float32) for layer in layout.layer_ids},
        str(zeros),
    )
    import_safetensors(zeros, work / "table", manifest=manifest)
    zeros.unlink()
    return manifest


def read_all(client: MemstoreClient, layer: int, num_rows: int, chunk: int) -> np.ndarray:
    """Every row of a layer through the daemon, `chunk` rows per lookup: [num_rows, dim]."""
    parts = [
        client.lookup(layer, np.arange(start, min(start + chunk, num_rows))).numpy()
        for start in range(0, num_rows, chunk)
    ]
    return np.concatenate(parts)


def expected_rows(spec: Spec, pushes: list[tuple[int, int]]) -> dict[int, np.ndarray]:
    """Per layer, the gradient sum [num_rows, dim] (int32) of the (client, push number) pushes, regenerated."""
    sums = {layer: np.zeros((rows, spec.dim), np.int32) for layer, rows in spec.layer_rows.items()}
    for client, number in pushes:
        layer, ids, grads = push_batch(spec, client, number)
        unique, summed = sum_duplicate_rows(ids, grads)  # exact: small integers in float32
        sums[layer][unique] += summed.astype(np.int32)
    return sums


def differing_rows(final: dict[int, np.ndarray], sums: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per layer, which rows read back [num_rows] (bool) differ, bit for bit, from -lr x their gradient sums."""
    differ = {}
    for layer, rows in final.items():
        expected = (0.0 - LR * sums[layer].astype(np.float64)).astype(np.float32)  # +0.0 where the sum is 0
        differ[layer] = (rows.view(np.uint32) != expected.view(np.uint32)).any(axis=1)
    return differ


# --- the run ------------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50:7.1f}  p99 {p99:7.1f}  max {max(values):7.1f} ms"


def _summed(results: list[ClientResult], name: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for result in results:
        for key, count in getattr(result, name).items():
            total[key] = total.get(key, 0) + count
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=None, help="client processes (default 16; --quick 4)")
    parser.add_argument("--seconds", type=float, default=None, help="how long they run (default 60; --quick 5)")
    parser.add_argument("--table-rows", type=int, default=None, help="about this many rows (default 1M; --quick 200k)")
    parser.add_argument("--durability", **enum_choice(Durability), default=Durability.FSYNC)
    parser.add_argument(
        "--checkpoint-every", type=int, default=None, help="passed to memstore serve (default: the daemon's, 1000)"
    )
    parser.add_argument(
        "--max-in-flight-bytes", type=int, default=None, help="passed to memstore serve (default: the daemon's, 1 GiB)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 clients, 5 s, a small table: a smoke run")
    args = parser.parse_args()
    clients = args.clients or (4 if args.quick else 16)
    seconds = args.seconds or (5.0 if args.quick else 60.0)
    table_rows = args.table_rows or (200_000 if args.quick else 1_000_000)
    max_batch = 16_384 if args.quick else 65_536
    push_rows = (256, 2048) if args.quick else (256, 8192)

    work = Path(tempfile.mkdtemp(prefix="memstore-load-"))
    try:
        t = time.perf_counter()
        manifest = make_table(work, table_rows)
        layout = manifest.layout
        layer_rows = {layer: layout.num_rows(layer) for layer in layout.layer_ids}
        max_rows = _row_limit(max_batch, push_rows[1], layout.dim)
        if min(layer_rows.values()) <= max_rows + 1000:  # the oversized lookup needs that many distinct ids
            parser.error(f"--table-rows {table_rows} is too small for a server limit of {max_rows:,} rows")
        print(
            f"table: {len(layer_rows)} layers x {min(layer_rows.values()):,} rows x {layout.dim} float32 "
            f"({manifest.total_bytes / MiB:.0f} MiB), sgd lr {LR}, all zero (imported in "
            f"{time.perf_counter() - t:.1f} s)"
        )
        serve_args = ["--no-same-host", "--durability", args.durability.value, "--max-rows-per-request", str(max_rows)]
        if args.checkpoint_every is not None:
            serve_args += ["--checkpoint-every", str(args.checkpoint_every)]
        if args.max_in_flight_bytes is not None:
            serve_args += ["--max-in-flight-bytes", str(args.max_in_flight_bytes)]
        print(f"daemon: memstore serve {' '.join(serve_args)}")
        log_path = work / "daemon.log"
        with open(log_path, "wb") as log:
            daemon, address = start_daemon(work / "table", serve_args, stdout=log, stderr=log)
        spec = Spec(
            address=address,
            seed=args.seed,
            seconds=seconds,
            layer_rows=layer_rows,
            dim=layout.dim,
            max_batch=max_batch,
            min_batch=max_batch // 64,
            max_rows=max_rows,
            push_rows=push_rows,
        )
        print(
            f"load: {clients} client processes x {seconds:g} s; each call a lookup of {spec.min_batch:,}-"
            f"{spec.max_batch:,} ids ({1 - PUSH_SHARE - BAD_SHARE:.0%}), a push of {spec.push_rows[0]:,}-"
            f"{spec.push_rows[1]:,} ids ({PUSH_SHARE:.0%}, gradients integers in [-{GRAD_MAX}, {GRAD_MAX}]) "
            f"or deliberately bad ({BAD_SHARE:.0%})"
        )
        try:
            results, samples, machine, initial_zero = _run(spec, clients, daemon.pid)
            with MemstoreClient(address, ClientConfig(same_host=False)) as client:
                version = client.version()
                t = time.perf_counter()
                final = {layer: read_all(client, layer, rows, max_batch) for layer, rows in layer_rows.items()}
                read_s = time.perf_counter() - t
                daemon_stats = summarize(client.stats())
        finally:
            code = stop_daemon(daemon)
        log_text = log_path.read_text(errors="replace")
        ok = _report(spec, results, samples, machine, initial_zero, version, final, read_s, code, log_text)
        print("\n== the daemon's own count (memstore stats)")
        print("\n".join(daemon_stats.lines()))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _row_limit(max_batch: int, max_push: int, dim: int) -> int:
    """The server's row limit: a power of two above every lookup and push the clients make.

    Not just the largest lookup: a daemon that sizes its request-message cap from this limit
    (8 bytes of id per row, as at commit fef2871) would refuse pushes, which carry 8 + 4 * dim
    bytes per row, far below the limit, with gRPC's own RESOURCE_EXHAUSTED.
    """
    need = max(max_batch, max_push * (8 + 4 * dim) // 8 + 1024)
    return 1 << (need - 1).bit_length()


def _run(spec: Spec, clients: int, pid: int) -> tuple[list[ClientResult], list[dict[str, float]], np.ndarray, bool]:
    """Pre-touch every row, start the clients together, sample the daemon until they are done: (the
    clients' results, the daemon's samples, the machine's CPU shares busy/iowait/idle/steal, whether every
    row was zero before)."""
    with MemstoreClient(spec.address, ClientConfig(same_host=False)) as client:
        t = time.perf_counter()
        initial_zero = all(
            not read_all(client, layer, rows, spec.max_batch).any() for layer, rows in spec.layer_rows.items()
        )
        print(f"every row read once through the daemon in {time.perf_counter() - t:.1f} s", flush=True)
    context = mp.get_context("spawn")  # no inherited gRPC state: every client is a fresh process
    barrier = context.Barrier(clients + 1)
    queue = context.Queue()
    processes = [context.Process(target=run_client, args=(i, spec, barrier, queue)) for i in range(clients)]
    t = time.perf_counter()
    for process in processes:
        process.start()
    barrier.wait(timeout=600)
    print(f"{clients} clients started and connected in {time.perf_counter() - t:.1f} s; running ...", flush=True)
    sampler = MemorySampler(pid)
    sampler.start()
    jiffies = machine_cpu()
    results = []
    for _ in processes:
        results.append(queue.get(timeout=spec.seconds + 600))  # drained before join: results may be large
    jiffies = machine_cpu() - jiffies
    sampler.stop()
    for process in processes:
        process.join()
    return sorted(results, key=lambda r: r.index), sampler.samples, jiffies / jiffies.sum(), initial_zero


def _report(
    spec: Spec,
    results: list[ClientResult],
    samples: list[dict[str, float]],
    machine: np.ndarray,
    initial_zero: bool,
    version: int,
    final: dict[int, np.ndarray],
    read_s: float,
    exit_code: int,
    log_text: str,
) -> bool:
    """Print the summary; True when every check passed (no error, no lost update, a clean exit)."""
    elapsed = max(r.elapsed_s for r in results)
    lookup_ms = [ms for r in results for ms in r.lookup_ms]
    push_ms = [ms for r in results for ms in r.push_ms]
    lookup_rows = sum(r.lookup_rows for r in results)
    push_rows = sum(r.push_rows for r in results)
    acked = sum(len(r.acked) for r in results)
    unknown = sum(len(r.unknown) for r in results)
    print(f"\n== traffic ({elapsed:.1f} s, {len(results)} clients)")
    print(
        f"lookups: {len(lookup_ms):,} ({len(lookup_ms) / elapsed:,.1f}/s), {lookup_rows / 1e6:,.1f} M rows "
        f"({lookup_rows / elapsed / 1e6:.2f} M rows/s, {lookup_rows * spec.dim * 4 / elapsed / MiB:,.0f} MiB/s)"
    )
    print(
        f"pushes:  {acked:,} acknowledged ({acked / elapsed:,.1f}/s), {push_rows / 1e6:,.2f} M rows "
        f"({push_rows / elapsed / 1e3:,.0f} k rows/s)"
    )
    print(f"lookup latency: {_percentiles(lookup_ms)}")
    print(f"push latency:   {_percentiles(push_ms)}")
    daemon_cpu = samples[-1]["cpu_s"] - samples[0]["cpu_s"]
    client_cpu = sum(r.cpu_s for r in results)
    cores = os.cpu_count() or 1
    others = max(0.0, machine[0] * cores - (daemon_cpu + client_cpu) / elapsed)
    print(
        f"CPU (cores of {cores}): daemon {daemon_cpu / elapsed:.2f}, clients {client_cpu / elapsed:.2f}, "
        f"other processes {others:.2f}; the machine busy {machine[0]:.0%}, iowait {machine[1]:.0%}, "
        f"idle {machine[2]:.0%}" + (f", steal {machine[3]:.0%}" if machine[3] else "")
    )

    print("\n== errors")
    deliberate = _summed(results, "deliberate")
    print(
        f"deliberate, raised the expected exception: {sum(deliberate.values()):,} ("
        + ", ".join(f"{kind}: {deliberate.get(kind, 0)} {cls.__name__}" for kind, cls in BAD_KINDS.items())
        + ")"
    )
    backpressure = _summed(results, "backpressure")
    print(
        f"backpressure (RESOURCE_EXHAUSTED nobody asked for): {sum(backpressure.values())}"
        + (f" {backpressure}" if backpressure else "")
    )
    for call in backpressure:
        says = next(r.backpressure_says[call] for r in results if call in r.backpressure_says)
        print(f"  first {call}: {says}")
    errors = [e for r in results for e in r.errors]
    print(f"other errors: {len(errors)}")
    for error in errors[:10]:
        print(f"  {error}")
    print(f"version seen going backwards: {sum(r.version_backwards for r in results)}")
    print(f"lookups with a sampled row not a finite multiple of lr: {sum(r.bad_rows for r in results)}")

    print("\n== exactness")
    sums = expected_rows(spec, [(r.index, number) for r in results for number in r.acked])
    print(f"rows all zero before the run: {initial_zero}")
    print(
        f"server version {version:,} == acknowledged pushes {acked:,}: {version == acked}"
        + (f" ({unknown} pushes failed with an unknown outcome)" if unknown else "")
    )
    differ = differing_rows(final, sums)
    total = sum(len(rows) for rows in final.values())
    differing = sum(int(d.sum()) for d in differ.values())
    touched = sum(int(s.any(axis=1).sum()) for s in sums.values())
    print(
        f"rows read back: {total:,} in {read_s:.1f} s ({touched:,} with a nonzero gradient sum); "
        f"equal bit for bit to -lr x the sum of their acknowledged gradients: {total - differing:,}"
    )
    print(f"lost updates (rows differing): {differing}")
    if differing and unknown:  # is every difference a failed push that was applied after all?
        failed = expected_rows(spec, [(r.index, number) for r in results for number in r.unknown])
        also = {layer: sums[layer] + failed[layer] for layer in sums}
        unexplained = sum(int(d.sum()) for d in differing_rows(final, also).values())
        print(
            f"  rows equal to -lr x the sum of the acknowledged pushes and the {unknown} failed ones: "
            f"{total - unexplained:,} (the failed pushes were applied); rows matching neither: {unexplained}"
        )

    print("\n== daemon memory (/proc/PID/status, every second)")
    for line in _memory_report(samples, elapsed):
        print(line)
    lines = log_text.splitlines()
    unexpected = [i for i, line in enumerate(lines) if " ERROR " in line or " CRITICAL " in line]
    print(f"daemon exited {exit_code}; log lines at ERROR: {len(unexpected)}")
    if unexpected:  # the first one in full, traceback included: up to the next log line
        first = unexpected[0]
        end = next((i for i in range(first + 1, len(lines)) if re.match(r"\d{4}-\d\d-\d\d ", lines[i])), len(lines))
        for line in lines[first:end]:
            print(f"  {line}")
    wrong = sum(r.version_backwards + r.bad_rows for r in results)
    return not (errors or wrong or unknown or differing or unexpected) and version == acked and exit_code == 0


if __name__ == "__main__":
    sys.exit(main())
