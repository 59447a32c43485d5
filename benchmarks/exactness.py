"""Training through the memstore vs. in process: the same loss curve, per optimizer.

    python -m benchmarks.exactness [--steps 200]

For SGD, Adagrad and Adam: train the default small Engram LM for `--steps` steps twice from the
same weights, batches and seed: once with its tables in process (sparse nn.Embedding, PyTorch's
own SGD / Adagrad / SparseAdam), once with its tables in a memstore daemon (float32 table, the
daemon's optimizer, synchronous pushes, rows prefetched at each step's start). Prints the
relative difference of the training loss at a few steps, of the validation losses, and of the
trained rows.

Training amplifies any float difference (the order in which repeated ids' gradients are summed,
torch's MKL sqrt being 1 ulp off now and then), so a control runs too: the in-process training
again with one table value nudged by one ulp. If the memstore's differences are of that order,
the two runs differ by no more than the control does. The tolerance stated and tested on short
runs (tests/test_train.py) is 1e-4 relative on the losses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO
from client import MemstoreClient, Prefetcher, PushConfig, Pusher
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.live import LiveConfig, LiveTable
from memstore.service import create_server
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from model.data import DataConfig, prepare_data
from model.lm import LMConfig
from model.train import TableSource, TrainConfig, build_model, train

OPTIMIZERS = [
    OptimizerConfig(OptimizerKind.SGD, lr=0.5),
    OptimizerConfig(OptimizerKind.ADAGRAD, lr=0.05, eps=1e-10),
    OptimizerConfig(OptimizerKind.ADAM, lr=0.015),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    data = prepare_data(DataConfig(data_dir=REPO / "data"))
    lm_config = LMConfig(vocab_size=data.vocab_size)
    engram = lm_config.engram
    assert engram is not None
    print(f"{args.steps} steps of the default Engram LM, batch 16 x 128, tables float32")
    checkpoints = [s for s in (1, 10, 50, 100, 200, 400) if s <= args.steps]
    header = " | ".join(f"step {s}" for s in checkpoints)
    print("\nrelative difference of the training loss from the in-process run\n")
    print(f"| optimizer | run | {header} | val (max) |")
    print("|---|---|" + "---:|" * (len(checkpoints) + 1))
    for optimizer in OPTIMIZERS:
        config = TrainConfig(steps=args.steps, eval_every=max(1, args.steps // 4), table_optimizer=optimizer)
        torch.manual_seed(0)
        local = build_model(lm_config, data, TableSource.LOCAL)
        initial = {k: v.clone() for k, v in local.state_dict().items()}
        reference = train(local, data, config, progress=False)
        runs = {"memstore": _memstore_run(lm_config, data, config, optimizer, initial)}
        runs["control: 1 ulp"] = _nudged_local_run(lm_config, data, config, initial)
        for name, result in runs.items():
            diffs = [
                abs(result.train_loss[s - 1] - reference.train_loss[s - 1]) / reference.train_loss[s - 1]
                for s in checkpoints
            ]
            val = _max_rel(result.val_loss, reference.val_loss)
            cells = " | ".join(f"{d:.1e}" for d in diffs)
            print(f"| {optimizer.kind.value} | {name} | {cells} | {val:.1e} |", flush=True)
    return 0


def _memstore_run(lm_config: LMConfig, data, config: TrainConfig, optimizer: OptimizerConfig, initial: dict):
    engram = lm_config.engram
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Manifest(layout=engram.layout(), dtype=DType.FLOAT32, seed=engram.seed, optimizer=optimizer)
        live = LiveTable.open(create_table(Path(tmp) / "t", manifest), config=LiveConfig(Durability.OS))
        server, port = create_server(live)
        server.start()
        try:
            with MemstoreClient(f"127.0.0.1:{port}") as client:
                remote = build_model(lm_config, data, TableSource.MEMSTORE, client)
                remote.load_state_dict(initial, strict=False)
                with (
                    Prefetcher(client, remote.row_ids, engram.layer_ids) as prefetcher,
                    Pusher(client, engram.layer_ids, PushConfig(max_in_flight_steps=0)) as pusher,
                ):
                    return train(remote, data, config, progress=False, prefetcher=prefetcher, pusher=pusher)
        finally:
            server.stop(None).wait()
            live.close()


def _nudged_local_run(lm_config: LMConfig, data, config: TrainConfig, initial: dict):
    """The in-process run again, with one value of the first Engram table moved by one ulp."""
    model = build_model(lm_config, data, TableSource.LOCAL)
    model.load_state_dict(initial)
    weight = model.blocks[lm_config.engram.layer_ids[0]].engram.table.embedding.weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
    return train(model, data, config, progress=False)


def _max_rel(a: list[float], b: list[float]) -> float:
    a_, b_ = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a_ - b_) / np.abs(b_)))


if __name__ == "__main__":
    sys.exit(main())
