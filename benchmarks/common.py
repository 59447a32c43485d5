"""Helpers shared by the benchmarks: tables and timing stats."""

from __future__ import annotations

import os
from pathlib import Path

from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import TableFormatError
from memstore.layout import EngramLayout
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig

REPO = Path(__file__).resolve().parent.parent


def ensure_table(
    path: Path,
    layout: EngramLayout,
    dtype: DType = DType.FLOAT16,
    seed: int = 0,
    optimizer: OptimizerConfig | None = None,
) -> Manifest:
    """Open the table at `path` if it matches, else (re)create it (trainable with `optimizer`); then read it
    once into the page cache."""
    manifest = Manifest(layout=layout, dtype=dtype, seed=seed, optimizer=optimizer)
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


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
