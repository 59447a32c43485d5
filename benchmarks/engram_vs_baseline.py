"""Evidence for the model: Engram LM vs. a baseline of equal non-embedding compute, and gate maps.

    python -m benchmarks.engram_vs_baseline [--steps 600] [--out docs/results]

Same data, same batches, same seed and steps. The baseline has no Engram; its MLP is widened
so that its non-embedding parameter count matches the Engram LM's (Engram's projections and
convolution counted, its tables not: they are the embedding-like memory). Writes
docs/results/engram_vs_baseline.png (validation loss curves) and docs/results/engram_gates.png (gate value per
token for a few validation sentences), and prints a Markdown table.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from model.data import DataConfig, PreparedData, prepare_data
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


def gate_map(model: EngramLM, data: PreparedData, sentences: list[str], path: Path) -> None:
    """Heat map of the Engram gate per token (one row per sentence and Engram layer)."""
    model.eval()
    rows, labels, tokens_per_row = [], [], []
    for sentence in sentences:
        ids = [data.bos_id, *data.tokenizer.encode(sentence).ids][: model.config.max_seq_len]
        with torch.no_grad():
            model(torch.tensor([ids]))
        pieces = [data.tokenizer.decode([i]) for i in ids]
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
    parser.add_argument("--data-dir", type=Path, default=DataConfig().data_dir)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = prepare_data(DataConfig(data_dir=args.data_dir))
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
    ax.set_title("Engram LM vs. baseline of equal non-embedding parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(args.out / "engram_vs_baseline.png", dpi=120, bbox_inches="tight")

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

    val_text = data.tokenizer.decode(data.val[:400].tolist())
    sentences = [s.strip() + "." for s in val_text.split(".")[1:4] if s.strip()]
    gate_map(engram_model, data, sentences, args.out / "engram_gates.png")
    print(f"\nwrote {args.out / 'engram_vs_baseline.png'} and {args.out / 'engram_gates.png'}")


if __name__ == "__main__":
    main()
