"""Quantized rows: bytes per lookup, lookup speed, and what serving a float32-trained table in fp8 / int8 costs.

    python -m benchmarks.quantized [--steps 300] [--lookups 65536]

1. Train the default Engram LM with its tables in process (float32, SparseAdam), `--steps` steps.
2. Write its tables to safetensors and import them as memstore tables in float32, float16,
   bfloat16, float8 e4m3 + row scale and int8 + row scale (`memstore import` with a manifest).
3. For each: validation loss of the same model reading that table (decoded to float32 on the
   model's side), and lookups of `--lookups` random rows through `memstore serve` over gRPC
   (same-host path off), alternating tables, median of 9.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from benchmarks.common import REPO
from client import ClientConfig, MemstoreClient
from memstore.dtypes import DType
from memstore.exchange import import_safetensors
from memstore.launch import start_daemon, stop_daemon
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from model.compression import CompressedTokenizer
from model.data import DataConfig, prepare_data
from model.lm import EngramLM, LMConfig
from model.sources import MappedTable
from model.train import TableSource, TrainConfig, build_model, evaluate, train

DTYPES = [DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT8_E4M3_ROWSCALE, DType.INT8_ROWSCALE]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lookups", type=int, default=65536)
    args = parser.parse_args()
    data = prepare_data(DataConfig(data_dir=REPO / "data"))
    lm_config = LMConfig(vocab_size=data.vocab_size)
    engram = lm_config.engram
    assert engram is not None
    config = TrainConfig(steps=args.steps, eval_every=args.steps)
    torch.manual_seed(0)
    local = build_model(lm_config, data, TableSource.LOCAL)
    trained = train(local, data, config, progress=False)
    print(f"trained {args.steps} steps in process: val loss {trained.val_loss[-1]:.4f} (float32 tables)")
    dense = {k: v for k, v in local.state_dict().items() if ".table." not in k}
    rows = {f"layer_{layer}": local.blocks[layer].engram.table.embedding.weight.detach() for layer in engram.layer_ids}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(rows, str(Path(tmp) / "trained.safetensors"))
        paths = {}
        for dtype in DTYPES:
            manifest = Manifest(layout=engram.layout(), dtype=dtype, seed=engram.seed)
            paths[dtype] = import_safetensors(Path(tmp) / "trained.safetensors", Path(tmp) / dtype.value, manifest)
            with Table.open(paths[dtype]) as table:
                tables = {layer: MappedTable(table, layer) for layer in engram.layer_ids}
                model = EngramLM(lm_config, CompressedTokenizer(data.tokenizer), data.pad_id, tables)
                model.load_state_dict(dense, strict=False)
                results[dtype] = {"val": evaluate(model, data, config), "bytes": dtype.row_bytes(engram.layout().dim)}
        daemons = {dtype: start_daemon(paths[dtype], ["--no-same-host"]) for dtype in DTYPES}
        try:
            clients = {d: MemstoreClient(address, ClientConfig(same_host=False)) for d, (_, address) in daemons.items()}
            layer = engram.layer_ids[0]
            rng = np.random.default_rng(0)
            times: dict[DType, list[float]] = {d: [] for d in DTYPES}
            for _ in range(9):
                ids = rng.integers(0, engram.layout().num_rows(layer), args.lookups)
                for dtype in DTYPES:
                    start = time.perf_counter()
                    clients[dtype].lookup(layer, ids)
                    times[dtype].append(time.perf_counter() - start)
            for client in clients.values():
                client.close()
        finally:
            for process, _ in daemons.values():
                stop_daemon(process)
    base = results[DType.FLOAT32]["val"]
    print(f"\n| stored as | bytes/row | gRPC lookup of {args.lookups:,} rows | MB/s | val loss | vs float32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in DTYPES:
        seconds = statistics.median(times[dtype])
        row_bytes = results[dtype]["bytes"]
        print(
            f"| {dtype.value} | {row_bytes} | {args.lookups / seconds / 1e6:.2f} M rows/s | "
            f"{args.lookups * row_bytes / seconds / 1e6:.0f} | {results[dtype]['val']:.4f} | "
            f"{results[dtype]['val'] - base:+.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
