"""The main job: an Engram LM that trains and samples through a memstore daemon.

    python -m scripts.demo [--steps 150] [--shards N]
    python -m scripts.demo --create-only --table DIR [--shards N]   # steps 1-2 only (a deployment's init job)
    python -m scripts.demo --cluster FILE [--steps S]              # steps 3-4 through a running cluster
    python -m scripts.demo --etcd HOST:PORT --cluster-name NAME    # the same, its daemons found in etcd
    python -m scripts.demo --data text [--text data/text/en]       # real text, DeepSeek-V4's tokenizer

from the repository root (scripts/demo.sh does that), so the repository's packages are imported;
where the packages are installed (the image: `python scripts/demo.py`) it also runs as a file.

1. generate the corpus and train the BPE tokenizer locally (cached in data/); with `--data text`,
   tokenize real text (scripts/get_text.sh fetches some) with DeepSeek-V4's tokenizer instead
   (model/textdata.py: slower steps, as the LM's output layer spans the ~20-30k DeepSeek ids the
   text uses);
2. create the Engram table the model's layout needs (tables/engram-lm, fresh each run), with
   Adam as its server-side optimizer, and serve it;
3. train the small Engram LM through the daemon: each step's rows are prefetched (all layers at
   once), its row gradients pushed back and applied by the daemon's Adam before the next step
   (synchronous, so it trains exactly as a table in process would); then sample;
4. snapshot the trained table while the daemon serves;
5. stop the daemon with SIGTERM and report.

With `--shards N` the table is created in N shards and each is served by its own daemon; the
model reads and trains through a `ClusterClient`. `--cluster FILE` (a cluster spec, see
client/cluster_spec.py) uses daemons that are already running, e.g. docker-compose.yml's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from client import ClusterClient, ClusterSpec, MemstoreClient, PrefetchConfig, Prefetcher, PushConfig, Pusher
from memstore.cli import describe_table
from memstore.create import create_sharded, create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, TableFormatError
from memstore.launch import start_daemon, stop_daemon
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import MANIFEST_NAME, shard_dirs
from model.data import DataSource, PreparedData, add_data_arguments, data_config_from_args, prepare_data
from model.device import add_device_argument
from model.generate import sample
from model.lm import LMConfig
from model.train import TableSource, TrainConfig, build_model, report, save_checkpoint, train

REPO = Path(__file__).resolve().parent.parent  # data/, tables/ and runs/ go beside scripts/
PROMPTS = ["The river", "In 1843,", "The University of"]
# Prompts for real text: the first three whose tokens all occur in it (the LM's vocabulary is the text's).
TEXT_PROMPTS = ["The kernel", "This chapter", "The following", "The", "In", "本章"]


def _fresh_table(path: Path, manifest: Manifest, shards: int) -> list[Path]:
    """The demo trains its table: start from the initial rows every run. Returns the shard directories."""
    if path.exists():  # only ever a table this demo made: refuse anything else
        if not ((path / MANIFEST_NAME).is_file() or shard_dirs(path)):
            raise TableFormatError(f"{path} exists and is not a memstore table; pick another --table")
        shutil.rmtree(path)
    for stale in path.parent.glob(f"{path.name}*.snapshots"):
        shutil.rmtree(stale)
    if shards > 1:
        dirs = create_sharded(path, manifest, shards)
    else:
        dirs = [create_table(path, manifest)]
    print(f"created {path}{f' in {shards} shards' if shards > 1 else ''}\n{describe_table(manifest)}")
    return dirs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--table", type=Path, default=REPO / "tables" / "engram-lm")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--shards", type=int, default=1, help="create the table in N shards, one daemon each")
    parser.add_argument("--create-only", action="store_true", help="prepare the data and create the table, then exit")
    parser.add_argument("--cluster", type=Path, help="train through running daemons described by this cluster spec")
    parser.add_argument("--etcd", metavar="HOST:PORT", help="train through running daemons registered in this etcd")
    parser.add_argument("--cluster-name", metavar="NAME", help="with --etcd: the cluster they registered in")
    add_data_arguments(parser)  # --data generated|text, --text, --text-tokens, --data-dir
    parser.set_defaults(data_dir=REPO / "data")
    add_device_argument(parser)
    return parser


def main() -> int:
    parser = _parser()
    args = parser.parse_args()
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    if (args.cluster is not None or args.etcd is not None) and args.create_only:
        parser.error("--cluster and --etcd use an existing table; --create-only makes one: give one of them")
    if (args.etcd is None) != (args.cluster_name is None):
        parser.error("--etcd and --cluster-name go together")

    data_config = data_config_from_args(args, parser)
    if data_config.source is DataSource.TEXT:
        print(f"== 1. data: real text from {', '.join(map(str, data_config.text.paths))}, DeepSeek-V4's tokenizer")
    else:
        print("== 1. data: generated corpus, locally trained BPE")
    data = prepare_data(data_config)
    print(f"{len(data.train):,} train and {len(data.val):,} validation tokens, vocabulary {data.vocab_size}")

    lm_config = LMConfig(vocab_size=data.vocab_size)
    engram = lm_config.engram
    assert engram is not None
    config = TrainConfig(steps=args.steps, eval_every=max(1, args.steps // 3), out_dir=args.out)
    manifest = Manifest(layout=engram.layout(), dtype=DType.FLOAT16, seed=engram.seed, optimizer=config.table_optimizer)
    if args.cluster is not None:
        spec = ClusterSpec.from_file(args.cluster)
        print(f"\n== 2. the Engram table, served by the cluster in {args.cluster} ({len(spec.shards)} shards)")
        with ClusterClient(spec, expected_fingerprint=manifest.fingerprint) as client:
            print(f"fingerprint {manifest.fingerprint} checked on every daemon")
            _train_and_sample(client, lm_config, data, config, args)
        return 0
    if args.etcd is not None:
        print(f"\n== 2. the Engram table, served by cluster {args.cluster_name!r} as registered in etcd at {args.etcd}")
        with ClusterClient.discover(args.etcd, args.cluster_name, expected_fingerprint=manifest.fingerprint) as client:
            shards = ", ".join(f"[{', '.join(shard.addresses)}]" for shard in client.spec.shards)
            print(f"found shards {shards}; fingerprint {manifest.fingerprint} checked on every daemon")
            _train_and_sample(client, lm_config, data, config, args)
        return 0

    print("\n== 2. the Engram table" + ("" if args.create_only else ", served by memstore daemons"))
    shard_dirs = _fresh_table(args.table, manifest, args.shards)
    if args.create_only:
        return 0
    daemons = []
    try:
        for shard_dir in shard_dirs:
            daemons.append(start_daemon(shard_dir))
        addresses = [address for _, address in daemons]
        if len(addresses) == 1:
            client = MemstoreClient(addresses[0], expected_fingerprint=manifest.fingerprint)
        else:
            client = ClusterClient(ClusterSpec.from_flags(addresses), expected_fingerprint=manifest.fingerprint)
        with client:
            print(f"daemons at {', '.join(addresses)}, fingerprint {manifest.fingerprint} checked")
            _train_and_sample(client, lm_config, data, config, args)
    finally:
        print("\n== 5. stop the daemons (SIGTERM)")
        codes = [stop_daemon(process) for process, _ in daemons]
        print(f"daemons exited with codes {codes}")
    return 0 if codes and not any(codes) else 1


def _train_and_sample(
    client: MemstoreClient | ClusterClient,
    lm_config: LMConfig,
    data: PreparedData,
    config: TrainConfig,
    args: argparse.Namespace,
) -> None:
    """Steps 3 and 4: train through the client (rows prefetched, gradients pushed), sample, snapshot."""
    engram = lm_config.engram
    assert engram is not None
    print(f"\n== 3. train {args.steps} steps through the daemons (rows pushed back), then sample")
    model = build_model(lm_config, data, TableSource.MEMSTORE, client, device=args.device)
    with (
        Prefetcher(client, model.row_ids, engram.layer_ids, PrefetchConfig(device=str(args.device))) as prefetcher,
        Pusher(client, engram.layer_ids, PushConfig(max_in_flight_steps=0)) as pusher,
    ):
        result = train(model, data, config, prefetcher=prefetcher, pusher=pusher)
        save_checkpoint(model, TableSource.MEMSTORE, args.out / "ckpt.pt", result)
        print(report(result, config))
        trained = prefetcher.stats.total_stall_s
        start = time.perf_counter()
        texts = sample(model, data, _prompts(data), max_new_tokens=40, temperature=0.7, seed=0, prefetcher=prefetcher)
        sampling_s = time.perf_counter() - start
        sampling_stall = prefetcher.stats.total_stall_s - trained
    print(
        f"lookups went {client.transport}: {'their files' if 'same-host' in client.transport else 'the daemons'}"
        " (the same-host path maps a daemon's table files when the client shares its host)"
    )
    print(f"checkpoint: {args.out / 'ckpt.pt'}")
    print(
        f"sampling: {sampling_s:.1f} s, waited {sampling_stall:.2f} s ({sampling_stall / sampling_s:.1%}) "
        "for rows prefetched per new token"
    )
    for text in texts:
        print(f"  > {text!r}")
    snapshots = client.snapshot("demo")
    if isinstance(client, MemstoreClient):
        snapshots = [snapshots]
    print("\n== 4. snapshot of the trained table")
    for shard, (path, version) in enumerate(snapshots):
        print(f"  {'shard ' + str(shard) + ': ' if len(snapshots) > 1 else ''}version {version} at {path}")


def _prompts(data: PreparedData) -> list[str]:
    """The demo's prompts: the generated world's, or for real text three that its vocabulary can encode."""
    if data.vocab_ids is None:
        return PROMPTS
    usable = []
    for prompt in TEXT_PROMPTS:
        try:
            data.encode(prompt)
        except InvalidArgumentError:
            continue
        usable.append(prompt)
    return usable[:3]


if __name__ == "__main__":
    sys.exit(main())
