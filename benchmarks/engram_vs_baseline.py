"""Evidence for the model: Engram LM vs. a baseline of equal non-embedding compute, and gate maps.

    python -m benchmarks.engram_vs_baseline [--steps 600] [--out docs/results]
    python -m benchmarks.engram_vs_baseline --data text --text data/text/en --text-tokens 1000000 --steps 300

Same data, same batches, same seed and steps. The baseline has no Engram; its MLP is widened
so that its non-embedding parameter count matches the Engram LM's (Engram's projections and
convolution counted, its tables not: they are the embedding-like memory). Writes
docs/results/engram_vs_baseline.png (validation loss curves) and docs/results/engram_gates.png (gate value per
token for a few validation sentences), and prints a Markdown table.

With `--data text` the models train on real text with DeepSeek-V4's tokenizer (scripts/get_text.sh
fetches text; model/textdata.py): the LM's vocabulary is cut to the DeepSeek ids the text uses,
the Engram rows are hashed from DeepSeek's compressed ids, and the plots are written as
engram_vs_baseline_text.png and engram_gates_text.png (`--plot-suffix` to change).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from model.data import DataSource, PreparedData, add_data_arguments, data_config_from_args, prepare_data
from model.lm import EngramLM, LMConfig
from model.train import TableSource, TrainConfig, TrainResult, build_model, train


def matched_baseline(lm_config: LMConfig, data: PreparedData, target_params: int) -> LMConfig:
    """The no-Engram config whose MLP width brings its non-embedding parameters closest to target."""
    best = None
    for hidden in range(lm_config.mlp_hidden, 4 * lm_config.mlp_hidden, 16):
        config = replace(lm_config, engram=None, mlp_hidden=hidden)
        gap = abs(EngramLM(config).num_params() - target_params)
        if best is None or gap < best[0]:
            best = (gap, config)
    assert best is not None
    return best[1]


def gate_map(model: EngramLM, data: PreparedData, sentences: list[str] | list[list[int]], path: Path) -> None:
    """Heat map of the Engram gate per token (one row per sentence and Engram layer); a sentence is text,
    or LM token ids (a stretch of the validation stream)."""
    model.eval()
    rows, labels, tokens_per_row = [], [], []
    for sentence in sentences:
        body = data.encode(sentence) if isinstance(sentence, str) else list(sentence)
        ids = [data.bos_id, *body][: model.config.max_seq_len]
        with torch.no_grad():
            model(torch.tensor([ids]))
        pieces = [data.decode([i]) for i in ids]
        for block in model.blocks:
            if block.engram is not None:
                rows.append(block.engram.last_gate[0, :, 0].numpy())  # [T]
                labels.append(f"layer {block.engram.layer_id}")
                tokens_per_row.append(pieces)
    width = max(len(r) for r in rows)
    fig = Figure(figsize=(max(8, width * 0.45), 1.5 * len(rows) + 1))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    fig.subplots_adjust(hspace=1.6)  # room for each row's token labels
    for ax, row, label, pieces in zip(axes[:, 0], rows, labels, tokens_per_row):
        image = ax.imshow(row[None, :], aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks([0], [label])
        ax.set_xticks(range(len(pieces)), [p.replace("\n", "\\n") for p in pieces], rotation=60, fontsize=7)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="gate alpha_t")
    fig.suptitle("Engram gate per token (bright: the memory is used)")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "results")
    add_data_arguments(parser)  # --data generated|text, --text, --text-tokens, --data-dir
    parser.add_argument("--plot-suffix", help="added to the plots' names (default: none, or _text with --data text)")
    args = parser.parse_args()
    data_config = data_config_from_args(args, parser)
    suffix = args.plot_suffix if args.plot_suffix is not None else ("_text" if args.data is DataSource.TEXT else "")
    torch.set_num_threads(2)
    data = prepare_data(data_config)
    print(
        f"data: {len(data.train):,} train and {len(data.val):,} validation tokens, LM vocabulary {data.vocab_size:,}, "
        f"Engram hashes {data.compression.compressed_vocab_size:,} compressed ids",
        flush=True,
    )
    train_config = TrainConfig(steps=args.steps, eval_every=args.eval_every, out_dir=Path("runs/evidence"))
    lm_config = LMConfig(vocab_size=data.vocab_size)

    torch.manual_seed(0)
    engram_model = build_model(lm_config, data, TableSource.LOCAL)
    baseline_config = matched_baseline(lm_config, data, engram_model.num_params())
    torch.manual_seed(0)
    baseline_model = build_model(baseline_config, data, TableSource.NONE)

    results: dict[str, TrainResult] = {}
    for name, model in [("Engram LM", engram_model), ("baseline", baseline_model)]:
        print(f"training {name}: {model.num_params():,} non-embedding parameters", flush=True)
        results[name] = train(model, data, train_config)

    args.out.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for name, r in results.items():
        ax.plot(r.eval_steps, r.val_loss, marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    what = "real text, DeepSeek-V4's tokenizer" if args.data is DataSource.TEXT else "generated world"
    ax.set_title(f"Engram LM vs. baseline of equal non-embedding parameters ({what})")
    ax.grid(alpha=0.3)
    ax.legend()
    curves, gates = args.out / f"engram_vs_baseline{suffix}.png", args.out / f"engram_gates{suffix}.png"
    fig.savefig(curves, dpi=120, bbox_inches="tight")

    print("\n| model | non-embedding params | Engram table params | val loss | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, model in [("Engram LM", engram_model), ("baseline", baseline_model)]:
        r = results[name]
        table_params = model.num_params(non_embedding=False) - model.num_params() - model.token_embedding.weight.numel()
        print(
            f"| {name} | {r.non_embedding_params:,} | {table_params:,} | {r.val_loss[-1]:.3f} | {r.tokens_per_s:,.0f} |"
        )
    print("\nvalidation loss by step:")
    print("| step | " + " | ".join(results) + " |")
    print("|---:|" + "---:|" * len(results))
    steps = results["Engram LM"].eval_steps
    for i, step in enumerate(steps):
        print(f"| {step} | " + " | ".join(f"{r.val_loss[i]:.3f}" for r in results.values()) + " |")

    if args.data is DataSource.TEXT:
        gate_map(engram_model, data, _paragraph_openings(data, count=3, length=24), gates)
    else:
        val_text = data.decode(data.val[:400])
        sentences = [s.strip() + "." for s in val_text.split(".")[1:4] if s.strip()]
        gate_map(engram_model, data, sentences, gates)
    print(f"\nwrote {curves} and {gates}")


def _paragraph_openings(data: PreparedData, count: int, length: int) -> list[list[int]]:
    """The first `length` LM ids of `count` validation paragraphs (those of at least `length` tokens, spread
    over the stream): ids as the model saw them, where re-encoding a cut-out string might tokenize differently."""
    breaks = np.array(["\n\n" in data.decode([i]) for i in range(data.vocab_size)])  # [vocab] ends a paragraph
    starts = np.flatnonzero(breaks[data.val[:-1]]) + 1
    long_enough = [int(s) for s, e in zip(starts, [*starts[1:], len(data.val)]) if e - s >= length]
    picks = [long_enough[i * len(long_enough) // count] for i in range(count)] if len(long_enough) >= count else []
    return [data.val[s : s + length].tolist() for s in picks]


if __name__ == "__main__":
    main()
