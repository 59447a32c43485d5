"""What a memstore-held Engram table costs the small Engram LM, with and without prefetch.

    python -m benchmarks.prefetch [--steps 40] [--rounds 2] [--latency-ms 20] [--device auto] [--json out.json]

One run, same seeds, same batches, same initial weights, four variants:
- in-process:  the table memory-mapped in the training process (the limit);
- sync:        rows looked up from the daemon over gRPC when each Engram layer needs them;
- prefetch:    the same daemon, every layer's rows fetched one step ahead (client/prefetch.py);
- prefetch, same-host: prefetch through the client's same-host path (the daemon's files mapped
               by the client; what a client on the daemon's host gets by default).
Training reports step time; generation (batch of prompts, rows cached per position, each new
position fetched once) reports tokens/s; both as ratios to in-process, with the exposed stall
(time the model waited for rows) as a share of the time. Variants alternate within each round
(order reversed every other round) and the median over rounds is reported, because the
machine is shared and noisy. Then the same with `--latency-ms` added to every lookup (an
artificially slow store), so a fast loopback cannot hide the overlap, or its absence.
The daemon is a child process; sync and prefetch use gRPC (the same-host path switched off).

    python -m benchmarks.prefetch --netns [--mtu 1500] [--delay-ms 0.2] [--latency-ms 0]   # as root

`--netns` runs the model and its clients in a client network namespace joined to the daemon's by a
veth pair (benchmarks/netns.py), with `--delay-ms` of one-way delay added by a userspace proxy
(benchmarks/delay_proxy.py); the variants are then in-process, sync and prefetch over gRPC
(`ClientConfig(same_host=False, data_plane=False)`) and sync and prefetch over the daemon's data
plane (`ClientConfig(same_host=False, data_plane=True)`). `--connect HOST:PORT` is that run's inner
half: the same variants against a daemon that is already serving the table.

`--device` (auto: cuda if PyTorch sees a GPU, else cpu) is where the model runs; on cuda the
prefetcher lands rows through pinned buffers and a side stream. Stall columns: the host's wait for
rows (PrefetchStats.stall_s), and on CUDA the model's stream's wait for the rows' copies
(PrefetchStats.gpu_stall_s; 0 on the CPU). The "excess" column is every cost over in-process,
host or GPU: (time - in-process time) / time, with each step's loss read back (a device sync)
so GPU work is inside the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO, ensure_table
from benchmarks.delay_proxy import proxy_process
from benchmarks.netns import NetnsConfig, client_namespace, daemon_ports, start_daemon_at
from client import ClientConfig, MemstoreClient, PrefetchConfig, Prefetcher, RemoteEmbedding, TableFetcher
from memstore.dtypes import DType
from memstore.launch import start_daemon, stop_daemon
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from model.compression import CompressedTokenizer
from model.data import DataConfig, PreparedData, prepare_data
from model.device import add_device_argument
from model.lm import EngramLM, LMConfig
from model.sources import MappedTable
from model.train import TrainConfig, train

VARIANTS = ("in-process", "sync", "prefetch", "prefetch, same-host")
REMOTE_VARIANTS = ("in-process", "sync, gRPC", "prefetch, gRPC", "sync, data plane", "prefetch, data plane")


class SlowStore:
    """A client with `latency_s` added to every lookup (sleeping, as a network round trip does)."""

    def __init__(self, client: MemstoreClient, latency_s: float) -> None:
        self.client = client
        self.latency_s = latency_s

    def describe(self, timeout: float | None = None) -> Manifest:
        return self.client.describe(timeout)

    def lookup(self, layer_id: int, row_ids: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(self.latency_s)
        return self.client.lookup(layer_id, row_ids, **kwargs)


@dataclass
class Measured:
    seconds: float  # per training step, or per generated token
    stall_share: float  # the host's wait for rows
    gpu_stall_share: float = 0.0  # the model's CUDA stream's wait for the rows' copies (PrefetchStats.gpu_stall_s)


DEVICE = torch.device("cpu")  # set by --device


def _model(lm_config: LMConfig, data: PreparedData, tables: dict) -> EngramLM:
    torch.manual_seed(0)  # same initial weights for every variant
    return EngramLM(lm_config, CompressedTokenizer(data.tokenizer), data.pad_id, tables).to(DEVICE)


def _train_step_time(variant: str, lm_config, data, table: Table, stores: dict, config: TrainConfig) -> Measured:
    layers = lm_config.engram.layer_ids
    store = stores[variant]
    if variant == "in-process":
        model = _model(lm_config, data, {layer: MappedTable(table, layer) for layer in layers})
        result = train(model, data, config, progress=False)
    elif variant.startswith("sync"):
        model = _model(lm_config, data, {layer: RemoteEmbedding(store, layer, device=DEVICE) for layer in layers})
        result = train(model, data, config, progress=False)
    else:
        model = _model(lm_config, data, {layer: RemoteEmbedding(store, layer, device=DEVICE) for layer in layers})
        with Prefetcher(store, model.row_ids, layers, PrefetchConfig(device=str(DEVICE))) as prefetcher:
            result = train(model, data, config, progress=False, prefetcher=prefetcher)
        # After close(), which collects the copies' waits still in flight; evaluation does not use the prefetcher.
        gpu_share = prefetcher.stats.total_gpu_stall_s / result.train_seconds
        return Measured(result.train_seconds / config.steps, result.stall_share, gpu_share)
    return Measured(result.train_seconds / config.steps, result.stall_share)


def _generation_token_time(variant: str, lm_config, data, table: Table, stores: dict, prompts, new_tokens) -> Measured:
    layers = lm_config.engram.layer_ids
    store = stores[variant]
    model = _model(lm_config, data, {layer: MappedTable(table, layer) for layer in layers}).eval()
    fetcher = TableFetcher(table) if variant == "in-process" else store
    overlap = variant.startswith("prefetch")
    config = PrefetchConfig(overlap=overlap, device=str(DEVICE))
    with Prefetcher(fetcher, model.row_ids, layers, config) as prefetcher:
        torch.manual_seed(0)
        start = time.perf_counter()
        model.generate(prompts.to(DEVICE), new_tokens, prefetcher=prefetcher)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)  # the last token's kernels are part of its time
        elapsed = time.perf_counter() - start
        stall = prefetcher.stats.total_stall_s if variant != "in-process" else 0.0
    gpu_stall = prefetcher.stats.total_gpu_stall_s if variant != "in-process" else 0.0  # complete after close()
    return Measured(elapsed / (new_tokens * len(prompts)), stall / elapsed, gpu_stall / elapsed)


def _rounds(measure, rounds: int) -> dict[str, Measured]:
    """Median per variant over rounds, the variants alternating (reversed every other round),
    after one short unmeasured warm-up run of each (first-call allocations, thread start-up)."""
    for variant in VARIANTS:
        measure(variant, warmup=True)
    samples: dict[str, list[Measured]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            samples[variant].append(measure(variant))
    return {
        v: Measured(
            statistics.median(m.seconds for m in ms),
            statistics.median(m.stall_share for m in ms),
            statistics.median(m.gpu_stall_share for m in ms),
        )
        for v, ms in samples.items()
    }


def _rows(kind: str, unit: str, results: dict[str, Measured], per_second: float) -> list[dict]:
    base = results["in-process"].seconds
    return [
        {
            "phase": kind,
            "variant": variant,
            unit: m.seconds * (1000 if unit == "step_ms" else 1e6),
            "tokens_per_s": per_second / m.seconds,
            "time_ratio_to_in_process": m.seconds / base,
            "throughput_ratio_to_in_process": base / m.seconds,
            "exposed_stall_share": m.stall_share,  # host waits for rows only
            "gpu_stall_share": m.gpu_stall_share,  # CUDA: the model's stream waiting for row copies
            "excess_over_in_process": (m.seconds - base) / m.seconds,  # every wait, host or GPU
        }
        for variant, m in results.items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--gen-batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added per lookup in the slow-store run")
    parser.add_argument("--table", type=Path, default=REPO / "tables" / "bench-prefetch")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--netns", action="store_true", help="clients in a network namespace over veth (root)")
    parser.add_argument("--mtu", type=int, default=1500, help="with --netns: the veth pair's MTU")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="with --netns: one-way delay through a proxy")
    parser.add_argument("--connect", metavar="HOST:PORT", help="use this daemon (serving --table) instead of one's own")
    add_device_argument(parser)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device

    data = prepare_data(DataConfig(data_dir=REPO / "data"))
    lm_config = LMConfig(vocab_size=data.vocab_size)
    engram = lm_config.engram
    assert engram is not None
    manifest = ensure_table(args.table, engram.layout(), DType.FLOAT16, engram.seed)
    # One evaluation, at the end (train() excludes it from the step time).
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=10**9, eval_batches=1)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(data.val) - 16, args.gen_batch)
    prompts = torch.from_numpy(np.stack([data.val[s : s + 16] for s in starts]).astype(np.int64))  # [B, 16]
    print(
        f"Engram LM d_model {lm_config.d_model}, {lm_config.n_layers} blocks, Engram at {engram.layer_ids}; "
        f"table {manifest.total_bytes / 2**20:.0f} MiB {manifest.dtype.value}; batch {config.batch_size} x "
        f"{lm_config.max_seq_len} tokens; {args.steps} steps x {args.rounds} rounds; torch threads "
        f"{torch.get_num_threads()}; device {DEVICE}",
        flush=True,
    )
    if args.netns:
        return _run_in_namespace(args)
    rows: list[dict] = []
    daemon, address = (None, args.connect) if args.connect else start_daemon(args.table)
    global VARIANTS
    if args.connect:
        VARIANTS = REMOTE_VARIANTS
        configs = {
            "gRPC": ClientConfig(same_host=False, data_plane=False),
            "data plane": ClientConfig(same_host=False, data_plane=True),
        }
    else:
        configs = {"remote": ClientConfig(same_host=False), "same-host": ClientConfig(same_host=True)}
    try:
        with Table.open(args.table) as table, ExitStack() as stack:
            clients = {name: stack.enter_context(MemstoreClient(address, c)) for name, c in configs.items()}
            for c in clients.values():
                c.lookup(engram.layer_ids[0], np.arange(8))  # connect (and map) before timing
            print("clients: " + ", ".join(f"{name} -> {c.transport}" for name, c in clients.items()), flush=True)
            for latency_ms in dict.fromkeys((0.0, args.latency_ms)):
                slow = (lambda c: c) if latency_ms == 0 else (lambda c: SlowStore(c, latency_ms / 1000))
                stores: dict[str, Any] = {"in-process": None}
                if args.connect:
                    for name in ("gRPC", "data plane"):
                        stores[f"sync, {name}"] = stores[f"prefetch, {name}"] = slow(clients[name])
                else:
                    stores["sync"] = stores["prefetch"] = slow(clients["remote"])
                    stores["prefetch, same-host"] = slow(clients["same-host"])
                tag = "" if latency_ms == 0 else f" +{latency_ms:g} ms/lookup"
                trained = _rounds(
                    lambda v, warmup=False, stores=stores: _train_step_time(
                        v, lm_config, data, table, stores, replace(config, steps=3) if warmup else config
                    ),
                    args.rounds,
                )
                tokens_per_step = config.batch_size * lm_config.max_seq_len
                rows += _rows(f"train{tag}", "step_ms", trained, tokens_per_step)
                generated = _rounds(
                    lambda v, warmup=False, stores=stores: _generation_token_time(
                        v, lm_config, data, table, stores, prompts, 4 if warmup else args.gen_tokens
                    ),
                    args.rounds,
                )
                rows += _rows(f"generate{tag}", "us_per_token", generated, 1.0)
                _print(rows[-2 * len(VARIANTS) :])
    finally:
        if daemon is not None:
            stop_daemon(daemon)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _run_in_namespace(args: argparse.Namespace) -> int:
    """The daemon here, listening on a veth pair; this benchmark again, with --connect, in the client namespace
    (through the delay proxy with --delay-ms)."""
    inner = [a for a in sys.argv[1:] if a != "--netns"]
    for flag in ("--mtu", "--delay-ms"):  # this side's options, not the inner run's
        if flag in inner:
            i = inner.index(flag)
            del inner[i : i + 2]
    with client_namespace(NetnsConfig(mtu=args.mtu)) as ns:
        # Through the proxy, the daemon tells clients its data plane is at the proxy's address, as behind any proxy.
        advertise = ["--data-plane-advertise", ns.proxy_ip] if args.delay_ms else []
        daemon, address = start_daemon_at(ns.host_ip, args.table, advertise, stderr=subprocess.DEVNULL)
        try:
            ports = daemon_ports(address)  # gRPC, and the data plane's: both through the proxy
            target = address
            proxy = nullcontext()
            if args.delay_ms:
                target = f"{ns.proxy_ip}:{ports[0]}"
                proxy = proxy_process(ns.proxy_ip, ns.host_ip, ports, args.delay_ms / 1000)
            print(f"clients in a network namespace over veth (MTU {ns.mtu}), one-way delay {args.delay_ms:g} ms")
            with proxy:
                done = subprocess.run(ns.python("benchmarks.prefetch", [*inner, "--connect", target]))
        finally:
            stop_daemon(daemon)
    return done.returncode


def _print(rows: list[dict]) -> None:
    print("\n| phase | variant | time | tokens/s | ratio to in-process (time) | host stall | GPU stall | excess |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        time_text = f"{row['step_ms']:.1f} ms/step" if "step_ms" in row else f"{row['us_per_token']:.0f} us/token"
        print(
            f"| {row['phase']} | {row['variant']} | {time_text} | {row['tokens_per_s']:,.0f} | "
            f"{row['time_ratio_to_in_process']:.3f} | {row['exposed_stall_share']:.1%} | "
            f"{row['gpu_stall_share']:.1%} | {row['excess_over_in_process']:.1%} |"
        )
    stall = {r["variant"]: r["exposed_stall_share"] for r in rows if r["phase"].startswith("train")}
    for suffix in ("", ", gRPC", ", data plane"):
        sync, pre = stall.get(f"sync{suffix}"), stall.get(f"prefetch{suffix}")
        if sync is not None and pre is not None:
            ratio = f"{sync / pre:.1f}x" if pre > 0 else "no prefetch stall measured"
            print(f"training stall{suffix}, sync / prefetch: {ratio}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
