"""An acknowledged push survives `kill -9` of the daemon; an unacknowledged one is all there or not at all."""

from __future__ import annotations

import random
import threading
from dataclasses import replace

import numpy as np
import pytest

from client import MemstoreClient
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import MemstoreError
from memstore.launch import start_daemon, stop_daemon
from memstore.manifest import Backend, Manifest
from memstore.optim import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from tests.helpers import FAST_FAIL, SMALL_LAYOUT

LAYER = SMALL_LAYOUT.layer_ids[0]
DIM = SMALL_LAYOUT.dim
ROWS = 300


def _push(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Push i: distinct ids, each incremented by a small integer (exact in float32 in any order)."""
    rng = np.random.default_rng(i)
    ids = rng.choice(ROWS, 50, replace=False)
    return ids, rng.integers(1, 4, (50, 1)).astype(np.float32).repeat(DIM, axis=1)


@pytest.mark.parametrize("durability", list(Durability))
@pytest.mark.parametrize("backend, seed", [(Backend.MMAP, 0), (Backend.MMAP, 1), (Backend.LMDB, 2)])
def test_acknowledged_pushes_survive_kill_9(tmp_path, durability: Durability, backend: Backend, seed: int) -> None:
    optimizer = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, optimizer=optimizer, init_std=0.0, backend=backend)
    path = create_table(tmp_path / "t", manifest)
    args = ["--durability", durability.value, "--checkpoint-every", "7", "--no-same-host"]
    process, address = start_daemon(path, args)
    killer = threading.Timer(random.Random(seed).uniform(0.2, 0.6), process.kill)  # SIGKILL, mid-stream
    acknowledged = 0
    no_retry = replace(FAST_FAIL, max_attempts=1, timeout_s=2.0, same_host=False)
    try:
        with MemstoreClient(address, no_retry) as client:
            for i in range(1, 100_000):
                try:
                    client.push(LAYER, *(lambda ids, inc: (ids, -inc))(*_push(i)), step_id=i)
                except MemstoreError:
                    break
                acknowledged = i
                if i == 1:
                    killer.start()  # after the first acknowledgement: the kill always lands mid-stream
    finally:
        killer.cancel()
        process.kill()
        process.wait()

    process, address = start_daemon(path, ["--no-same-host"])
    try:
        with MemstoreClient(address, replace(FAST_FAIL, same_host=False)) as client:
            version = client.version()
            rows = client.lookup(LAYER, np.arange(ROWS)).numpy()
    finally:
        assert stop_daemon(process) == 0
    assert acknowledged <= version <= acknowledged + 1  # the push in flight at the kill: all or nothing
    expected = np.zeros((ROWS, DIM), dtype=np.float32)
    for i in range(1, version + 1):
        ids, inc = _push(i)
        expected[ids] += inc
    np.testing.assert_array_equal(rows, expected)
