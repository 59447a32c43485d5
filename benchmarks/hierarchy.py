"""The Engram LM training and generating through the cache hierarchy, side by side in one run.

    python -m benchmarks.hierarchy [--text data/text/en] [--steps 30] [--cache-fractions 0.01,0.1]
                                   [--device auto] [--out docs/results/hierarchy.md]

Real text (DeepSeek-V4's tokenizer, model/textdata.py; scripts/get_text.sh writes data/text) and the
LM at the demo's sizes, its Engram table (float16) frozen: served by a daemon without an optimizer,
so every tier may cache it. The variants read the same rows in the same steps, from the same
initial weights:

- in-process:           the table mapped in the training process (TableFetcher behind the prefetcher);
- daemon:               a `memstore serve` child process over gRPC (the same-host path switched off);
- daemon + device F:    the same, with the client's device cache (client/cache.py) holding a fraction
                        F of each layer's rows on the model's device: only its misses are fetched;
- daemon row cache:     when the daemon has a row cache (`memstore serve --row-cache-bytes`), a second
                        daemon with one, with and without the device cache.

Training: `--steps` steps of batch x 128 tokens, rows prefetched one step ahead, the backbone
trained (the table is frozen); step time, tokens/s and the exposed stall (the model's wait for
rows) come from model.train's TrainResult. Generation: the in-process variant's trained model
decodes `--gen-batch` prompts of real validation text, each position's rows fetched once; the
tokens must be the same in every variant (checked).

Rows and bytes per token: "looked up" is what the model reads (layers x heads rows a token, repeats
included); "from the store" is what the daemon served (its memstore_rows_served_total and
memstore_bytes_served_total, read through the Stats RPC before and after each variant; in process,
the rows gathered from the mapped table); "to the device" is what the prefetcher copies into the
model's row buffers: every looked-up row without the device cache, its distinct misses with it
(on CUDA these are the host-to-device bytes of the rows). Hit rates per tier: the device cache's
share of row reads it served; the daemon row cache's from the daemon's metrics when it has one.

`--device cuda` runs the same code on a GPU (benchmarks/hierarchy_gpu.sh is the prepared run).
The machine is shared and noisy: compare variants measured side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO, ensure_table
from client import CacheConfig, CachePolicy, ClientConfig, MemstoreClient, PrefetchConfig, Prefetcher, TableFetcher
from memstore.cli_args import enum_choice, parse_bytes
from memstore.dtypes import DType
from memstore.launch import start_daemon, stop_daemon
from memstore.table import Table
from model.compression import CompressedTokenizer
from model.data import DataConfig, PreparedData, TextConfig, prepare_data
from model.device import add_device_argument
from model.lm import EngramLM, LMConfig
from model.sources import MappedTable
from model.tiers import daemon_counters
from model.train import TrainConfig, TrainResult, train

DEVICE = torch.device("cpu")  # set by --device


@dataclass(frozen=True)
class Variant:
    """One way of reading the table: where from, and with which device cache."""

    name: str
    store: str  # "in-process", "daemon" or "daemon-rowcache"
    cache: CacheConfig | None = None
    fraction: float = 0.0  # the device cache's share of a layer's rows


@dataclass
class Measured:
    """One variant's run: time, and the rows it read per tier."""

    seconds: list[float] = field(default_factory=list)  # per step (training) or per generated token, per round
    stall_share: list[float] = field(default_factory=list)  # exposed stall over the run's time, per round
    tokens: int = 0  # tokens whose rows were looked up
    rows_looked_up: int = 0
    rows_from_store: float = 0.0
    bytes_from_store: float = 0.0
    bytes_to_device: int = 0
    device_hits: int = 0
    device_reads: int = 0
    daemon_hits: float | None = None  # the daemon's row cache, when it has one
    daemon_reads: float | None = None
    output: list[list[int]] | None = None  # generated tokens


class _Daemons:
    """The daemons behind the variants (a `memstore serve` child each) and a gRPC client of each. A row-cache
    daemon is restarted before each of its runs, so every variant starts with an empty row cache instead of
    one warmed by the variant before it (they read the same rows)."""

    def __init__(self, table_path: Path, row_cache_bytes: int | None, layer: int) -> None:
        self.table_path = table_path
        self.layer = layer
        self.flags = {"daemon": []}
        if row_cache_bytes is not None:
            self.flags["daemon-rowcache"] = ["--row-cache-bytes", str(row_cache_bytes)]
        self.processes: dict[str, subprocess.Popen] = {}
        self.clients: dict[str, MemstoreClient] = {}
        try:
            for store in self.flags:
                self._start(store)
        except BaseException:
            self.close()
            raise

    def _start(self, store: str) -> None:
        process, address = start_daemon(self.table_path, self.flags[store])
        self.processes[store] = process
        self.clients[store] = MemstoreClient(address, ClientConfig(same_host=False))
        self.clients[store].lookup(self.layer, np.arange(8))  # connect before timing

    def cold(self, store: str) -> None:
        """Restart a daemon: its row cache empty."""
        self.clients.pop(store).close()
        stop_daemon(self.processes.pop(store))
        self._start(store)

    def close(self) -> None:
        for store in list(self.processes):
            client = self.clients.pop(store, None)
            if client is not None:
                client.close()
            stop_daemon(self.processes.pop(store))


def _model(lm_config: LMConfig, data: PreparedData, table: Table) -> EngramLM:
    """The LM from the same initial weights every time; its own tables read in process (evaluation only:
    training and generation get every row through the prefetcher under test)."""
    torch.manual_seed(0)
    tables = {layer: MappedTable(table, layer) for layer in lm_config.engram.layer_ids}
    return EngramLM(lm_config, CompressedTokenizer(data.tokenizer), data.pad_id, tables).to(DEVICE)


def _prefetcher(variant: Variant, table: Table, clients: dict[str, MemstoreClient], model: EngramLM) -> Prefetcher:
    fetcher = TableFetcher(table) if variant.store == "in-process" else clients[variant.store]
    config = PrefetchConfig(device=str(DEVICE), cache=variant.cache)
    return Prefetcher(fetcher, model.row_ids, model.config.engram.layer_ids, config)


def _account(m: Measured, prefetcher: Prefetcher, before: dict, after: dict, row_bytes: int, rows_per_token: int
             ) -> None:  # fmt: skip
    """Rows and bytes per tier of one run, into `m` (counters are the same every round: the first one's kept)."""
    if m.tokens:
        return
    stats = prefetcher.stats
    m.rows_looked_up = stats.rows
    m.tokens = stats.rows // rows_per_token
    tier = stats.cache
    if tier is not None:
        m.device_hits, m.device_reads = tier.hits, tier.hits + tier.misses
        m.bytes_to_device = tier.bytes_fetched
    else:
        m.bytes_to_device = stats.rows * row_bytes
    if before:
        m.rows_from_store = after["rows"] - before["rows"]
        m.bytes_from_store = after["bytes"] - before["bytes"]
        if "hits" in after:
            m.daemon_hits = after["hits"] - before.get("hits", 0.0)
            m.daemon_reads = m.daemon_hits + after.get("misses", 0.0) - before.get("misses", 0.0)
    else:  # in process: the mapped table gathers every row asked for (the device cache's misses with one)
        m.rows_from_store = tier.rows_fetched if tier is not None else stats.rows
        m.bytes_from_store = m.rows_from_store * row_bytes


def _train_variant(variant: Variant, m: Measured, ctx: dict[str, Any], config: TrainConfig) -> EngramLM:
    if variant.store == "daemon-rowcache":
        ctx["daemons"].cold(variant.store)
    model = _model(ctx["lm_config"], ctx["data"], ctx["table"])
    client = ctx["clients"].get(variant.store)
    before = daemon_counters(client)
    with _prefetcher(variant, ctx["table"], ctx["clients"], model) as prefetcher:
        result: TrainResult = train(model, ctx["data"], config, progress=False, prefetcher=prefetcher)
    _account(m, prefetcher, before, daemon_counters(client), ctx["row_bytes"], ctx["rows_per_token"])
    m.seconds.append(result.train_seconds / config.steps)
    m.stall_share.append(result.stall_share)
    return model


def _generate_variant(variant: Variant, m: Measured, ctx: dict[str, Any], model: EngramLM, prompts, new: int) -> None:
    """Requests (prompts [R, B, T0]) decoded one after another through one prefetcher, as a server would."""
    if variant.store == "daemon-rowcache":
        ctx["daemons"].cold(variant.store)
    client = ctx["clients"].get(variant.store)
    before = daemon_counters(client)
    with _prefetcher(variant, ctx["table"], ctx["clients"], model) as prefetcher:
        torch.manual_seed(0)
        start = time.perf_counter()
        outs = [model.generate(request, new, prefetcher=prefetcher) for request in prompts]
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)  # the last token's kernels are part of its time
        elapsed = time.perf_counter() - start
    _account(m, prefetcher, before, daemon_counters(client), ctx["row_bytes"], ctx["rows_per_token"])
    m.seconds.append(elapsed / (new * prompts.shape[0] * prompts.shape[1]))
    m.stall_share.append(prefetcher.stats.total_stall_s / elapsed)
    tokens = [out.cpu().tolist() for out in outs]
    if m.output is None:
        m.output = tokens
    elif m.output != tokens:
        raise AssertionError(f"{variant.name}: generation differed between rounds")


def _row_cache_supported() -> bool:
    """Whether this build's daemon has a row cache (`memstore serve --row-cache-bytes`)."""
    text = subprocess.run(
        [sys.executable, "-m", "memstore", "serve", "--help"], capture_output=True, text=True, check=False
    ).stdout
    return "--row-cache-bytes" in text


def _variants(args: argparse.Namespace, layer_rows: int, row_cache: bool) -> list[Variant]:
    def cache(fraction: float) -> CacheConfig:
        return CacheConfig(policy=args.policy, max_rows=max(1, round(fraction * layer_rows)))

    variants = [Variant("in-process", "in-process"), Variant("daemon", "daemon")]
    variants += [Variant(f"daemon + device {f:.0%}", "daemon", cache(f), f) for f in args.cache_fractions]
    if row_cache:
        variants.append(Variant("daemon row cache", "daemon-rowcache"))
        f = args.cache_fractions[-1]
        variants.append(Variant(f"daemon row cache + device {f:.0%}", "daemon-rowcache", cache(f), f))
    return variants


def _rounds(variants: list[Variant], rounds: int, run, warm_up) -> dict[str, Measured]:
    """Each variant once per round, alternating (reversed every other round) on the noisy machine, after a
    short unmeasured run of each (threads started, buffers allocated, the daemon's pages touched)."""
    for variant in variants:
        warm_up(variant, Measured())
    measured = {v.name: Measured() for v in variants}
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else list(reversed(variants)):
            print(f"  round {r + 1}: {variant.name}", flush=True)
            run(variant, measured[variant.name])
    return measured


def _rows(phase: str, variants: list[Variant], measured: dict[str, Measured], tokens_per_unit: int) -> list[dict]:
    base = statistics.median(measured["in-process"].seconds)
    out = []
    for v in variants:
        m = measured[v.name]
        seconds = statistics.median(m.seconds)
        out.append(
            {
                "phase": phase,
                "variant": v.name,
                "store": v.store,
                "device_cache_fraction": v.fraction,
                "device_cache_rows": v.cache.max_rows if v.cache else 0,
                "seconds": seconds,
                "tokens_per_s": tokens_per_unit / seconds,
                "time_ratio_to_in_process": seconds / base,
                "stall_share": statistics.median(m.stall_share),
                "tokens": m.tokens,
                "rows_looked_up_per_token": m.rows_looked_up / m.tokens,
                "rows_from_store_per_token": m.rows_from_store / m.tokens,
                "bytes_from_store_per_token": m.bytes_from_store / m.tokens,
                "bytes_to_device_per_token": m.bytes_to_device / m.tokens,
                "device_hit_rate": m.device_hits / m.device_reads if m.device_reads else None,
                "daemon_hit_rate": m.daemon_hits / m.daemon_reads if m.daemon_reads else None,
            }
        )
    return out


def _markdown(report: dict[str, Any], command: str) -> str:
    s = report["setup"]
    lines = [
        "# The Engram LM through the cache hierarchy",
        "",
        "The small Engram LM (the demo's sizes) on real text with DeepSeek-V4's tokenizer, training and",
        "generating with its table (float16, frozen) read in process, from a daemon over gRPC, and from the",
        "daemon with the client's device cache in front (`--cache-rows` on `model.train` and",
        "`model.generate`; `PrefetchConfig(cache=...)`). All variants run in one process, one after",
        "another, from the same initial weights on the same batches. `benchmarks/hierarchy.py` says",
        "exactly what each column counts; in short:",
        "",
        "- *looked up*: the rows the model reads, layers x heads a token, repeats included;",
        "- *from the store*: the rows and bytes the daemon served (its Prometheus counters, read through",
        "  the Stats RPC before and after each variant); in process, the rows gathered from the mapped table;",
        "- *to the device*: what the prefetcher copies into the model's row buffers: every looked-up row",
        "  without the device cache, its distinct misses with it (on a GPU: the rows' host-to-device bytes);",
        "- *device hit rate*: the share of row reads the device cache served from rows it held when the",
        "  step began;",
        "- *stall*: the exposed wait for rows (the training steps': TrainResult.stall_seconds) as a share of",
        "  the training or generation time.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {report['machine']}; {report['date']}. Compare the variants of one run"
        + (", and read the timings as noisy: the machine is shared." if "cpu" in report["machine"] else "."),
        "",
        f"Setup: {s['text']}, {s['train_tokens']:,} training tokens; LM d_model {s['d_model']}, {s['n_layers']} "
        f"blocks, Engram at layers {s['engram_layers']} with {s['rows_per_token']} rows a token; table "
        f"{s['layer_rows']:,} rows of {s['row_bytes']} B per layer; device cache policy {s['policy']}; "
        f"training {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens; generation "
        f"{s['gen_requests']} requests of {s['gen_batch']} prompts of {s['prompt_tokens']} tokens + "
        f"{s['gen_tokens']} new, one after another; "
        f"{s['rounds']} round(s), median time.",
        "",
    ]
    for phase, unit in (("train", "step ms"), ("generate", "µs / new token")):
        rows = [r for r in report["rows"] if r["phase"] == phase]
        lines += [
            f"## {'Training' if phase == 'train' else 'Generation'}",
            "",
            f"| variant | {unit} | tokens/s | time vs. in-process | stall | rows / token: looked up, from the store "
            "| bytes / token from the store | bytes / token to the device | device hit rate "
            "| daemon row-cache hit rate |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            scale = 1e3 if phase == "train" else 1e6
            device = "-" if r["device_hit_rate"] is None else f"{r['device_hit_rate']:.1%}"
            daemon = "-" if r["daemon_hit_rate"] is None else f"{r['daemon_hit_rate']:.1%}"
            lines.append(
                f"| {r['variant']} | {r['seconds'] * scale:,.1f} | {r['tokens_per_s']:,.0f} "
                f"| {r['time_ratio_to_in_process']:.2f}x | {r['stall_share']:.1%} "
                f"| {r['rows_looked_up_per_token']:.1f}, {r['rows_from_store_per_token']:.2f} "
                f"| {r['bytes_from_store_per_token']:,.0f} | {r['bytes_to_device_per_token']:,.0f} "
                f"| {device} | {daemon} |"
            )
        lines.append("")
    lines += [f"Generated tokens identical in every variant: {'yes' if report['same_tokens'] else 'NO'}.", ""]
    lines += _summary(report["rows"])
    lines += [
        "Reading these figures:",
        "",
        "- The stall column is small: the prefetcher fetches a step's rows while the step before it",
        "  computes, so on the CPU a tier changes the step time mostly through the CPU it takes from the",
        "  model (the daemon and the cache run on the same 2 cores) and through the noise of other jobs.",
        "  Bytes and hit rates are counts, the same in every round; times are medians of noisy runs.",
        "- The daemon's row cache is part of the store: it changes what the daemon reads from the table's",
        "  files, not the bytes it sends, so 'from the store' does not move with it. This table (about 20 MB)",
        "  sits in the page cache whatever the row cache does; the row cache's worth is a table larger than",
        "  RAM (the disk-resident table's page).",
        "- Behind the device cache the daemon's row cache sees only the device cache's misses: the rows",
        "  read once (cold) and the long tail. Its hit rate there is what it adds to the hierarchy; it is",
        "  small when the device cache holds more rows than the row cache's budget, as here.",
        "- Each run starts cold and reads tens of thousands of tokens, so the hit rates are those of short",
        "  runs on a small table; `benchmarks/device_cache.py` replays 524,288 tokens of",
        "  real text on the DeepSeek-V4.1-Flash layout for the hit rate per policy and size.",
        "- The table here is frozen (the backbone trains). Training a trainable table through the device",
        "  cache, which then follows the pushes (`--cache-max-lag`), is measured in",
        "  [cache.md](cache.md#training-through-the-device-cache-coherence) (`benchmarks/cache_coherence.py`).",
        "",
    ]
    if not report["machine"].endswith("device cuda") and "cuda" not in report["machine"].split("device ")[-1]:
        lines += [
            "No GPU was lent to this run: on the CPU, 'to the device' counts the bytes copied into the model's",
            "row buffers. `benchmarks/hierarchy_gpu.sh` is the prepared GPU run (the same code with",
            "`--device cuda`), for the host-to-device bytes and step time on a GPU.",
            "",
        ]
    if report.get("plot"):
        lines += [f"![bytes per token and hit rate per tier]({report['plot']})", ""]
    if not report["row_cache"]:
        lines += [
            "This build's daemon has no row cache (`memstore serve --row-cache-bytes`), so the daemon tier is",
            "the table's files and the page cache; its variants appear once it does.",
            "",
        ]
    return "\n".join(lines)


def _summary(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows: what each tier saved against the daemon alone."""
    lines = ["What the tiers saved, against the daemon alone:", ""]
    for phase in ("train", "generate"):
        by_name = {r["variant"]: r for r in rows if r["phase"] == phase}
        base = by_name["daemon"]
        for r in by_name.values():
            if r["store"] == "in-process" or r is base:
                continue
            parts = [
                f"{1 - r['bytes_from_store_per_token'] / base['bytes_from_store_per_token']:.1%} fewer bytes from the "
                f"store, {1 - r['bytes_to_device_per_token'] / base['bytes_to_device_per_token']:.1%} fewer to the "
                f"device, time x{r['seconds'] / base['seconds']:.2f}"
            ]
            if r["device_hit_rate"] is not None:
                parts.append(f"device hit rate {r['device_hit_rate']:.1%}")
            if r["daemon_hit_rate"] is not None:
                parts.append(f"daemon row-cache hit rate {r['daemon_hit_rate']:.1%}")
            lines.append(f"- {phase}, {r['variant']}: " + "; ".join(parts) + ".")
    return [*lines, ""]


def _plot(rows: list[dict], path: Path) -> bool:
    """Bytes per token from the store and to the device, and hit rate per tier, per variant and phase."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    phases = ["train", "generate"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), constrained_layout=True)
    for col, phase in enumerate(phases):
        rs = [r for r in rows if r["phase"] == phase]
        names = [r["variant"] for r in rs]
        x = np.arange(len(rs))
        ax = axes[0][col]
        ax.bar(x - 0.2, [r["bytes_from_store_per_token"] for r in rs], 0.4, label="from the store")
        ax.bar(x + 0.2, [r["bytes_to_device_per_token"] for r in rs], 0.4, label="to the device")
        ax.set_title(f"{phase}: row bytes per token")
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("bytes / token")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        device = [100 * (r["device_hit_rate"] or 0) for r in rs]
        daemon = [100 * (r["daemon_hit_rate"] or 0) for r in rs]
        ax.bar(x - 0.2, device, 0.4, label="device cache")
        ax.bar(x + 0.2, daemon, 0.4, label="daemon row cache")
        ax.set_title(f"{phase}: hit rate per tier")
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("% of row reads")
        ax.set_ylim(0, max(5.0, 1.25 * max(device + daemon)))
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.01,0.1; got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1]; got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Run every variant, print the tables, and write the results page and plot when asked."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hierarchy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, nargs="+", default=[REPO / "data" / "text" / "en"], help="text files/dirs")
    parser.add_argument("--text-tokens", type=int, default=400_000, help="tokens of text to prepare (default 400000)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data", help="prepared data (a cache)")
    parser.add_argument("--steps", type=int, default=16, help="training steps per variant and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--gen-batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--gen-requests", type=int, default=3, help="batches decoded one after another")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--cache-fractions", type=_fractions, default=(0.01, 0.1), help="device cache sizes")
    parser.add_argument("--policy", **enum_choice(CachePolicy), default=CachePolicy.LRU, help="device cache policy")
    parser.add_argument("--row-cache-bytes", type=parse_bytes, default=2 << 20, help="the daemon row cache (2MiB)")
    parser.add_argument("--table", type=Path, default=REPO / "tables" / "bench-hierarchy")
    parser.add_argument("--out", type=Path, help="write the results page (markdown) here")
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: 1 on the CPU, where the daemon and other jobs share it)"
    )
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.policy is CachePolicy.STATIC:
        parser.error("--policy static needs a hot set; choose lru, lfu or tinylfu")
    global DEVICE
    DEVICE = args.device
    if args.threads is not None or DEVICE.type == "cpu":
        # Two intra-op threads on a 2-core machine shared with the daemon (and other jobs) spin at every
        # barrier when one is descheduled: step times then vary by 2x between identical runs.
        torch.set_num_threads(args.threads or 1)

    data = prepare_data(DataConfig(data_dir=args.data_dir, text=TextConfig(tuple(args.text), args.text_tokens)))
    lm_config = LMConfig(vocab_size=data.vocab_size)
    engram = lm_config.engram
    assert engram is not None
    manifest = ensure_table(args.table, engram.layout(), DType.FLOAT16, engram.seed)
    layer_rows = min(engram.layout().num_rows(layer) for layer in engram.layer_ids)
    row_bytes = manifest.dtype.row_bytes(manifest.layout.dim)
    rows_per_token = sum(len(engram.layout().head_sizes(layer)) for layer in engram.layer_ids)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=10**9, eval_batches=1)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(data.val) - args.prompt_tokens, args.gen_requests * args.gen_batch)
    prompts = np.stack([data.val[s : s + args.prompt_tokens] for s in starts]).astype(np.int64)
    prompts = torch.from_numpy(prompts).to(DEVICE).view(args.gen_requests, args.gen_batch, -1)  # [R, B, T0]
    row_cache = _row_cache_supported()
    variants = _variants(args, layer_rows, row_cache)
    print(
        f"Engram LM d_model {lm_config.d_model}, {lm_config.n_layers} blocks, Engram at {engram.layer_ids}; table "
        f"{layer_rows:,} rows x {row_bytes} B per layer; {len(data.train):,} training tokens; device {DEVICE}; "
        f"torch threads {torch.get_num_threads()}; daemon row cache {'yes' if row_cache else 'not in this build'}",
        flush=True,
    )
    daemons = _Daemons(args.table, args.row_cache_bytes if row_cache else None, engram.layer_ids[0])
    try:
        with Table.open(args.table) as table:
            ctx = {"lm_config": lm_config, "data": data, "table": table, "clients": daemons.clients,
                   "daemons": daemons, "row_bytes": row_bytes, "rows_per_token": rows_per_token}  # fmt: skip
            trained: dict[str, EngramLM] = {}

            def run_train(v: Variant, m: Measured) -> None:
                trained[v.name] = _train_variant(v, m, ctx, config)

            print("training", flush=True)
            short = replace(config, steps=2)
            train_measured = _rounds(variants, args.rounds, run_train, lambda v, m: _train_variant(v, m, ctx, short))
            model = trained["in-process"].eval()
            print("generating", flush=True)
            gen_measured = _rounds(
                variants,
                args.rounds,
                lambda v, m: _generate_variant(v, m, ctx, model, prompts, args.gen_tokens),
                lambda v, m: _generate_variant(v, m, ctx, model, prompts[:1, :, :8], 2),
            )
    finally:
        daemons.close()
    outputs = [m.output for m in gen_measured.values()]
    rows = _rows("train", variants, train_measured, config.batch_size * lm_config.max_seq_len)
    rows += _rows("generate", variants, gen_measured, 1)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, device {DEVICE}",
        "date": datetime.date.today().isoformat(),
        "setup": {
            "text": ", ".join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in args.text),
            "train_tokens": len(data.train),
            "d_model": lm_config.d_model,
            "n_layers": lm_config.n_layers,
            "engram_layers": list(engram.layer_ids),
            "rows_per_token": rows_per_token,
            "layer_rows": layer_rows,
            "row_bytes": row_bytes,
            "policy": args.policy.value,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "seq_len": lm_config.max_seq_len,
            "gen_batch": args.gen_batch,
            "gen_requests": args.gen_requests,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "rounds": args.rounds,
        },
        "rows": rows,
        "same_tokens": all(o == outputs[0] for o in outputs),
        "row_cache": row_cache,
    }
    report["command"] = "python -m benchmarks.hierarchy " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in rows:
        print(json.dumps(r))
    if args.plot and _plot(rows, args.plot):
        report["plot"] = args.plot.name if args.out and args.out.parent == args.plot.parent else str(args.plot)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(_markdown(report, report["command"].strip()))
    if not report["same_tokens"]:
        print("generation differed between variants", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
