"""The DRAM tier over a disk-resident table: the daemon's row cache vs. mmap + page cache under a memory limit.

    python -m benchmarks.disk_tier [--work bench-out/disk-tier] [--text data/text/en ...]
                                   [--limit 4G] [--row-cache-bytes 3.5G] [--configs pagecache,rowcache,dram]
                                   [--repeat 1] [--max-seconds 600] [--out docs/results/disk-tier.md]

The table: the DeepSeek-V4.1-Flash layout (layers 1 and 14, 4-grams x 8 heads, 24 row reads per
token per layer) with its per-order vocabulary scaled from 16,000,000 to --vocab (1,356,000: 65.1M
rows, 16.0 GiB), rows of 264 bytes: 260 fp8 (e4m3) codes + a float32 scale, `float8_e4m3_rowscale`
at dim 260. V4.1's rows are 256 fp8 values + 8 bytes of scale; the memstore only imports such rows
as opaque bytes (`DType.BYTES`, never generated), and an import would need the 16 GiB written out
first, so the table is made by `memstore create` (eager: every row on disk; a lazy table would time
row generation, not reads) with the same row size, which is what the disk and the caches see.
It is made once under --work and reused.

The traffic: the texts (--text, default data/text/en from scripts/get_text.sh) tokenized with
DeepSeek-V4's tokenizer and hashed with the scaled layout (`model.traffic.write_streams`), replayed
from the start in steps of --batch x --seq tokens: each step one Lookup per layer of the step's
24 x tokens row ids (the client sends each step's distinct ids once). --tokens is cut at the first
step where the distinct rows replayed (both layers) reach twice --limit in bytes (printed and
checked), so no cache of the limit's size holds the traffic.

Configurations, same traffic and the same client (gRPC from this process, outside the group,
--in-flight steps outstanding):
- pagecache: `memstore serve` (plain mmap) in a cgroup-v1 memory group of --limit (the page cache it
  faults in counts against the limit);
- rowcache: the same daemon with `--row-cache-bytes` in the same group;
- rowcache-samehost: the rowcache daemon read by a same-host client (it copies the rows the daemon's
  cache holds in its own process and asks over gRPC for the rest);
- dram: the same daemon without a limit, its table read into the page cache first (warm).
The table's pages are dropped from the page cache before each limited run (posix_fadvise
DONTNEED on its files, and `echo 1 > /proc/sys/vm/drop_caches` with --drop-caches), and after the
dram run. Each run is cut into --windows windows of steps: throughput (row reads/s: 24 per token
per layer, tokens/s, distinct rows served/s), the daemon's major faults and bytes read from the
block device (/proc/PID/stat, /proc/PID/io), the group's memory.stat, and the daemon's row-cache
counters (its Stats) per window. The first window is cold (nothing cached), the last warm.
--reread replays the last window once more after the pass (rows read a moment ago).
--disk-seconds measures the disk's raw random 4 KiB read rate (O_DIRECT, 1..32 threads) first.
Needs root (cgroups, drop_caches) and Linux.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, process_cpu_s
from benchmarks.memgroup import MemoryGroup, parse_bytes
from client import ClientConfig, MemstoreClient
from memstore.dtypes import DType
from memstore.errors import TableFormatError
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.tabledir.manifest import Init, Manifest
from model import traffic

DTYPE = DType.FLOAT8_E4M3_ROWSCALE
DIM = 260  # 260 codes + a 4-byte scale = 264 bytes, V4.1-Flash's row size
VOCAB = 1_356_000  # per order: V4.1-Flash's 16,000,000 scaled to a 16 GiB table
CONFIGS = ("pagecache", "rowcache", "rowcache-samehost", "dram")
DAEMON_ARGS = ("--read-only", "--no-integrity")
SERVED = "memstore_rows_served_total"


def scaled_layout(vocab: int = VOCAB, dim: int = DIM) -> EngramLayout:
    """V4.1-Flash's layout (layers, orders, heads) with `vocab` rows per order's head set and `dim` values."""
    v41 = traffic.V41_FLASH
    return replace(v41, vocab_size_per_ngram=(vocab,) * len(v41.vocab_size_per_ngram), dim=dim)


@dataclass
class Traffic:
    """Per-layer row-id streams [tokens, rows per token] cut into steps of `step_tokens` tokens."""

    streams: dict[int, np.ndarray]
    step_tokens: int
    num_rows: dict[int, int]
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        tokens = {len(s) for s in self.streams.values()}
        if len(tokens) != 1:
            raise ValueError(f"layers' streams differ in length: {tokens}")
        self.steps = tokens.pop() // self.step_tokens  # a last partial step is left out

    def step(self, k: int) -> dict[int, np.ndarray]:
        """Step k's row ids per layer, flat int64 (token-major, as the model asks for them)."""
        lo, hi = k * self.step_tokens, (k + 1) * self.step_tokens
        return {layer: s[lo:hi].reshape(-1).astype(np.int64) for layer, s in self.streams.items()}

    def distinct_growth(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct rows of all layers touched by steps 0..k, cumulative; distinct rows of step k alone)."""
        seen = {layer: np.zeros(n, dtype=bool) for layer, n in self.num_rows.items()}
        cumulative = np.zeros(self.steps, dtype=np.int64)
        per_step = np.zeros(self.steps, dtype=np.int64)
        total = 0
        for k in range(self.steps):
            for layer, ids in self.step(k).items():
                unique = np.unique(ids)
                per_step[k] += len(unique)
                total += int(len(unique) - np.count_nonzero(seen[layer][unique]))
                seen[layer][unique] = True
            cumulative[k] = total
        return cumulative, per_step

    def truncated(self, steps: int) -> Traffic:
        """The first `steps` steps."""
        streams = {layer: s[: steps * self.step_tokens] for layer, s in self.streams.items()}
        return Traffic(streams, self.step_tokens, self.num_rows)


def steps_reaching(cumulative: np.ndarray, target_rows: int) -> int | None:
    """The fewest steps whose distinct rows reach `target_rows` (None: the traffic never does)."""
    k = int(np.searchsorted(cumulative, target_rows))
    return k + 1 if k < len(cumulative) else None


def read_proc(pid: int) -> dict[str, float]:
    """A process's major faults, bytes read from the block device and CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {"majflt": int(fields[9]), "read_bytes": int(io["read_bytes"]), "cpu_s": process_cpu_s(pid)}


def row_cache_metrics(prometheus_text: str) -> dict[str, float]:
    """The daemon's row-cache metrics and rows served: {name{labels}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(prometheus_text):
        for sample in family.samples:
            if "row_cache" in sample.name or sample.name == SERVED:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def row_cache_hits_misses(metrics: dict[str, float]) -> tuple[float, float] | None:
    """(hits, misses) summed over the row cache's counters, or None when the daemon has none."""
    hits = sum(v for k, v in metrics.items() if "hit" in k.split("{")[0] and k.split("{")[0].endswith("_total"))
    misses = sum(v for k, v in metrics.items() if "miss" in k.split("{")[0] and k.split("{")[0].endswith("_total"))
    return (hits, misses) if hits or misses else None


def drop_table_cache(table: Path, global_drop: bool) -> None:
    """Evict the table's pages from the page cache (and every clean page with `global_drop`)."""
    for path in sorted(table.iterdir()):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    if global_drop:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")


def resident_bytes(table: Path) -> int:
    """Bytes of the table's row files in the page cache now (util-linux `fincore`)."""
    files = [str(p) for p in sorted(table.glob("*.rows"))]
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return sum(int(x) for x in out.split())


def warm_table(table: Path) -> None:
    """Read the row files once, into the page cache."""
    for path in sorted(table.glob("*.rows")):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def raw_disk_rate(path: Path, threads: int, seconds: float, block: int = 4096) -> float:
    """Random aligned `block`-byte reads/s from `path` with O_DIRECT (no page cache), `threads` at once."""
    size = path.stat().st_size // block
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def worker(k: int) -> None:
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
        offsets = (np.random.default_rng(k).integers(0, size, 1 << 16) * block).tolist()
        i = 0
        while time.monotonic() < stop:
            os.preadv(fd, [buf], offsets[i & 0xFFFF])
            i += 1
        counts[k] = i

    start = time.monotonic()
    try:
        pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        os.close(fd)
    return sum(counts) / (time.monotonic() - start)


def ensure_table(path: Path, layout: EngramLayout) -> Manifest:
    """The eager table at `path`, made by `memstore create` when missing or of another layout."""
    try:
        manifest = Manifest.read(path)
        if manifest.layout == layout and manifest.dtype is DTYPE and manifest.init is Init.EAGER:
            return manifest
        print(f"{path} holds another table: recreating it", flush=True)
    except TableFormatError:
        pass
    command = [sys.executable, "-m", "memstore", "create", str(path), "--overwrite", "--no-progress",
               "--layers", ",".join(map(str, layout.layer_ids)),
               "--vocab-size-per-ngram", ",".join(map(str, layout.vocab_size_per_ngram)),
               "--max-ngram", str(layout.max_ngram), "--heads-per-ngram", str(layout.heads_per_ngram),
               "--dim", str(layout.dim), "--dtype", DTYPE.value]  # fmt: skip
    print("creating the table:", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    drop_table_cache(path, global_drop=False)  # what create wrote would otherwise sit in the page cache
    return Manifest.read(path)


def ensure_streams(texts: list[Path], layout: EngramLayout, row_bytes: int, directory: Path) -> dict[str, Any]:
    """model.traffic's row-id streams of the texts under `directory`, written when missing or stale."""
    config = traffic.TrafficConfig(texts=tuple(texts), layout=layout, row_bytes=row_bytes, progress=False)
    meta_path = directory / "streams.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("layout") == layout.to_dict() and meta.get("files") == [str(p) for p in config.files]:
            return meta
    print(f"tokenizing and hashing {len(config.files)} files into {directory} ...", flush=True)
    return traffic.write_streams(config, directory)


@dataclass
class Sample:
    """Counters read at a window boundary."""

    time: float
    proc: dict[str, float]
    group: dict[str, int]
    cache: dict[str, float]


def _sample(client: MemstoreClient, pid: int, group: MemoryGroup | None) -> Sample:
    return Sample(time.perf_counter(), read_proc(pid), group.stat() if group else {},
                  row_cache_metrics(client.stats()))  # fmt: skip


def replay(address: str, pid: int, work: Traffic, per_step: np.ndarray, windows: int, in_flight: int,
           max_seconds: float, group: MemoryGroup | None, same_host: bool = False,
           reread: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Replay the steps through one client (gRPC, or the same-host path), `in_flight` steps outstanding;
    one record per window. With `reread`, the last window's steps once more after the pass (a record
    marked "reread": traffic whose rows were all read a moment ago)."""
    heads = next(iter(work.streams.values())).shape[1]
    layers = len(work.streams)
    bounds = np.linspace(0, work.steps, windows + 1).astype(int)
    spans = [(int(bounds[w]), int(bounds[w + 1])) for w in range(windows)]
    records: list[dict[str, Any]] = []
    config = ClientConfig(timeout_s=900, same_host=same_host)
    with MemstoreClient(address, config) as client, ThreadPoolExecutor(in_flight * layers) as pool:
        client.describe()
        started = time.perf_counter()
        before = _sample(client, pid, group)
        for w, (lo, hi) in enumerate([*spans, spans[-1]] if reread else spans):
            outstanding: deque[list[Future]] = deque()
            for k in range(lo, hi):
                if len(outstanding) >= in_flight:
                    for f in outstanding.popleft():
                        f.result()
                outstanding.append([pool.submit(client.lookup, layer, ids) for layer, ids in work.step(k).items()])
            for futures in outstanding:
                for f in futures:
                    f.result()
            after = _sample(client, pid, group)
            r = _window_record(w, lo, hi, before, after, work.step_tokens, heads, layers, per_step)
            r["reread"] = w >= windows
            records.append(r)
            label = "re-read of the last window" if r["reread"] else f"window {w + 1}/{windows}"
            print(f"  {label} steps {lo}-{hi - 1}: {r['reads_per_s'] / 1e6:.3f} M row reads/s, "
                  f"{r['tokens_per_s']:,.0f} tokens/s, {r['distinct_per_s'] / 1e6:.3f} M distinct rows/s; "
                  f"major faults {r['majflt']:,}, read {r['read_bytes'] / 2**20:,.0f} MiB"
                  + (f", daemon row-cache hit {r['row_cache_hit']:.1%}" if r.get("row_cache_hit") is not None else ""),
                  flush=True)  # fmt: skip
            before = after
            if after.time - started > max_seconds and w + 1 < windows:
                print(f"  stopped after {after.time - started:.0f} s (--max-seconds)", flush=True)
                break
    return records


def _window_record(w: int, lo: int, hi: int, before: Sample, after: Sample, step_tokens: int, heads: int,
                   layers: int, per_step: np.ndarray) -> dict[str, Any]:  # fmt: skip
    seconds = after.time - before.time
    tokens = (hi - lo) * step_tokens
    distinct = int(per_step[lo:hi].sum())
    majflt = int(after.proc["majflt"] - before.proc["majflt"])
    record = {
        "window": w, "first_step": lo, "steps": hi - lo, "seconds": seconds, "tokens": tokens,
        "reads": tokens * heads * layers, "distinct": distinct,
        "reads_per_s": tokens * heads * layers / seconds, "tokens_per_s": tokens / seconds,
        "distinct_per_s": distinct / seconds, "majflt": majflt,
        "read_bytes": int(after.proc["read_bytes"] - before.proc["read_bytes"]),
        "daemon_cpu_s": after.proc["cpu_s"] - before.proc["cpu_s"],
        # A major fault brings one 4 KiB page in for a row that was not resident (MADV_RANDOM: no
        # read-around); rows sharing a page fault once, so this is the page cache's hit rate on rows, at most.
        "page_hit": 1 - majflt / distinct if distinct else None,
    }  # fmt: skip
    if after.group:
        record["group"] = {k: after.group.get(k, 0) for k in ("total_cache", "total_rss", "usage_in_bytes",
                                                               "max_usage_in_bytes", "failcnt")}  # fmt: skip
        record["group_pgmajfault"] = after.group.get("total_pgmajfault", 0) - before.group.get("total_pgmajfault", 0)
    # Rows the daemon sent: the distinct rows asked over gRPC (a same-host client asks only for what it
    # did not find in the daemon's row cache).
    record["served"] = after.cache.get(SERVED, 0.0) - before.cache.get(SERVED, 0.0)
    counts_after, counts_before = row_cache_hits_misses(after.cache), row_cache_hits_misses(before.cache)
    if counts_after is not None:
        hits = counts_after[0] - (counts_before[0] if counts_before else 0)
        misses = counts_after[1] - (counts_before[1] if counts_before else 0)
        record["row_cache_hits"], record["row_cache_misses"] = hits, misses
        record["row_cache_hit"] = hits / (hits + misses) if hits + misses else None
        record["row_cache_metrics"] = after.cache
        for name in ("disk_reads", "disk_bytes"):
            key = f"memstore_row_cache_{name}_total"
            record[f"row_cache_{name}"] = after.cache.get(key, 0.0) - before.cache.get(key, 0.0)
    return record


def run_config(name: str, args: argparse.Namespace, table: Path, work: Traffic, per_step: np.ndarray) -> dict:
    """One configuration's daemon, group and replay; the group and the table's page cache cleaned up after."""
    extra = [*DAEMON_ARGS, "--max-workers", str(max(8, 2 * args.in_flight * len(work.streams)))]
    if name.startswith("rowcache"):
        extra += ["--row-cache-bytes", str(args.row_cache_bytes)]
    limited = name != "dram"
    drop_table_cache(table, args.drop_caches)
    if not limited:
        started = time.perf_counter()
        warm_table(table)
        print(f"  table read into the page cache in {time.perf_counter() - started:.0f} s", flush=True)
    resident = resident_bytes(table)
    print(f"{name}: {resident / 2**30:.2f} GiB of the table in the page cache at the start", flush=True)
    result: dict[str, Any] = {"config": name, "daemon_args": extra, "resident_at_start": resident}
    group = MemoryGroup(f"disk-tier-{os.getpid()}", args.limit) if limited else None
    try:
        if group is not None:
            group.__enter__()
        process, address = start_daemon(table, extra, stderr=subprocess.DEVNULL,
                                        preexec_fn=group.enter_child if group else None)  # fmt: skip
        try:
            result["windows"] = replay(address, process.pid, work, per_step, args.windows, args.in_flight,
                                       args.max_seconds, group, same_host=name.endswith("samehost"),
                                       reread=args.reread)  # fmt: skip
            if group is not None:
                result["group_final"] = group.stat()
        finally:
            stop_daemon(process)
    finally:
        if group is not None:
            group.remove()
        if not limited:
            drop_table_cache(table, False)
    result["resident_at_end"] = resident_bytes(table)
    return result


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Cold (first window) and warm (last window) throughput and hit rates of one run."""
    windows = [w for w in run["windows"] if not w.get("reread")]
    reread = [w for w in run["windows"] if w.get("reread")]
    cold, warm = windows[0], windows[-1]
    seconds = sum(w["seconds"] for w in windows)
    out = {"config": run["config"], "steps": sum(w["steps"] for w in windows), "seconds": seconds,
           "reads_per_s": sum(w["reads"] for w in windows) / seconds}  # fmt: skip
    for label, w in (("cold", cold), ("warm", warm)):
        out[f"{label}_reads_per_s"] = w["reads_per_s"]
        out[f"{label}_tokens_per_s"] = w["tokens_per_s"]
        out[f"{label}_page_hit"] = page_hit(run["config"], w)
        out[f"{label}_row_cache_hit"] = cache_hit(run["config"], w)
        out[f"{label}_mib_read_per_kdistinct"] = w["read_bytes"] / 2**20 / (w["distinct"] / 1e3)
    if reread:
        out["reread_reads_per_s"] = reread[0]["reads_per_s"]
        out["reread_page_hit"] = page_hit(run["config"], reread[0])
        out["reread_row_cache_hit"] = cache_hit(run["config"], reread[0])
    return out


def page_hit(config: str, window: dict[str, Any]) -> float | None:
    """The page cache's hit rate in a window (None with a row cache: its misses are reads, not faults)."""
    return None if config.startswith("rowcache") else window["page_hit"]


def cache_hit(config: str, window: dict[str, Any]) -> float | None:
    """The row cache's hit rate in a window: the daemon's counters, or for a same-host client (which copies
    hits itself and asks the daemon only for the rest) 1 - rows the daemon sent / distinct rows asked."""
    if config.endswith("samehost"):
        return 1 - window["served"] / window["distinct"] if window["distinct"] else None
    return window.get("row_cache_hit")


def ratio_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Row reads/s of one configuration over another's (means over their runs): warm, cold and whole runs."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_config.setdefault(run["config"], []).append(summarize(run))
    keys = ["warm_reads_per_s", "cold_reads_per_s", "reads_per_s"]
    header = "| ratio of row reads/s (means over runs) | warm | cold | whole run |"
    if all("reread_reads_per_s" in s for summaries in by_config.values() for s in summaries):
        keys.append("reread_reads_per_s")
        header += " re-read of the last window |"
    lines = [header, "|---|" + "---:|" * len(keys)]
    for a, b in (("rowcache", "pagecache"), ("rowcache", "dram"), ("rowcache-samehost", "rowcache"),
                 ("pagecache", "dram")):  # fmt: skip
        if a in by_config and b in by_config:
            cells = []
            for key in keys:
                mean = {c: float(np.mean([s[key] for s in by_config[c]])) for c in (a, b)}
                cells.append(f"{mean[a] / mean[b]:.2f}x")
            lines.append(f"| {a} / {b} | {' | '.join(cells)} |")
    return lines if len(lines) > 2 else []


def _reread_cell(s: dict[str, Any]) -> str:
    if "reread_reads_per_s" not in s:
        return "-"
    hit = s["reread_row_cache_hit"] if s["config"].startswith("rowcache") else s["reread_page_hit"]
    return f"{s['reread_reads_per_s'] / 1e6:.3f} M, {_fmt_rate(hit)}"


def _fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(report: dict[str, Any]) -> str:
    """The results page."""
    t = report["traffic"]
    lines = [
        "# The DRAM tier over a disk-resident table",
        "",
        "A table larger than the memory the daemon may use, served three ways to the same client replaying",
        "the same real traffic: plain mmap with the page cache under a cgroup-v1 memory limit (the page cache",
        "the daemon faults in counts against it), the daemon's row cache (`memstore serve --row-cache-bytes`)",
        "under the same limit, and the same table without a limit, read into the page cache first (all in",
        "DRAM). Script: `benchmarks/disk_tier.py` (its docstring has the details).",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; {report['date']}.",
        "",
        "## Set-up",
        "",
        f"- Table: {report['table']['rows']:,} rows of {report['table']['row_bytes']} bytes "
        f"({report['table']['bytes'] / 2**30:.2f} GiB, eager), {report['table']['describe']}.",
        f"- Traffic: {t['tokens']:,} tokens of {', '.join(t['files'])} ({t['steps']} steps of {t['step_tokens']:,} "
        f"tokens, one Lookup per layer per step); {t['reads']:,} row reads, {t['distinct_sent']:,} distinct per "
        f"step summed (what the client sends), {t['distinct']:,} distinct rows in all = "
        f"{t['distinct_bytes'] / 2**30:.2f} GiB, {t['distinct_bytes'] / report['limit']:.2f}x the "
        f"{report['limit'] / 2**30:.1f} GiB limit. A cache of any size misses every row's first read: it hits at most "
        f"{1 - t['distinct'] / t['distinct_sent']:.1%} of the rows the client sends (1 - distinct / sent).",
        f"- Limit: {report['limit'] / 2**30:.2f} GiB; row cache {report['row_cache_bytes'] / 2**30:.2f} GiB; "
        f"client: gRPC, {report['in_flight']} steps in flight, outside the group; daemon flags "
        f"`{' '.join(DAEMON_ARGS)}`.",
        "",
    ]
    if report.get("disk"):
        lines += ["The disk's random 4 KiB reads with O_DIRECT (no page cache), threads: reads/s:", ""]
        lines += ["| threads | reads/s | MB/s |", "|---:|---:|---:|"]
        lines += [f"| {d['threads']} | {d['rate']:,.0f} | {d['rate'] * 4096 / 1e6:,.0f} |" for d in report["disk"]]
        lines.append("")
    lines += ["## Results", "",
              "Row reads/s count a token's 24 reads per layer (duplicates included); cold is the first window "
              "(nothing cached), warm the last. Page-cache hit rate: 1 - the daemon's major faults / the distinct "
              "rows it served (an upper bound: rows sharing a 4 KiB page fault once).", "",
              "| run | config | steps | seconds | row reads/s (all) | cold row reads/s | warm row reads/s "
              "| warm tokens/s | cold / warm page hit | cold / warm row-cache hit "
              "| MiB read from disk per 1k distinct rows (warm) | re-read of the last window: row reads/s, hit |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for i, run in enumerate(report["runs"]):
        s = summarize(run)
        lines.append(
            f"| {i + 1} | {s['config']} | {s['steps']} | {s['seconds']:.0f} | {s['reads_per_s'] / 1e6:.3f} M "
            f"| {s['cold_reads_per_s'] / 1e6:.3f} M | {s['warm_reads_per_s'] / 1e6:.3f} M "
            f"| {s['warm_tokens_per_s']:,.0f} "
            f"| {_fmt_rate(s['cold_page_hit'])} / {_fmt_rate(s['warm_page_hit'])} "
            f"| {_fmt_rate(s['cold_row_cache_hit'])} / {_fmt_rate(s['warm_row_cache_hit'])} "
            f"| {s['warm_mib_read_per_kdistinct']:.2f} | {_reread_cell(s)} |"
        )
    lines += ["", *ratio_lines(report["runs"]), "", "Per window:", ""]
    for i, run in enumerate(report["runs"]):
        lines += [f"Run {i + 1}, {run['config']} (`{' '.join(run['daemon_args'])}`; "
                  f"{run['resident_at_start'] / 2**30:.2f} GiB of the table cached at the start):", "",
                  "| window | steps | seconds | row reads/s | tokens/s | distinct rows/s | major faults | MiB read "
                  "| page hit | row-cache hit | daemon CPU s | group cache / rss MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for w in run["windows"]:
            g = w.get("group")
            group = "-" if not g else f"{g['total_cache'] / 2**20:,.0f} / {g['total_rss'] / 2**20:,.0f}"
            lines.append(
                f"| {'re-read' if w.get('reread') else w['window'] + 1} "
                f"| {w['first_step']}-{w['first_step'] + w['steps'] - 1} | {w['seconds']:.1f} "
                f"| {w['reads_per_s'] / 1e6:.3f} M | {w['tokens_per_s']:,.0f} | {w['distinct_per_s'] / 1e6:.3f} M "
                f"| {w['majflt']:,} | {w['read_bytes'] / 2**20:,.0f} | {_fmt_rate(page_hit(run['config'], w))} "
                f"| {_fmt_rate(cache_hit(run['config'], w))} | {w['daemon_cpu_s']:.1f} "
                f"| {group} |"
            )
        lines.append("")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "bench-out" / "disk-tier",
                        help="where the table (16 GiB) and the streams are kept between runs")  # fmt: skip
    parser.add_argument("--text", type=Path, nargs="+", default=[REPO / "data" / "text" / "en"])
    parser.add_argument("--vocab", type=int, default=VOCAB, help="rows per order's head set (table size)")
    parser.add_argument("--limit", type=parse_bytes, default=parse_bytes("4G"), help="the daemon's memory limit")
    parser.add_argument("--row-cache-bytes", type=parse_bytes, default=parse_bytes("3.5G"))
    parser.add_argument("--configs", default="pagecache,rowcache,dram", help=f"comma-separated, in order, of {CONFIGS}")
    parser.add_argument("--repeat", type=int, default=1, help="run the limited configurations this many times, "
                        "interleaved (dram runs once, last)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens replayed (default: the fewest steps reaching twice --limit in distinct rows)",
    )
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=2, help="steps the client keeps outstanding")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop a run after the window passing this")
    parser.add_argument("--disk-seconds", type=float, default=0.0, help="seconds per thread count of the raw disk "
                        "measurement (0: skip)")  # fmt: skip
    parser.add_argument("--drop-caches", action="store_true", help="also echo 1 > /proc/sys/vm/drop_caches")
    parser.add_argument("--out", type=Path, default=None, help="write the results page here")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the runs already in --json (same "
        "table and traffic) and add this invocation's: runs of several invocations, one page",
    )
    parser.add_argument("--reread", action="store_true", help="after the pass, replay its last window again")
    parser.add_argument("--render-only", action="store_true", help="write --out from the runs in --json, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Make or reuse the table and the traffic, run the configurations, print and write the results."""
    args = _parser().parse_args(argv)
    if args.render_only:
        if not (args.json and args.json.exists() and args.out):
            raise SystemExit("--render-only needs an existing --json and --out")
        args.out.write_text(markdown(json.loads(args.json.read_text())) + "\n")
        return 0
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown --configs {sorted(unknown)}; choose from {CONFIGS}")
    layout = scaled_layout(args.vocab)
    row_bytes = DTYPE.row_bytes(layout.dim)
    table = args.work / "table"
    manifest = ensure_table(table, layout)
    meta = ensure_streams(args.text, layout, row_bytes, args.work / "streams")
    heads = (layout.max_ngram - 1) * layout.heads_per_ngram
    streams = {layer: np.memmap(args.work / "streams" / meta["streams"][str(layer)], dtype="<u4", mode="r")
               .reshape(-1, heads) for layer in layout.layer_ids}  # fmt: skip
    full = Traffic(streams, args.batch * args.seq, {layer: layout.num_rows(layer) for layer in layout.layer_ids})
    if args.tokens is not None:
        full = full.truncated(args.tokens // full.step_tokens)
    cumulative, per_step = full.distinct_growth()
    target = -(-2 * args.limit // row_bytes)
    steps = full.steps if args.tokens is not None else steps_reaching(cumulative, target)
    if steps is None or steps == 0:
        raise SystemExit(f"the text's {cumulative[-1]:,} distinct rows do not reach twice the limit ({target:,}): "
                         "give more text (--text) or a smaller --limit")  # fmt: skip
    work = full.truncated(steps)
    distinct = int(cumulative[steps - 1])
    check = "OK" if distinct >= target else "SHORT"
    print(f"table {table}: {layout.total_rows:,} rows x {row_bytes} B = {manifest.total_bytes / 2**30:.2f} GiB\n"
          f"traffic: {steps} steps x {work.step_tokens} tokens = {steps * work.step_tokens:,} tokens; distinct rows "
          f"{distinct:,} = {distinct * row_bytes / 2**30:.2f} GiB vs. twice the limit "
          f"{2 * args.limit / 2**30:.2f} GiB: "
          f"{check}", flush=True)  # fmt: skip
    report: dict[str, Any] = {
        "command": "python -m benchmarks.disk_tier " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Linux {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "table": {"rows": layout.total_rows, "row_bytes": row_bytes, "bytes": manifest.total_bytes,
                  "describe": f"layers {list(layout.layer_ids)}, orders 2..{layout.max_ngram} x "
                  f"{layout.heads_per_ngram} heads, {args.vocab:,} rows per order's head set, {DTYPE.value} dim "
                  f"{layout.dim}"},
        "traffic": {"tokens": steps * work.step_tokens, "steps": steps, "step_tokens": work.step_tokens,
                    "files": [Path(p).name for p in meta["files"]],
                    "reads": steps * work.step_tokens * heads * len(streams),
                    "distinct_sent": int(per_step[:steps].sum()), "distinct": distinct,
                    "distinct_bytes": distinct * row_bytes, "enough": check == "OK"},
        "limit": args.limit, "row_cache_bytes": args.row_cache_bytes, "in_flight": args.in_flight, "runs": [],
    }  # fmt: skip
    if args.keep and args.json and args.json.exists():
        kept = json.loads(args.json.read_text())
        if kept["traffic"] != report["traffic"] or kept["table"] != report["table"] or kept["limit"] != args.limit:
            raise SystemExit(f"{args.json} holds runs of another table, traffic or limit: not mixing them")
        report["runs"] = kept["runs"]
        report["command"] = kept["command"] + "; then " + report["command"]
        report["disk"] = kept.get("disk")
    if args.disk_seconds > 0:
        drop_table_cache(table, False)
        layer_file = table / manifest.layer_file(layout.layer_ids[0])
        report["disk"] = []
        for threads in (1, 4, 16, 32):
            rate = raw_disk_rate(layer_file, threads, args.disk_seconds)
            report["disk"].append({"threads": threads, "rate": rate})
            print(f"disk: {threads} threads, {rate:,.0f} random 4 KiB O_DIRECT reads/s", flush=True)
    order = [c for _ in range(args.repeat) for c in configs if c != "dram"] + (["dram"] if "dram" in configs else [])
    for name in order:
        print(f"--- {name}", flush=True)
        run = run_config(name, args, table, work, per_step)
        report["runs"].append(run)
        s = summarize(run)
        print(f"{name}: {s['reads_per_s'] / 1e6:.3f} M row reads/s over {s['seconds']:.0f} s; cold "
              f"{s['cold_reads_per_s'] / 1e6:.3f} M, warm {s['warm_reads_per_s'] / 1e6:.3f} M", flush=True)  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    page = markdown(report)
    print(page)
    if args.out:
        args.out.write_text(page + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
