"""The device cache on real traffic: hit rate per policy and size, store rows and bytes per token, step time.

    python -m benchmarks.device_cache [--en DIR] [--zh DIR] [--max-tokens 524288] [--work bench-out/device_cache]
                                      [--out docs/results/cache.md] [--baseline OTHER/report.json]
    python -m benchmarks.device_cache --render bench-out/device_cache/report.json --out PAGE [--baseline ...]

For each language, `model.traffic` writes the row-id streams of the text's first --max-tokens tokens
(DeepSeek-V4's tokenizer, the DeepSeek-V4.1-Flash layout); layer 1's stream is cut into steps of
--batch x --seq tokens and replayed through `client.cache.DeviceCache` on the CPU (one layer: the
layers of the layout differ only in their hash constants) for every policy and cache size. The store
behind it is an in-process reader that makes each row's 264 bytes from its id, and its time is left
out of the step time: the step time is the cache's own lookup, fill and assembly (the thread's CPU time,
and the wall time). --baseline puts the step times of another run (say, of another version of
`client.cache`) beside this run's, and checks that both made the same decisions; --render writes the
page from a saved report.json without replaying.

Beside each hit rate: `model.cache_sim`'s per-access LRU and OPT (Belady's MIN with bypass) of a cache
of the same size, and the ceiling, the hit rate of an infinite cache (1 - first touches / accesses).
The static hot set is the most read rows of the first quarter of the stream (a profiling pass); it
is replayed over the whole stream like the others, so its first quarter is a profile it has seen.
A cache larger than the rows the slice touches never evicts: such sizes are run at the number of
distinct rows (the same hits, without allocating rows that would stay empty) and marked so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.cache import CacheConfig, CachePolicy, DeviceCache
from memstore.dtypes import DType
from memstore.layout import EngramLayout
from memstore.tabledir.manifest import Manifest
from model import cache_sim, traffic

LANGUAGES = {"en": "English", "zh": "Chinese"}
FRACTIONS = (1e-4, 1e-3, 1e-2, 1e-1)
LAYER = 1


def hot_rows_from_stream(path: Path, accesses: int, rows: int) -> np.ndarray:
    """The `rows` most read row ids (int64) of the first `accesses` entries of a model.traffic stream file."""
    ids = np.fromfile(path, dtype="<u4", count=accesses)
    uniq, counts = np.unique(ids, return_counts=True)
    top = np.argsort(-counts, kind="stable")[:rows]
    return uniq[top].astype(np.int64)


class _SyntheticStore:
    """Rows made from their ids (every byte depends on the id): a store whose cost is left out of the timing."""

    def __init__(self, width: int) -> None:
        self.offsets = np.arange(width, dtype=np.int64)
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def fetch(self, ids: np.ndarray) -> torch.Tensor:
        start, cpu = time.perf_counter(), time.thread_time()
        rows = ((ids[:, None] * 0x9E3779B1 + self.offsets) >> 7).astype(np.uint8)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.thread_time() - cpu
        return torch.from_numpy(rows)


def _replay(stream: np.ndarray, manifest: Manifest, config: CacheConfig, step_accesses: int) -> dict[str, Any]:
    cache = DeviceCache(manifest, config)
    store = _SyntheticStore(cache.width)
    distinct_without = 0
    step_s, step_cpu = [], []
    for start in range(0, len(stream), step_accesses):
        ids = stream[start : start + step_accesses]
        fetch_before, fetch_cpu = store.seconds, store.cpu_seconds
        begin, cpu = time.perf_counter(), time.thread_time()
        cache.lookup(LAYER, ids, store.fetch)
        step_cpu.append(time.thread_time() - cpu - (store.cpu_seconds - fetch_cpu))
        step_s.append(time.perf_counter() - begin - (store.seconds - fetch_before))
        distinct_without += len(np.unique(ids))
    stats = cache.stats
    return {
        "hit_rate": stats.hit_rate,
        "rows_fetched": stats.rows_fetched,
        "rows_without": distinct_without,
        "admitted": stats.admitted,
        "evicted": stats.evicted,
        "rejected": stats.rejected,
        "step_ms_median": float(np.median(step_s) * 1e3),
        "step_ms_p90": float(np.percentile(step_s, 90) * 1e3),
        # CPU time of the (one) thread: what the step costs, without the time it waited for a shared core.
        "step_cpu_ms_median": float(np.median(step_cpu) * 1e3),
        "step_cpu_ms_p90": float(np.percentile(step_cpu, 90) * 1e3),
        "memory_bytes": cache.memory_bytes() // len(cache.layers),
    }


def _language(lang: str, text: Path, args: argparse.Namespace) -> dict[str, Any]:
    layout, row_bytes = traffic.PRESETS["v4.1-flash"]
    directory = args.work / lang
    directory.mkdir(parents=True, exist_ok=True)
    config = traffic.TrafficConfig(texts=(text,), layout=layout, row_bytes=row_bytes, max_tokens=args.max_tokens,
                                   progress=False)  # fmt: skip
    meta = traffic.write_streams(config, directory)
    tokens = meta["tokens"]
    heads = (layout.max_ngram - 1) * layout.heads_per_ngram
    path = directory / meta["streams"][str(LAYER)]
    stream = np.fromfile(path, dtype="<u4").astype(np.int64)
    n = len(stream)
    num_rows = layout.num_rows(LAYER)
    shape = cache_sim.StreamShape(num_rows, heads, layout.heads_per_ngram)
    distinct = len(np.unique(stream))
    sizes = [max(1, min(int(f * num_rows), distinct)) for f in args.fractions]
    lru = cache_sim.lru_pass(path, n, shape, np.array(sorted(set(sizes))))
    lru_hits = dict(zip(sorted(set(sizes)), lru.hits.sum(axis=0).tolist(), strict=True))
    ceiling = 1 - lru.compulsory.sum() / n
    with tempfile.TemporaryDirectory() as tmp:
        nexts = Path(tmp) / "nexts.u32"
        cache_sim.next_use_pass(path, n, shape, nexts)
        opt = {s: int(cache_sim.simulate(cache_sim.Policy.OPT, path, n, shape, s, nexts).sum()) for s in set(sizes)}
    manifest = Manifest(layout=EngramLayout((LAYER,), layout.vocab_size_per_ngram, layout.max_ngram,
                                            layout.heads_per_ngram, row_bytes), dtype=DType.BYTES,
                        seed=0)  # fmt: skip  # opaque rows of the preset's 264 bytes (fp8 values and their scales)
    step_accesses = args.batch * args.seq * heads
    results = []
    for fraction, size in zip(args.fractions, sizes, strict=True):
        for policy in CachePolicy:
            hot = None
            if policy is CachePolicy.STATIC:
                hot = {LAYER: hot_rows_from_stream(path, n // 4, size)}
            cfg = CacheConfig(policy=policy, max_rows=size, hot_rows=hot)
            t0 = time.perf_counter()
            result = _replay(stream, manifest, cfg, step_accesses)
            result.update(fraction=fraction, rows=size, capped=size < int(fraction * num_rows), policy=policy.value,
                          lru_per_access=lru_hits[size] / n, opt=opt[size] / n, seconds=time.perf_counter() - t0,
                          no_fetch=1 - result["rows_fetched"] / n)  # fmt: skip
            print(f"{lang} {fraction:.2%} ({size:,} rows) {policy.value:8s} hit {result['hit_rate']:.1%} "
                  f"(per-access LRU {result['lru_per_access']:.1%}, OPT {result['opt']:.1%}, ceiling {ceiling:.1%}) "
                  f"rows/token {result['rows_fetched'] / tokens:.2f} vs {result['rows_without'] / tokens:.2f}; "
                  f"step {result['step_cpu_ms_median']:.1f} ms CPU, {result['step_ms_median']:.1f} ms wall",
                  flush=True)  # fmt: skip
            results.append(result)
    return {"tokens": tokens, "accesses": n, "distinct": distinct, "ceiling": ceiling, "num_rows": num_rows,
            "row_bytes": row_bytes, "step_tokens": args.batch * args.seq, "results": results}  # fmt: skip


def _markdown(report: dict[str, Any], command: str, rendered: str | None = None) -> str:
    lines = [
        "# The device cache on real traffic",
        "",
        "A row cache per Engram layer in the client process (`client.cache`, `PrefetchConfig(cache=...)`):",
        "a step's distinct row ids are looked up in it, only its misses go to the store, and it assembles",
        "the step's rows on its device. Here it replays the row-id streams of real text (DeepSeek-V4's",
        "tokenizer, the DeepSeek-V4.1-Flash layout: 384M rows of 264 bytes per layer, 24 rows per token)",
        f"on the CPU, in steps of {report['batch']} x {report['seq']} tokens, layer {LAYER}. Each policy's",
        "hit rate (accesses served by rows resident at the start of the step) stands beside the per-access",
        "LRU and the offline optimum (OPT, Belady's MIN with bypass) of `model.cache_sim` at the same size,",
        "and the ceiling: the hit rate of an infinite cache. The static hot set holds the most read rows",
        "of the stream's first quarter (a profiling pass over text it is then replayed on).",
        "",
        "Hit rate counts an access (one of a token's 24 row reads) served by a row resident at the start",
        "of its step. A row read twice in one step is fetched once whether cached or not, so 'reads without",
        "a fetch' (1 - rows fetched / reads) is what compares with the per-access LRU and OPT, which count",
        "every re-read as a hit. 'Distinct rows hit' is the share of the steps' distinct rows the cache",
        "served: the store's rows saved.",
        "",
        "Rows and bytes per token are what the store sends: without the cache, a step's distinct rows",
        "(the client deduplicates a step's ids either way); with it, the step's distinct misses.",
        "Step time: the cache's lookup, fill and assembly of one step on the CPU (the store's time excluded),",
        "median and 90th percentile of the thread's CPU time (one thread; the machine's cores are shared, and",
        "CPU time leaves out the waits for a core that wall time would count).",
        "",
        f"Command: `{command}`" + (f"; this page: `{rendered}`" if rendered else ""),
        "",
        f"Machine: {report['machine']}; {report['date']}.",
        "",
    ]
    for lang, data in report["languages"].items():
        lines += [
            f"## {LANGUAGES[lang]}: {data['tokens']:,} tokens, {data['accesses']:,} accesses, "
            f"{data['distinct']:,} distinct rows; ceiling {data['ceiling']:.1%}",
            "",
            "| cache (of 384M rows) | rows | memory | policy | hit rate | reads without a fetch | distinct rows hit "
            "| per-access LRU | OPT | rows / token (without : with) | bytes / token (without : with) "
            "| step CPU ms (median / p90) |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in data["results"]:
            tokens = data["tokens"]
            capped = " (all rows touched)" if r["capped"] else ""
            lines.append(
                f"| {r['fraction']:.2%}{capped} | {r['rows']:,} | {r['memory_bytes'] / 2**20:,.0f} MiB | {r['policy']} "
                f"| {r['hit_rate']:.1%} | {r['no_fetch']:.1%} "
                f"| {1 - r['rows_fetched'] / r['rows_without']:.1%} | {r['lru_per_access']:.1%} | {r['opt']:.1%} "
                f"| {r['rows_without'] / tokens:.2f} : {r['rows_fetched'] / tokens:.2f} "
                f"| {r['rows_without'] * data['row_bytes'] / tokens:,.0f} : "
                f"{r['rows_fetched'] * data['row_bytes'] / tokens:,.0f} "
                f"| {r['step_cpu_ms_median']:.1f} / {r['step_cpu_ms_p90']:.1f} |"
            )
        lines.append("")
    if report.get("baseline"):
        lines += _cost_section(report)
    return "\n".join(lines)


_SAME = ("hit_rate", "rows_fetched", "admitted", "evicted", "rejected")


def _cost_section(report: dict[str, Any]) -> list[str]:
    """Step time beside the baseline report's (an earlier version of the cache on the same streams and sizes)."""
    base = report["baseline"]
    lines = [
        "## Step cost against the baseline",
        "",
        f"Baseline: {base['label']} (machine: {base['machine']}; {base['date']}; command: "
        f"`{base.get('command', 'not recorded')}`).",
        f"The cache's lookup, fill and assembly per {report['batch'] * report['seq']:,}-token step of one layer:",
        "CPU time (median / p90 over the run's steps) and wall time (median). 'Same decisions': both runs hit,",
        "fetched, admitted, evicted and rejected exactly as many rows.",
        "",
    ]
    for lang, data in report["languages"].items():
        before = {(r["fraction"], r["policy"]): r for r in base["languages"].get(lang, {}).get("results", [])}
        if not before:
            continue
        lines += [
            f"### {LANGUAGES[lang]}",
            "",
            "| cache (of 384M rows) | rows | policy | baseline CPU ms | this run CPU ms | speed-up (CPU medians) "
            "| wall ms (baseline : this run) | same decisions |",
            "|---|---:|---|---:|---:|---:|---:|---|",
        ]
        for r in data["results"]:
            b = before.get((r["fraction"], r["policy"]))
            if b is None or b["rows"] != r["rows"]:
                continue
            same = "yes" if all(b[k] == r[k] for k in _SAME) else "**no**"
            lines.append(
                f"| {r['fraction']:.2%}{' (all rows touched)' if r['capped'] else ''} | {r['rows']:,} | {r['policy']} "
                f"| {b['step_cpu_ms_median']:.1f} / {b['step_cpu_ms_p90']:.1f} "
                f"| {r['step_cpu_ms_median']:.1f} / {r['step_cpu_ms_p90']:.1f} "
                f"| {b['step_cpu_ms_median'] / r['step_cpu_ms_median']:.1f}x "
                f"| {b['step_ms_median']:.1f} : {r['step_ms_median']:.1f} | {same} |"
            )
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the replay for each language and write the results page."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--en", type=Path, default=Path("data/text/en"), help="English text (file or directory)")
    parser.add_argument("--zh", type=Path, default=Path("data/text/zh"), help="Chinese text (file or directory)")
    parser.add_argument("--max-tokens", type=int, default=1 << 19, help="tokens of each text (default 524288)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--fractions", type=lambda t: tuple(float(x) for x in t.split(",")), default=FRACTIONS,
                        help="cache sizes as fractions of a layer's rows")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("bench-out/device_cache"), help="stream files go here")
    parser.add_argument("--out", type=Path, help="write the results page (markdown) here")
    baseline_help = ("report.json of an earlier run (another version of the cache, same text and sizes): the page "
                     "adds its step times beside this run's and checks that the decisions are the same")  # fmt: skip
    parser.add_argument("--baseline", type=Path, help=baseline_help)
    parser.add_argument("--baseline-label", default="an earlier run", help="what the baseline ran (for the page)")
    parser.add_argument("--languages", type=lambda t: tuple(t.split(",")), default=tuple(LANGUAGES),
                        help="which texts to replay (default en,zh)")  # fmt: skip
    parser.add_argument("--render", type=Path, help="no replay: write the page (--out) from this run's report.json")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.device_cache " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.render:
        report = json.loads(args.render.read_text())
        _add_baseline(report, args)
        if args.out:
            args.out.write_text(_markdown(report, report.get("command", "(not recorded)"), command.strip()))
        return 0
    torch.set_num_threads(1)  # one core, as a prefetch worker has; the machine's cores are shared
    report: dict[str, Any] = {
        "command": command.strip(),
        "batch": args.batch,
        "seq": args.seq,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"Python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "languages": {},
    }
    unknown = set(args.languages) - set(LANGUAGES)
    if unknown:
        parser.error(f"--languages: {sorted(unknown)} not among {sorted(LANGUAGES)}")
    for lang in args.languages:
        report["languages"][lang] = _language(lang, getattr(args, lang), args)
    _add_baseline(report, args)
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(_markdown(report, command.strip()))
    return 0


def _add_baseline(report: dict[str, Any], args: argparse.Namespace) -> None:
    if args.baseline:
        report["baseline"] = json.loads(args.baseline.read_text()) | {"label": args.baseline_label}
        report["baseline"].pop("baseline", None)


if __name__ == "__main__":
    raise SystemExit(main())
