"""The device cache while training vs generating on the same real traffic, and what coherence costs.

    python -m benchmarks.cache_coherence [--text DIR] [--max-tokens 65536] [--seq 512] [--rows 16384,65536,262144]
                                         [--work bench-out/cache_coherence] [--out FILE]

`model.traffic` writes layer 1's row-id stream of the text's first --max-tokens tokens (DeepSeek-V4's
tokenizer, the DeepSeek-V4.1-Flash layout), cut into steps of --seq tokens (24 row reads per token).
The stream's distinct rows are renumbered densely into a trainable float16 table of 132 values per row
(264 bytes, a V4.1 row's size) served by a daemon on loopback, so the replay touches the same rows in
the same order as the 384M-row layer would, in a table this machine holds.

For each cache size (LRU, rows per layer) the same steps are replayed twice through a
`CachedReader` over a `MemstoreClient`:

- generating: `CacheConfig(generation_only=True)`, lookups only, no pushes (a frozen table's case);
- training: `cache_max_lag=0`, each step's lookup followed by a synchronous push of a gradient for
  every distinct row it read (SGD), so the cache follows the pushes (client.coherence);
- training, 2 replicas: the same, and a second client (no cache) pushes a step of the text's other
  half between each two steps of the measured one, whose cache then follows both.

Reported: the hit rate (accesses served from rows resident at the start of the step), rows and bytes
the lookups fetched per step, the bytes the row watch received per step (row ids and rows), the steps
that waited for the watch and their mean wait, and the steps served from the store; beside them the
bytes per step a client without a cache fetches (the step's distinct rows).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import ClientConfig, MemstoreClient
from client.cache import CacheConfig, CachedReader
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.layout import EngramLayout
from memstore.live import LiveConfig, LiveTable
from memstore.service import create_server
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from model import traffic

LAYER = 1
DIM = 132  # float16 values per row: 264 bytes, a DeepSeek-V4.1-Flash row


def _steps(text: Path, max_tokens: int, seq: int, work: Path) -> tuple[list[np.ndarray], int]:
    """The replay's steps (dense row ids) and the number of distinct rows."""
    layout, row_bytes = traffic.PRESETS["v4.1-flash"]
    work.mkdir(parents=True, exist_ok=True)
    config = traffic.TrafficConfig(
        texts=(text,), layout=layout, row_bytes=row_bytes, max_tokens=max_tokens, progress=False
    )
    meta = traffic.write_streams(config, work)
    stream = np.fromfile(work / meta["streams"][str(LAYER)], dtype="<u4").astype(np.int64)
    distinct, dense = np.unique(stream, return_inverse=True)
    per_step = seq * (layout.max_ngram - 1) * layout.heads_per_ngram
    return [dense[i : i + per_step] for i in range(0, len(dense) - per_step + 1, per_step)], len(distinct)


def _table(path: Path, rows: int) -> Path:
    """A trainable float16 table whose layer LAYER has at least `rows` rows of DIM values."""
    half = rows // 2 + 1000  # the layout's head sizes are primes near the vocab sizes
    layout = EngramLayout((LAYER,), (half, half), max_ngram=3, heads_per_ngram=1, dim=DIM)
    assert layout.num_rows(LAYER) >= rows
    optimizer = OptimizerConfig(OptimizerKind.SGD, lr=0.01)
    return create_table(path, Manifest(layout=layout, dtype=DType.FLOAT16, seed=0, optimizer=optimizer))


def _push(client: MemstoreClient, ids: np.ndarray, rng: np.random.Generator) -> int:
    """Push a gradient for every distinct row of a step (no step id: each run pushes anew); the rows."""
    uniq = np.unique(ids)
    client.push(LAYER, uniq, rng.standard_normal((len(uniq), DIM), dtype=np.float32))
    return len(uniq)


def _other_replica(address: str, steps: list[np.ndarray], turns: list[threading.Event], done: threading.Event) -> None:
    """A second replica training on other steps of the text, one push per turn of the measured one."""
    rng = np.random.default_rng(1)
    with MemstoreClient(address, ClientConfig(same_host=False)) as client:
        for i, turn in enumerate(turns):
            turn.wait()
            _push(client, steps[(i + len(steps) // 2) % len(steps)], rng)
            done.set()


def _replay(address: str, steps: list[np.ndarray], rows: int, mode: str) -> dict[str, Any]:
    training = mode != "generating"
    config = CacheConfig(max_rows=rows, generation_only=not training, cache_max_lag=0)
    rng = np.random.default_rng(0)
    row_bytes = DIM * 2
    distinct_rows = 0
    turns = [threading.Event() for _ in steps]
    other = None
    start = time.perf_counter()
    with MemstoreClient(address, ClientConfig(same_host=False)) as client, CachedReader(client, config) as cached:
        if mode == "training, 2 replicas":
            done = threading.Event()
            other = threading.Thread(target=_other_replica, args=(address, steps, turns, done))
            other.start()
        for i, ids in enumerate(steps):
            cached.lookup(LAYER, ids)
            distinct_rows += len(np.unique(ids))
            if training:
                _push(client, ids, rng)
            if other is not None:  # the other replica pushes its step before this one's next lookup
                done.clear()
                turns[i].set()
                done.wait(60)
        stats = cached.stats
    if other is not None:
        other.join(60)
    n = len(steps)
    return {
        "mode": mode,
        "rows": rows,
        "hit_rate": stats.hit_rate,
        "fetched_rows": stats.rows_fetched / n,
        "fetched_bytes": stats.bytes_fetched / n,
        "coherence_bytes": stats.coherence_bytes / n,
        "without_bytes": distinct_rows * row_bytes / n,
        "waits": stats.coherence_waits,
        "wait_ms": 1000 * stats.coherence_wait_s / max(1, stats.coherence_waits),
        "from_store": stats.served_from_store,
        "seconds": time.perf_counter() - start,
    }


def _markdown(report: dict[str, Any], command: str) -> str:
    lines = [
        "# Training through the device cache (coherence)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {report['machine']}; {report['date']}. Layer {LAYER} of {report['tokens']:,} tokens of "
        f"{report['text']}, {report['steps']} steps of {report['seq']} tokens ({report['step_accesses']:,} row "
        f"reads each), {report['distinct']:,} distinct rows renumbered into a trainable float16 table of 264-byte "
        "rows on a loopback daemon; LRU; training pushes every row a step reads (SGD, synchronous, "
        "`cache_max_lag=0`). With 2 replicas, a second client (no cache) pushes the rows of a step from the "
        "text's other half between each of the measured client's steps. Bytes per step count the measured "
        "client's.",
        "",
        "| cache rows | mode | hit rate | rows fetched / step | bytes fetched / step | coherence bytes / step "
        "| no cache: bytes / step | steps that waited (mean wait) | steps from the store |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['rows']:,} | {r['mode']} | {r['hit_rate']:.1%} | {r['fetched_rows']:,.0f} | "
            f"{r['fetched_bytes']:,.0f} | {r['coherence_bytes']:,.0f} | {r['without_bytes']:,.0f} | "
            f"{r['waits']} ({r['wait_ms']:.1f} ms) | {r['from_store']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Replay the steps generating and training for each cache size; print (and write) the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_coherence", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--text",
        type=Path,
        default=Path("data/text/en"),
        help="text (file or directory; scripts/get_text.sh writes data/text/en)",
    )
    parser.add_argument("--max-tokens", type=int, default=1 << 16, help="tokens of the text (default 65536)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per step (default 512)")
    parser.add_argument("--rows", type=lambda t: [int(x) for x in t.split(",")], default=[16384, 65536, 262144],
                        help="cache sizes in rows per layer")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("bench-out/cache_coherence"), help="stream files go here")
    parser.add_argument("--out", type=Path, help="write the results page (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, distinct = _steps(args.text, args.max_tokens, args.seq, args.work / "streams")
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "text": args.text.name,
        "tokens": len(steps) * args.seq,
        "seq": args.seq,
        "steps": len(steps),
        "step_accesses": len(steps[0]),
        "distinct": distinct,
        "results": [],
    }
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        live = LiveTable.open(_table(Path(tmp) / "t", distinct), config=LiveConfig(durability=Durability.OS))
        server, port = create_server(live, "127.0.0.1:0")
        server.start()
        try:
            for rows in args.rows:
                for mode in ("generating", "training", "training, 2 replicas"):
                    result = _replay(f"127.0.0.1:{port}", steps, rows, mode)
                    print(result, flush=True)
                    report["results"].append(result)
        finally:
            server.stop(None).wait(30)
            live.close()
    text = _markdown(report, "python -m benchmarks.cache_coherence " + " ".join(sys.argv[1:] if argv is None else argv))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
