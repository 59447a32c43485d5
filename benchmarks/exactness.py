"""Training through the memstore vs. in process: the same loss curve, per optimizer.

    python benchmarks/exactness.py [--steps 200]

For SGD, Adagrad and Adam: train the default small Engram LM for `--steps` steps twice from the
same weights, batches and seed: once with its tables in process (sparse nn.Embedding, PyTorch's
own SGD / Adagrad / SparseAdam), once with its tables in a memstore daemon (float32 table, the
daemon's optimizer, synchronous pushes, rows prefetched at each step's start). Prints the
largest relative difference of the training and validation losses and of the trained rows.
The tolerance stated and tested (tests/test_train.py) is 1e-4 relative on the losses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO  # noqa: E402
from client import MemstoreClient, Prefetcher, PushConfig, Pusher  # noqa: E402
from memstore.create import create_table  # noqa: E402
from memstore.dtypes import DType  # noqa: E402
from memstore.live import LiveConfig, LiveTable  # noqa: E402
from memstore.manifest import Manifest  # noqa: E402
from memstore.optim import OptimizerConfig, OptimizerKind  # noqa: E402
from memstore.service import create_server  # noqa: E402
from memstore.wal import Durability  # noqa: E402
from model.data import DataConfig, prepare_data  # noqa: E402
from model.lm import LMConfig  # noqa: E402
from model.train import TableSource, TrainConfig, build_model, train  # noqa: E402

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
    print(f"{args.steps} steps of the default Engram LM, batch 16 x 128, tables float32\n")
    print("| optimizer | max rel. diff train loss | max rel. diff val loss | max abs. diff rows | final loss |")
    print("|---|---:|---:|---:|---:|")
    for optimizer in OPTIMIZERS:
        config = TrainConfig(steps=args.steps, eval_every=max(1, args.steps // 4), table_optimizer=optimizer)
        torch.manual_seed(0)
        local = build_model(lm_config, data, TableSource.LOCAL)
        initial = {k: v.clone() for k, v in local.state_dict().items()}
        local_result = train(local, data, config, progress=False)
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
                        remote_result = train(
                            remote, data, config, progress=False, prefetcher=prefetcher, pusher=pusher
                        )
                    layer = engram.layer_ids[0]
                    rows = live.gather(layer, np.arange(engram.layout().num_rows(layer)))[0]
            finally:
                server.stop(None).wait()
                live.close()
        local_rows = local.blocks[layer].engram.table.embedding.weight.detach().numpy()
        train_diff = _max_rel(remote_result.train_loss, local_result.train_loss)
        val_diff = _max_rel(remote_result.val_loss, local_result.val_loss)
        print(
            f"| {optimizer.kind.value} | {train_diff:.2e} | {val_diff:.2e} | {np.abs(rows - local_rows).max():.2e} | "
            f"{local_result.val_loss[-1]:.4f} vs {remote_result.val_loss[-1]:.4f} |",
            flush=True,
        )
    return 0


def _max_rel(a: list[float], b: list[float]) -> float:
    a_, b_ = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a_ - b_) / np.abs(b_)))


if __name__ == "__main__":
    sys.exit(main())
