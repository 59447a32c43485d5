"""The main job: an Engram LM that trains and samples through a memstore daemon.

    python scripts/demo.py [--steps 150]

1. generate the corpus and train the BPE tokenizer locally (cached in data/);
2. create the Engram table the model's layout needs (tables/engram-lm, fresh each run), with
   Adam as its server-side optimizer, and serve it;
3. train the small Engram LM through the daemon: each step's rows are prefetched (all layers at
   once), its row gradients pushed back and applied by the daemon's Adam before the next step
   (synchronous, so it trains exactly as a table in process would); then sample;
4. snapshot the trained table while the daemon serves;
5. stop the daemon with SIGTERM and report.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from client import MemstoreClient, Prefetcher, PushConfig, Pusher  # noqa: E402
from memstore.cli import describe_table  # noqa: E402
from memstore.create import create_table  # noqa: E402
from memstore.dtypes import DType  # noqa: E402
from memstore.errors import TableFormatError  # noqa: E402
from memstore.launch import start_daemon, stop_daemon  # noqa: E402
from memstore.manifest import Manifest  # noqa: E402
from model.data import DataConfig, prepare_data  # noqa: E402
from model.generate import sample  # noqa: E402
from model.lm import LMConfig  # noqa: E402
from model.train import TableSource, TrainConfig, build_model, report, save_checkpoint, train  # noqa: E402

PROMPTS = ["The river", "In 1843,", "The University of"]


def _fresh_table(path: Path, manifest: Manifest) -> None:
    """The demo trains its table: start from the initial rows every run."""
    try:
        Manifest.read(path)
        exists = True
    except TableFormatError:
        exists = False
    create_table(path, manifest, overwrite=exists)
    shutil.rmtree(path.with_name(path.name + ".snapshots"), ignore_errors=True)
    print(f"created {path}\n{describe_table(manifest)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--table", type=Path, default=REPO / "tables" / "engram-lm")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    args = parser.parse_args()

    print("== 1. data: generated corpus, locally trained BPE")
    data = prepare_data(DataConfig(data_dir=REPO / "data"))
    print(f"{len(data.train):,} train and {len(data.val):,} validation tokens, vocabulary {data.vocab_size}")

    print("\n== 2. the Engram table, served by a memstore daemon")
    lm_config = LMConfig(vocab_size=data.vocab_size)
    engram = lm_config.engram
    assert engram is not None
    config = TrainConfig(steps=args.steps, eval_every=max(1, args.steps // 3), out_dir=args.out)
    manifest = Manifest(layout=engram.layout(), dtype=DType.FLOAT16, seed=engram.seed, optimizer=config.table_optimizer)
    _fresh_table(args.table, manifest)
    daemon, address = start_daemon(args.table)
    try:
        with MemstoreClient(address, expected_fingerprint=manifest.fingerprint) as client:
            print(f"daemon at {address}, fingerprint {manifest.fingerprint} checked")
            print(f"\n== 3. train {args.steps} steps through the daemon (rows pushed back), then sample")
            model = build_model(lm_config, data, TableSource.MEMSTORE, client)
            with (
                Prefetcher(client, model.row_ids, engram.layer_ids) as prefetcher,
                Pusher(client, engram.layer_ids, PushConfig(max_in_flight_steps=0)) as pusher,
            ):
                result = train(model, data, config, prefetcher=prefetcher, pusher=pusher)
                save_checkpoint(model, TableSource.MEMSTORE, args.out / "ckpt.pt", result)
                print(report(result, config))
                trained = prefetcher.stats.total_stall_s
                start = time.perf_counter()
                texts = sample(model, data, PROMPTS, max_new_tokens=40, temperature=0.7, seed=0, prefetcher=prefetcher)
                sampling_s = time.perf_counter() - start
                sampling_stall = prefetcher.stats.total_stall_s - trained
            print(
                f"lookups went {client.transport}: {'the daemon' if client.transport == 'grpc' else 'its files'}"
                " (the same-host path maps the daemon's table files when the client shares its host)"
            )
            print(f"checkpoint: {args.out / 'ckpt.pt'}")
            print(
                f"sampling: {sampling_s:.1f} s, waited {sampling_stall:.2f} s ({sampling_stall / sampling_s:.1%}) "
                "for rows prefetched per new token"
            )
            for text in texts:
                print(f"  > {text!r}")
            path, version = client.snapshot("demo")
            print(f"\n== 4. snapshot of the trained table (version {version}) at {path}")
    finally:
        print("\n== 5. stop the daemon (SIGTERM)")
        code = stop_daemon(daemon)
        print(f"daemon exited with code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
