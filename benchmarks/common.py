"""Helpers shared by the benchmarks: tables, daemons as real processes, timing stats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import TableFormatError
from memstore.layout import EngramLayout
from memstore.manifest import Manifest

REPO = Path(__file__).resolve().parent.parent


def ensure_table(path: Path, layout: EngramLayout, dtype: DType = DType.FLOAT16, seed: int = 0) -> Manifest:
    """Open the table at `path` if it matches, else (re)create it; then read it once into the page cache."""
    manifest = Manifest(layout=layout, dtype=dtype, seed=seed)
    try:
        reuse = Manifest.read(path) == manifest
    except TableFormatError:
        reuse = False
    if not reuse:
        print(f"creating {path} ({manifest.total_bytes / 2**30:.2f} GiB) ...", flush=True)
        create_table(path, manifest, overwrite=True)
    for layer_id in layout.layer_ids:
        with open(path / manifest.layer_file(layer_id), "rb") as f:
            while f.read(64 << 20):
                pass
    return manifest


@contextmanager
def daemon_process(table: Path, *extra_args: str) -> Iterator[str]:
    """`memstore serve` as a separate process on a free loopback port; yields its address."""
    port_file = REPO / "bench-out" / f"port-{os.getpid()}-{time.monotonic_ns()}"
    port_file.parent.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "memstore", "serve", str(table), "--listen", "127.0.0.1:0",
         "--port-file", str(port_file), *extra_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon for {table} did not start")
            time.sleep(0.05)
        yield f"127.0.0.1:{port_file.read_text().strip()}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        port_file.unlink(missing_ok=True)


def time_calls(fn: Callable[[], object], repeats: int) -> np.ndarray:
    """Seconds per call over `repeats` calls, after one warm-up call."""
    fn()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return times
