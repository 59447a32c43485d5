"""Sample from a trained Engram LM, with its tables in process or in a memstore daemon.

python -m model.generate --checkpoint runs/engram/ckpt.pt --prompt "The river" --samples 3
python -m model.generate --checkpoint runs/engram/ckpt.pt --source memstore --memstore 127.0.0.1:50051
python -m model.generate --checkpoint runs/text/ckpt.pt --data text --text data/text/en --prompt "The kernel"

The data flags must be the ones the checkpoint was trained with (its vocabulary is the data's).

`--device` (default auto: cuda when PyTorch sees a GPU, else cpu) is where the model runs and the
prefetched rows land.

`--cache-rows N` / `--cache-bytes SIZE` (with `--cache-policy`, model/cache_flags.py) keep a row cache per
layer on that device in front of a memstore table: only the rows it misses are fetched, and the tokens are
the same as without it. Over a trainable table the cache follows the pushes of whoever trains it, serving
no row more than `--cache-max-lag` versions behind (docs/cache.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from client import PrefetchConfig, Prefetcher
from client.cluster import add_connection_arguments, connect
from memstore.cli_args import enum_choice
from memstore.errors import InvalidArgumentError
from memstore.layout import fingerprint
from model.cache_flags import add_cache_arguments, cache_config_from_args, check_cache_usable
from model.data import PreparedData, add_data_arguments, data_config_from_args, prepare_data
from model.device import add_device_argument, check_rows_device
from model.lm import EngramLM
from model.tiers import daemon_counters, daemon_tier
from model.train import TableSource, load_checkpoint


def sample(
    model: EngramLM,
    data: PreparedData,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    prefetcher: Prefetcher | None = None,
) -> list[str]:
    """One continuation per prompt, decoded to text (the prompt included), computed on the model's device;
    rows prefetched per token if given (the prefetcher must deliver them on that device)."""
    device = next(model.parameters()).device
    if prefetcher is not None:
        check_rows_device(device, prefetcher.device, "the prefetcher")
    torch.manual_seed(seed)
    model.eval()
    texts = []
    for prompt in prompts:
        ids = [data.bos_id, *data.encode(prompt)]
        tokens = torch.tensor([ids], device=device)  # [1, T0]
        out = model.generate(tokens, max_new_tokens, temperature=temperature, prefetcher=prefetcher)
        tokens = out[0].tolist()[1:]
        if data.eos_id in tokens[len(ids) - 1 :]:
            tokens = tokens[: tokens.index(data.eos_id, len(ids) - 1)]
        texts.append(data.decode(tokens))
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--source", **enum_choice(TableSource), help="default: as trained")
    add_connection_arguments(parser)  # with --source memstore: --memstore, --cluster or --shard
    parser.add_argument("--prompt", action="append", help="repeat for several prompts")
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    add_data_arguments(parser)  # as the checkpoint was trained: --data-dir, --data, --text, --text-tokens
    add_device_argument(parser)
    add_cache_arguments(parser)  # --cache-rows, --cache-bytes, --cache-policy, --cache-max-lag
    args = parser.parse_args(argv)
    cache = cache_config_from_args(args, parser)
    if args.source is not None:  # else checked once the checkpoint says where its tables are
        check_cache_usable(args, parser, memstore=args.source is TableSource.MEMSTORE, prefetch=True)
    data = prepare_data(data_config_from_args(args, parser))
    client = None
    prefetcher = None
    try:
        if args.source is not TableSource.LOCAL and args.source is not TableSource.NONE:
            client = connect(args)
        try:
            model, source = load_checkpoint(args.checkpoint, data, client, args.source, device=args.device)
        except ValueError as exc:  # a memstore checkpoint without an address, or one that does not fit: usage
            parser.error(f"{args.checkpoint}: {exc}")
        check_cache_usable(args, parser, memstore=source is TableSource.MEMSTORE and client is not None, prefetch=True)
        engram = model.config.engram
        if client is not None and engram is not None:
            client.check_fingerprint(fingerprint(engram.layout(), engram.seed))
        prompts = (args.prompt or ["The"]) * args.samples
        for prompt in prompts:
            try:
                data.encode(prompt)
            except InvalidArgumentError as exc:  # a token the cut vocabulary of real text lacks
                parser.error(f"--prompt {prompt!r}: {exc}")
        if client is not None and engram is not None and source is TableSource.MEMSTORE:
            config = PrefetchConfig(device=str(args.device), cache=cache)
            try:
                prefetcher = Prefetcher(client, model.row_ids, engram.layer_ids, config)
            except InvalidArgumentError as exc:  # a cache that could not follow a trainable table's pushes
                if cache is None:
                    raise
                parser.error(f"--cache-rows/--cache-bytes: {exc}")
        before = daemon_counters(client)
        for text in sample(model, data, prompts, args.max_new_tokens, args.temperature, args.seed, prefetcher):
            print(f"[{source.value}] {text}")
        if prefetcher is not None:
            print(f"rows: {prefetcher.stats.summary()}")
        if client is not None:
            manifest = client.describe()
            tier = daemon_tier(before, daemon_counters(client), manifest.dtype.row_bytes(manifest.layout.dim))
            if tier is not None and "same-host" not in client.transport:
                print(f"daemon: {tier.summary()} (the daemon's counters: every client's reads)")
            elif tier is not None:
                print("daemon: its row cache was read in place (same host); its hits are not in its counters")
    finally:
        if prefetcher is not None:
            prefetcher.close()
        if client is not None:
            client.close()


if __name__ == "__main__":
    main()
