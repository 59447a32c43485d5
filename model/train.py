"""Train the small Engram LM, with its tables in process or in a memstore daemon.

    python -m model.train --source memstore --memstore 127.0.0.1:50051 --steps 200
    python -m model.train --source local --steps 600 --out runs/engram
    python -m model.train --source none --steps 600 --out runs/baseline     # no Engram
    python -m model.train --source memstore --memstore 127.0.0.1:50051 --device cuda
    python -m model.train --source local --data text --text data/text/en --text-tokens 2000000

`--data text` trains on real text (scripts/get_text.sh fetches some) with DeepSeek-V4's tokenizer
(the `model` extra) instead of the generated world: the LM's vocabulary is cut to the DeepSeek ids
the text uses, and the Engram rows are hashed from DeepSeek's compressed ids (model/textdata.py).

`--device` (default auto: cuda when PyTorch sees a GPU, else cpu) puts the model, the batches and
the rows there: the prefetcher lands rows on it through pinned buffers and a side stream, and
quantized rows travel as their stored bytes and decode on it.

With `--source memstore` the rows come from the daemon; when the served table has an
optimizer (`memstore create --optimizer adam`) each step's row gradients are pushed back and
the daemon applies them, synchronously by default (the next step sees this step's update, as
in process) or with `--push-staleness K` up to K steps in flight. Rows are prefetched: in
synchronous mode each step's rows are fetched at its start, all layers at once; otherwise, and
for frozen tables, one step ahead. With `--source local` the tables are sparse nn.Embeddings
trained in process by the PyTorch optimizer matching `TrainConfig.table_optimizer` (Adam at 5x
the backbone's rate by default, as the paper trains them).

`--cache-rows N` / `--cache-bytes SIZE` (with `--cache-policy`, model/cache_flags.py) put a row cache per
layer on the model's device in front of the daemon: only the rows it misses are fetched. The report shows
its hit rate, the rows and bytes fetched and saved per token, beside the exposed stall. Over a table
that is trained the cache follows the pushes (its own and other processes'), serving no row more than
`--cache-max-lag` versions behind (docs/cache.md); a frozen table caches freely.
"""

from __future__ import annotations

import argparse
import copy
import enum
import json
import math
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from itertools import islice
from pathlib import Path

import numpy as np
import prometheus_client
import torch
from tqdm import tqdm

from client import PrefetchConfig, Prefetcher, PrefetchHandle, PushConfig, Pusher, RemoteEmbedding, TableClient
from client import metrics as client_metrics
from client.cache import CacheStats
from client.cluster import add_connection_arguments, connect
from memstore.cli_args import enum_choice
from memstore.errors import InvalidArgumentError
from memstore.layout import fingerprint
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from model.cache_flags import add_cache_arguments, cache_config_from_args, check_cache_usable
from model.config import lm_config_from_dict, lm_config_to_dict
from model.data import PreparedData, add_data_arguments, batches, data_config_from_args, eval_batches, prepare_data
from model.device import add_device_argument, check_rows_device
from model.lm import EngramLM, LMConfig
from model.sources import TrackedRows, local_tables, memstore_tables
from model.tiers import daemon_counters, daemon_tier


class TableSource(enum.Enum):
    """Where the Engram tables live; NONE trains the same model without Engram."""

    LOCAL = "local"
    MEMSTORE = "memstore"
    NONE = "none"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping; defaults train in a few minutes on 2 cores."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    # The Engram tables' optimizer (the paper: Adam at 5x the backbone's rate, no weight decay).
    # Local tables use the PyTorch optimizer it names; a memstore table has its own, in its manifest.
    table_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(OptimizerKind.ADAM, lr=0.015))
    warmup_steps: int = 20
    eval_every: int = 50
    eval_batches: int = 16
    seed: int = 0
    out_dir: Path = Path("runs/engram")

    def __post_init__(self) -> None:
        # Checked before anything runs: a zero here used to fail only after the first pushes
        # (eval_every: division by zero) or after the checkpoint was overwritten (steps).
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"TrainConfig.{name} must be at least 1; got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise InvalidArgumentError(f"TrainConfig.warmup_steps must be >= 0; got {self.warmup_steps}")


@dataclass
class TrainResult:
    """What happened: losses, speed and lookup statistics."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    rows_fetched: int = 0
    stall_seconds: dict[int, float] = field(default_factory=dict)  # training steps' wait for rows, per layer
    # On CUDA: the model's stream waiting for the rows' copies, per layer (the prefetcher's gpu_stall_s,
    # collected as the copies complete, so a last step's may be missing).
    gpu_stall_seconds: dict[int, float] = field(default_factory=dict)
    push_wait_seconds: float = 0.0  # training steps' wait for push acknowledgements
    rows_pushed: int = 0
    table_version: int = 0  # the memstore table's version after the last acknowledged push
    train_seconds: float = 0.0  # training steps only, evaluations excluded
    eval_seconds: float = 0.0
    prefetched: bool = False
    prefetch_ahead: int = 0  # 1: step N+1's rows fetched during step N; 0: at each step's start
    non_embedding_params: int = 0
    tokens: int = 0  # training tokens (steps x batch x sequence length)
    # Per cache tier (the prefetcher's device cache: tier "device", the training steps' reads; `python -m
    # model.train` adds the daemon's row cache, from its metrics), the hits and the rows and bytes fetched
    # from the tier below and spared it. Empty: no cache.
    cache_tiers: list[CacheStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the report cannot show, and why

    @property
    def stall_share(self) -> float:
        """Exposed stall as a share of training time."""
        return sum(self.stall_seconds.values()) / self.train_seconds if self.train_seconds else 0.0


def build_model(
    lm_config: LMConfig,
    data: PreparedData,
    source: TableSource,
    client: TableClient | None = None,
    track_gradients: bool = False,
    device: torch.device | str = "cpu",
) -> EngramLM:
    """The LM on `device` with its tables from `source` (the config's Engram is dropped for NONE);
    memstore tables decode their rows on `device` and keep the rows' gradients for pushing when
    `track_gradients`."""
    device = torch.device(device)
    if source is TableSource.NONE:
        return EngramLM(replace(lm_config, engram=None)).to(device)
    engram = lm_config.engram
    assert engram is not None
    layout = engram.layout()
    if source is TableSource.LOCAL:
        tables = local_tables(layout, engram.seed)
    else:
        if client is None:
            raise ValueError("--source memstore needs a daemon address (--memstore HOST:PORT)")
        tables = memstore_tables(client, layout, track_gradients, device)
    return EngramLM(lm_config, data.compression, data.pad_id, tables).to(device)


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizers(model: EngramLM, config: TrainConfig) -> list[torch.optim.Optimizer]:
    sparse = [p for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()]
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(dense, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ]
    if sparse:
        optimizers.append(_torch_table_optimizer(sparse, config.table_optimizer))
    return optimizers


def _torch_table_optimizer(params: list[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The PyTorch optimizer whose sparse update the memstore's `config` reproduces."""
    if config.kind is OptimizerKind.SGD:
        return torch.optim.SGD(params, lr=config.lr)
    if config.kind is OptimizerKind.ADAGRAD:
        return torch.optim.Adagrad(
            params, lr=config.lr, eps=config.eps, initial_accumulator_value=config.initial_accumulator_value
        )
    if config.kind is OptimizerKind.ADAM:
        return torch.optim.SparseAdam(params, lr=config.lr, betas=config.betas, eps=config.eps)
    raise ValueError(f"PyTorch has no {config.kind.value} optimizer for local tables; train it in the memstore")


@torch.no_grad()
def evaluate(model: EngramLM, data: PreparedData, config: TrainConfig) -> float:
    """Mean validation loss over a fixed set of windows."""
    model.eval()
    device = next(model.parameters()).device
    losses = [
        model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))[1].item()
        for x, y in eval_batches(data.val, config.batch_size, model.config.max_seq_len, config.eval_batches)
    ]
    model.train()
    return float(np.mean(losses))


def train(
    model: EngramLM,
    data: PreparedData,
    config: TrainConfig,
    progress: bool = True,
    prefetcher: Prefetcher | None = None,
    pusher: Pusher | None = None,
) -> TrainResult:
    """Train in place; returns the loss history and statistics.

    With a `prefetcher` each step's rows are fetched ahead of the layers (one step ahead, unless
    a synchronous `pusher` needs this step's push applied first). With a `pusher` the memstore
    tables learn: each step's row gradients, of their lookups or of the prefetched rows fed through
    them, are pushed (the tables track gradients during the call whatever they were built with).
    """
    tables = _memstore_tables(model)
    with _tracking(tables, pusher is not None):
        return _train(model, data, config, progress, prefetcher, pusher, tables)


@contextmanager
def _tracking(tables: list[RemoteEmbedding], on: bool) -> Iterator[None]:
    """The tables' gradient tracking turned on (when `on`) for the block, then restored."""
    before = [table.requires_grad for table in tables]
    for table in tables:
        table.requires_grad = table.requires_grad or on
    try:
        yield
    finally:
        for table, was in zip(tables, before):
            table.requires_grad = was


def _train(
    model: EngramLM,
    data: PreparedData,
    config: TrainConfig,
    progress: bool,
    prefetcher: Prefetcher | None,
    pusher: Pusher | None,
    tables: list[RemoteEmbedding],
) -> TrainResult:
    device = next(model.parameters()).device
    if prefetcher is not None:
        check_rows_device(device, prefetcher.device, "the prefetcher")
    torch.manual_seed(config.seed)
    optimizers = _optimizers(model, config)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    result = TrainResult(non_embedding_params=model.num_params(), prefetched=prefetcher is not None)
    stream = islice(batches(data.train, config.batch_size, model.config.max_seq_len, config.seed), config.steps)
    if prefetcher is None:
        steps: Iterator = ((x, y, None) for x, y in stream)
    else:
        result.prefetch_ahead = 0 if pusher is not None and pusher.config.synchronous else 1
        steps = _prefetched(stream, prefetcher, result.prefetch_ahead)
    stall = _StallMeter(model, prefetcher)
    start = time.perf_counter()
    bar = tqdm(enumerate(steps), total=config.steps, disable=not progress, desc="train", unit="step")
    for step, (x, y, handle) in bar:
        scale = _lr_at(step, config)
        for opt, lrs in zip(optimizers, base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * scale
        rows = (
            TrackedRows(handle, {t.layer_id: t for t in tables})
            if pusher is not None and handle is not None
            else handle
        )
        _, loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), prefetched=rows)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse], 1.0
        )
        for opt in optimizers:
            opt.step()
        if pusher is not None:
            grads = {t.layer_id: t.take_gradients() for t in tables}  # lookups' and prefetched rows' alike
            pusher.push_step(step + 1, grads, lr_scale=scale)
        result.steps.append(step)
        result.train_loss.append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            eval_start = time.perf_counter()
            with stall.excluded():
                if pusher is not None:
                    pusher.flush()  # evaluate the table as trained so far
                result.eval_steps.append(step + 1)
                result.val_loss.append(evaluate(model, data, config))
            result.eval_seconds += time.perf_counter() - eval_start
            postfix = {"loss": f"{loss.item():.3f}", "val": f"{result.val_loss[-1]:.3f}"}
            if stall.measured:
                elapsed = time.perf_counter() - start - result.eval_seconds
                postfix["stall"] = f"{sum(stall.seconds().values()) / elapsed:.1%}"
            bar.set_postfix(postfix)
    if pusher is not None:
        pusher.flush()
        result.push_wait_seconds = pusher.stats.wait_s
        result.rows_pushed = pusher.stats.rows
        result.table_version = pusher.stats.last_version
    result.train_seconds = time.perf_counter() - start - result.eval_seconds
    result.tokens = config.steps * config.batch_size * model.config.max_seq_len
    result.tokens_per_s = result.tokens / result.train_seconds
    result.stall_seconds = stall.seconds()
    result.cache_tiers = stall.cache_tiers()
    result.gpu_stall_seconds = stall.gpu_seconds()
    result.rows_fetched = stall.rows()
    return result


def _memstore_tables(model: EngramLM) -> list[RemoteEmbedding]:
    return [
        b.engram.table for b in model.blocks if b.engram is not None and isinstance(b.engram.table, RemoteEmbedding)
    ]


class _StallMeter:
    """The training steps' exposed wait for rows, per layer; evaluations' lookups are not counted."""

    def __init__(self, model: EngramLM, prefetcher: Prefetcher | None) -> None:
        self.prefetcher = prefetcher
        self.tables = _memstore_tables(model) if prefetcher is None else []
        self.measured = prefetcher is not None or bool(self.tables)
        self._start = self._totals()
        self._excluded: dict[int, float] = {}
        self._rows_start = self._rows_total()
        self._gpu_start = self._gpu_totals()
        cache = prefetcher.stats.cache if prefetcher is not None else None
        self._cache_start = copy.deepcopy(cache) if cache is not None else None

    def cache_tiers(self) -> list[CacheStats]:
        """The cache tiers' counters since the meter started (evaluations look rows up without the prefetcher,
        so all of it is training's)."""
        if self.prefetcher is None or self.prefetcher.stats.cache is None or self._cache_start is None:
            return []
        return [_stats_since(self.prefetcher.stats.cache, self._cache_start)]

    def _gpu_totals(self) -> dict[int, float]:
        return dict(self.prefetcher.stats.gpu_stall_s) if self.prefetcher is not None else {}

    def gpu_seconds(self) -> dict[int, float]:
        """The model's stream's wait for row copies per layer since the meter started (CUDA; evaluations
        look rows up without the prefetcher, so all of it is training's)."""
        return {layer: total - self._gpu_start.get(layer, 0.0) for layer, total in self._gpu_totals().items()}

    def _totals(self) -> dict[int, float]:
        if self.prefetcher is not None:
            return dict(self.prefetcher.stats.stall_s)
        return {t.layer_id: t.lookup_seconds for t in self.tables}

    def _rows_total(self) -> int:
        if self.prefetcher is not None:
            return self.prefetcher.stats.rows
        return sum(t.rows_fetched for t in self.tables)

    def rows(self) -> int:
        """Rows fetched since the meter started (evaluations' included)."""
        return self._rows_total() - self._rows_start

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Lookups inside this block are not training stall."""
        before = self._totals()
        yield
        for layer, total in self._totals().items():
            self._excluded[layer] = self._excluded.get(layer, 0.0) + total - before.get(layer, 0.0)

    def seconds(self) -> dict[int, float]:
        """Stall per layer since the meter started."""
        return {
            layer: total - self._start.get(layer, 0.0) - self._excluded.get(layer, 0.0)
            for layer, total in self._totals().items()
        }


def _stats_since(now: CacheStats, start: CacheStats) -> CacheStats:
    """The counters' growth from `start` to `now` (per-layer dicts too)."""
    delta = copy.deepcopy(now)
    for f in fields(CacheStats):
        value = getattr(now, f.name)
        if isinstance(value, bool):  # a state (whether the cache is coherent), not a counter
            continue
        if isinstance(value, (int, float)):
            setattr(delta, f.name, value - getattr(start, f.name))
        elif isinstance(value, dict):
            before = getattr(start, f.name)
            setattr(delta, f.name, {key: count - before.get(key, 0) for key, count in value.items()})
    return delta


def _prefetched(
    stream: Iterator[tuple[np.ndarray, np.ndarray]], prefetcher: Prefetcher, ahead: int
) -> Iterator[tuple[np.ndarray, np.ndarray, PrefetchHandle]]:
    """Batches with their rows. ahead=1: step N+1's fetch is submitted before step N is handed
    out; ahead=0: each step's fetch starts when the caller asks for the step (after the previous
    step's push). A step's buffers are released when the caller asks for the next step."""
    pending: deque[tuple[np.ndarray, np.ndarray, PrefetchHandle]] = deque()
    try:
        for x, y in stream:
            pending.append((x, y, prefetcher.submit(x)))
            if len(pending) > ahead:
                yield pending[0]
                pending.popleft()[2].release()
        while pending:
            yield pending[0]
            pending.popleft()[2].release()
    finally:
        for _, _, handle in pending:
            handle.release()


def save_checkpoint(model: EngramLM, source: TableSource, path: Path, result: TrainResult | None = None) -> None:
    """Model config, weights (tables too when local) and the loss history, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "lm_config": lm_config_to_dict(model.config),
        "source": source.value,
        "state_dict": model.state_dict(),
        "history": None if result is None else {"eval_steps": result.eval_steps, "val_loss": result.val_loss},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(
    path: Path,
    data: PreparedData,
    client: TableClient | None = None,
    source: TableSource | None = None,
    device: torch.device | str = "cpu",
) -> tuple[EngramLM, TableSource]:
    """Rebuild a model saved by save_checkpoint on `device` (optionally with its tables from another source)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    saved_source = TableSource(payload["source"])
    source = source or saved_source
    lm_config = lm_config_from_dict(payload["lm_config"])
    if lm_config.vocab_size != data.vocab_size:  # token ids would silently mean other tokens
        raise ValueError(
            f"checkpoint {path} was trained on a vocabulary of {lm_config.vocab_size:,} ids, the data given has "
            f"{data.vocab_size:,}: pass the data flags it was trained with (--data, --text, --text-tokens)"
        )
    model = build_model(lm_config, data, source, client, device=device)
    # A memstore-trained checkpoint holds no tables; a local one's tables are only loaded into local tables.
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if [k for k in missing if ".table." not in k] or [k for k in unexpected if ".table." not in k]:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return model, source


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", **enum_choice(TableSource), default=TableSource.LOCAL)
    add_connection_arguments(parser)  # with --source memstore: --memstore, --cluster or --shard
    parser.add_argument(
        "--no-prefetch", action="store_true", help="look rows up when each layer needs them (no overlap)"
    )
    parser.add_argument(
        "--push-staleness",
        type=int,
        default=0,
        help="steps of pushes that may be unacknowledged (0: synchronous, exactly as in process)",
    )
    parser.add_argument("--freeze-tables", action="store_true", help="never push, even to a trainable table")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=defaults.out_dir, help="checkpoint and history directory")
    add_data_arguments(parser)  # --data-dir, --data generated|text, --text, --text-tokens
    parser.add_argument("--lm-config", type=Path, help="JSON file of LMConfig fields (unknown keys are errors)")
    add_device_argument(parser)
    add_cache_arguments(parser)  # --cache-rows, --cache-bytes, --cache-policy, --cache-max-lag
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics (prefetch stall, push wait, cache) on this port"
    )
    args = parser.parse_args(argv)
    check_cache_usable(args, parser, memstore=args.source is TableSource.MEMSTORE, prefetch=not args.no_prefetch)
    cache = cache_config_from_args(args, parser)
    if args.metrics_port is not None:
        client_metrics.enable()
        prometheus_client.start_http_server(args.metrics_port)
    if args.source is TableSource.MEMSTORE and not (args.memstore or args.cluster or args.shard or args.etcd):
        parser.error("--source memstore needs --memstore HOST:PORT (`memstore serve`'s address) or --cluster FILE")
    try:
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            eval_every=args.eval_every,
            seed=args.seed,
            out_dir=args.out,
        )
    except InvalidArgumentError as exc:
        parser.error(str(exc).replace("TrainConfig.", "--").replace("_", "-"))
    data_config = data_config_from_args(args, parser)
    lm_config = lm_config_from_dict(json.loads(args.lm_config.read_text())) if args.lm_config else LMConfig()
    data = prepare_data(data_config)
    lm_config = replace(lm_config, vocab_size=data.vocab_size)
    client = None
    if args.source is TableSource.MEMSTORE:
        engram = lm_config.engram
        assert engram is not None
        client = connect(args, expected_fingerprint=fingerprint(engram.layout(), engram.seed))
    prefetcher = pusher = None
    try:
        push = client is not None and client.trainable and not args.freeze_tables
        model = build_model(
            lm_config, data, args.source, client, track_gradients=push and args.no_prefetch, device=args.device
        )
        layers = lm_config.engram.layer_ids if lm_config.engram is not None else ()
        if client is not None and not args.no_prefetch:
            try:
                prefetcher = Prefetcher(
                    client, model.row_ids, layers, PrefetchConfig(device=str(args.device), cache=cache)
                )
            except InvalidArgumentError as exc:  # the cache refuses a table it cannot keep coherent
                if cache is None:
                    raise
                parser.error(f"--cache-rows/--cache-bytes: {exc}")
        if push:
            pusher = Pusher(client, layers, PushConfig(max_in_flight_steps=args.push_staleness))
        before = daemon_counters(client)
        result = train(model, data, config, prefetcher=prefetcher, pusher=pusher)
        if client is not None:
            manifest = client.describe()
            tier = daemon_tier(before, daemon_counters(client), manifest.dtype.row_bytes(manifest.layout.dim))
            if tier is not None and "same-host" not in client.transport:
                result.cache_tiers.append(tier)
            elif tier is not None:  # its hits were read in this process, from the cache's shared memory
                result.notes.append(
                    "daemon row cache: read in place (same host), so its hits are not in the daemon's counters"
                )
        save_checkpoint(model, args.source, config.out_dir / "ckpt.pt", result)
    finally:
        for resource in (pusher, prefetcher, client):
            if resource is not None:
                resource.close()
    print(report(result, config))


def _fetch_mode(result: TrainResult) -> str:
    if not result.prefetched:
        return "when each layer needed them"
    return "prefetched one step ahead" if result.prefetch_ahead else "prefetched at each step's start"


def _tier_line(tier: CacheStats, tokens: int) -> str:
    per_token = ""
    if tier.tier.startswith("daemon"):
        per_token = " (the daemon's counters: every client's reads, evaluations' too)"
    elif tokens:
        per_token = f"; per token {tier.rows_fetched / tokens:.2f} rows ({tier.bytes_fetched / tokens:,.0f} B)"
    return (
        f"{tier.tier} cache: hit rate {tier.hit_rate:.1%} ({tier.hits:,} of {tier.hits + tier.misses:,} row reads); "
        f"fetched from the tier below {tier.rows_fetched:,} rows ({tier.bytes_fetched:,} B){per_token}; "
        f"saved {tier.rows_saved:,} rows ({tier.bytes_saved:,} B)"
        + (
            f"; coherent: {tier.rows_refreshed:,} rows refreshed by pushes ({tier.coherence_bytes:,} B received), "
            f"{tier.coherence_waits:,} waits ({tier.coherence_wait_s:.2f} s), "
            f"{tier.served_from_store:,} steps served from the store"
            if tier.coherent
            else ""
        )
    )


def report(result: TrainResult, config: TrainConfig) -> str:
    """A few lines on what the run did."""
    lines = [
        f"{config.steps} steps in {result.train_seconds:.1f} s, {result.tokens_per_s:,.0f} tokens/s; "
        f"{result.non_embedding_params:,} non-embedding parameters",
        f"train loss {result.train_loss[0]:.3f} -> {np.mean(result.train_loss[-10:]):.3f} (mean of the last 10 steps); "
        f"val loss {result.val_loss[-1]:.3f}",
    ]
    if result.rows_fetched:
        stall = sum(result.stall_seconds.values())
        per_layer = ", ".join(f"layer {layer} {s:.2f} s" for layer, s in sorted(result.stall_seconds.items()))
        lines.append(
            f"memstore: {result.rows_fetched:,} rows looked up "
            f"({_fetch_mode(result)}); "
            f"exposed stall {stall:.2f} s = {result.stall_share:.1%} of training time ({per_layer})"
        )
        if result.gpu_stall_seconds:
            gpu = sum(result.gpu_stall_seconds.values())
            lines.append(f"memstore: the GPU waited {gpu:.2f} s for row copies ({gpu / result.train_seconds:.1%})")
        lines.extend(_tier_line(tier, result.tokens) for tier in result.cache_tiers)
        lines.extend(result.notes)
    if result.rows_pushed:
        lines.append(
            f"memstore: {result.rows_pushed:,} row gradients pushed, table now at version {result.table_version}; "
            f"waited {result.push_wait_seconds:.2f} s for acknowledgements "
            f"({result.push_wait_seconds / result.train_seconds:.1%} of training time)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
