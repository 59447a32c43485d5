"""Small tables and client settings shared by the test modules."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from client import ClientConfig
from memstore.create import create_table
from memstore.daemon_config import ServerConfig
from memstore.dtypes import DType
from memstore.layout import EngramLayout
from memstore.metrics import DaemonMetrics
from memstore.service import create_server
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig
from model.corpus import CorpusConfig
from model.engram import EngramConfig
from model.lm import LMConfig

SMALL_LAYOUT = EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(500, 700), max_ngram=3, heads_per_ngram=4, dim=16)

# The float storage types (quantized ones are raw bytes below the table: tested through tables).
FLOAT_DTYPES = [dtype for dtype in DType if not dtype.quantized and not dtype.opaque]
# The types a table can be created in (opaque byte rows are only imported).
CREATABLE_DTYPES = [dtype for dtype in DType if not dtype.opaque]

# Fail fast: short deadline, one retry.
FAST_FAIL = ClientConfig(timeout_s=5.0, max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)


def make_table(
    path: Path,
    dtype: DType = DType.FLOAT16,
    layout: EngramLayout = SMALL_LAYOUT,
    seed: int = 0,
    optimizer: OptimizerConfig | None = None,
) -> Path:
    """Create a small table at `path` (trainable with `optimizer`) and return the path."""
    return create_table(path, Manifest(layout=layout, dtype=dtype, seed=seed, optimizer=optimizer))


# A tiny Engram LM setting (one Engram layer) and corpus for model tests.
SMALL_ENGRAM = EngramConfig(layer_ids=(1,), vocab_size_per_ngram=(500, 500), heads_per_ngram=2, n_embed_per_ngram=16)
SMALL_CORPUS = CorpusConfig(num_people=30, num_cities=8, num_rivers=4, num_orgs=6, num_documents=400)


def small_lm_config(vocab_size: int) -> LMConfig:
    """A two-block LM with one Engram layer (SMALL_ENGRAM): trains in a second."""
    return LMConfig(
        vocab_size=vocab_size, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, engram=SMALL_ENGRAM
    )


# Every wait in a test has a deadline: a regression fails the test instead of hanging CI.
DEADLINE_S = 60.0


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g}s waiting until {what}"
        time.sleep(0.01)


def join_all(threads: Iterable[threading.Thread], timeout_s: float = DEADLINE_S) -> None:
    """Join every thread within one shared deadline; AssertionError naming those still running."""
    deadline = time.monotonic() + timeout_s
    threads = list(threads)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    running = [thread.name for thread in threads if thread.is_alive()]
    assert not running, f"threads still running after {timeout_s:g}s: {running}"


def readline_within(stream: IO[str], timeout_s: float = DEADLINE_S) -> str:
    """The next line of a child's pipe, or AssertionError after `timeout_s` (the child hung)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        raise AssertionError(f"no line from the child within {timeout_s:g}s") from None


class InProcessDaemon:
    """A daemon served in this process (create_server on a free loopback port) with its own metrics."""

    def __init__(self, table: Table, config: ServerConfig) -> None:
        self.metrics = DaemonMetrics()
        self.server, port = create_server(table, "127.0.0.1:0", config, metrics=self.metrics)
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def calls(self, method: str, code: str | None = None) -> float:
        """Calls of `method` the daemon counted (with status `code` when given)."""
        labels = {"method": method} | ({"code": code} if code else {})
        return self.metrics.total("memstore_requests_total", **labels)
