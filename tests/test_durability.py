"""An acknowledged push survives `kill -9` of the daemon; an unacknowledged one is all there or not at all;
what recovery cuts is logged, and acknowledged pushes it cannot account for stop the daemon from serving."""

from __future__ import annotations

import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client import MemstoreClient
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import DataLossError, MemstoreError, ReplicationGapError, TableFormatError
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveConfig, LiveTable
from memstore.tabledir.manifest import Backend, Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
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


# -- what recovery cannot account for: said loudly, refused unless --accept-data-loss ---------------------

SGD = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)
_FRAME = struct.Struct("<4sHHQQI")


def _trained_then_killed(tmp_path: Path, pushes: int) -> Path:
    """A table whose fsync daemon acknowledged `pushes` pushes (all only in the log) and was then killed."""
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, optimizer=SGD, init_std=0.0)
    path = create_table(tmp_path / "t", manifest)
    process, address = start_daemon(path, ["--durability", "fsync", "--checkpoint-every", "1000", "--no-same-host"])
    try:
        with MemstoreClient(address, replace(FAST_FAIL, same_host=False)) as client:
            for i in range(1, pushes + 1):
                assert client.push(LAYER, *_push(i), step_id=i).version == i
    finally:
        process.kill()
        process.wait()
    return path


def _last_frame(path: Path) -> tuple[Path, int, int]:
    """(segment, offset, length) of the last record in the table's log."""
    segment = sorted((path / "wal").glob("wal-*.log"))[-1]
    data = segment.read_bytes()
    offset, last = 20, None  # past the segment's file header
    while offset + _FRAME.size <= len(data):
        length = _FRAME.unpack_from(data, offset)[3]
        last = (offset, _FRAME.size + length)
        offset += _FRAME.size + length
    assert last is not None
    return segment, *last


def _serve(path: Path, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    log = tmp_path / f"daemon-{len(list(tmp_path.glob('daemon-*')))}.log"
    with open(log, "w") as out:
        process, address = start_daemon(path, ["--no-same-host", *args], stderr=out)
    return process, address, log


def _serve_fails(path: Path, *args: str) -> str:
    """`memstore serve` that must refuse to start (a daemon that serves fails the test by the timeout)."""
    done = subprocess.run(
        [sys.executable, "-m", "memstore", "serve", str(path), "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    return done.stderr


def _version_served(address: str) -> int:
    with MemstoreClient(address, replace(FAST_FAIL, same_host=False)) as client:
        return client.version()


def test_a_torn_unacknowledged_tail_is_cut_and_logged(tmp_path: Path) -> None:
    path = _trained_then_killed(tmp_path, 3)
    segment, _offset, _length = _last_frame(path)
    torn = _FRAME.pack(b"EWAL", 1, 0, 100, 4, 0) + bytes(30)  # push 4's append, cut short by a crash
    with open(segment, "ab") as f:
        f.write(torn)
    size = segment.stat().st_size
    process, address, log = _serve(path, tmp_path)
    try:
        assert _version_served(address) == 3
    finally:
        assert stop_daemon(process) == 0
    text = log.read_text()
    assert f"WARNING memstore.recovery: {path}: write-ahead log recovery cut {len(torn)} bytes" in text
    assert f"at offset {size - len(torn)} of {segment}: the record of version 4" in text
    assert "it was never acknowledged (its version is above the last acknowledged one, 3)" in text


def test_an_acknowledged_push_cut_from_the_log_refuses_to_serve_unless_accepted(tmp_path: Path) -> None:
    path = _trained_then_killed(tmp_path, 3)
    segment, offset, length = _last_frame(path)
    os.truncate(segment, offset + length - 1)  # damage to push 3's record, which was acknowledged
    refused = _serve_fails(path)
    assert "acknowledged pushes cannot be accounted for: pushes 3..3 (1 versions) were acknowledged" in refused
    assert f"recovery cut {length - 1} bytes at offset {offset} of {segment}: the record of version 3" in refused
    assert "--accept-data-loss to serve it as it is, at version 4" in refused  # 3 is never reused
    process, address, log = _serve(path, tmp_path, "--accept-data-loss")
    try:
        assert _version_served(address) == 4
    finally:
        assert stop_daemon(process) == 0
    assert "ERROR memstore.recovery" in log.read_text() and "ACCEPTING DATA LOSS" in log.read_text()
    process, address, _log = _serve(path, tmp_path)  # accepted once: the next start needs no flag
    try:
        assert _version_served(address) == 4
    finally:
        assert stop_daemon(process) == 0


def test_a_deleted_log_refuses_to_serve_a_trained_table(tmp_path: Path) -> None:
    path = _trained_then_killed(tmp_path, 4)
    shutil.rmtree(path / "wal")
    refused = _serve_fails(path)
    assert "pushes 1..4 (4 versions) were acknowledged" in refused and "wal/ was deleted" in refused
    assert (
        "PUSHES MISSING: version 4 was acknowledged"
        in subprocess.run(
            [sys.executable, "-m", "memstore", "info", str(path)], capture_output=True, text=True, timeout=60
        ).stdout
    )
    process, address, _log = _serve(path, tmp_path, "--accept-data-loss")
    try:
        assert _version_served(address) == 5
    finally:
        assert stop_daemon(process) == 0


def test_a_log_deleted_after_a_clean_stop_loses_nothing_and_says_so(tmp_path: Path, caplog) -> None:
    path = create_table(tmp_path / "t", Manifest(layout=SMALL_LAYOUT, optimizer=SGD))
    with LiveTable.open(path, config=LiveConfig(checkpoint_every=0)) as live:
        for i in range(1, 4):
            live.push(LAYER, *_push(i))
    shutil.rmtree(path / "wal")
    with caplog.at_level(logging.WARNING, "memstore.recovery"), LiveTable.open(path) as live:
        assert live.version == 3
    assert "wal/ was missing and an empty one was created; nothing acknowledged is missing" in caplog.text


def test_a_lost_checkpoint_is_not_taken_for_a_fresh_table(tmp_path: Path) -> None:
    """checkpoint.json deleted after a clean stop: the log (emptied by that checkpoint) still knows the
    version; opening at version 0 with the optimizer's steps reset would be silent loss."""
    path = create_table(tmp_path / "t", Manifest(layout=SMALL_LAYOUT, optimizer=SGD))
    with LiveTable.open(path, config=LiveConfig(checkpoint_every=0)) as live:
        for i in range(1, 6):
            live.push(LAYER, *_push(i))
    (path / "checkpoint.json").unlink()
    with pytest.raises(DataLossError, match="checkpoint.json says version 0 but the log had already reached version 5"):
        LiveTable.open(path)
    with LiveTable.open(path, config=LiveConfig(accept_data_loss=True)) as live:
        assert live.version == 5  # the files hold version 5: the log says so
        assert live.push(LAYER, *_push(6)).version == 6
    with LiveTable.open(path) as live:
        assert live.version == 6


def test_after_accepted_loss_a_replica_that_saw_the_lost_pushes_cannot_continue(tmp_path: Path) -> None:
    """Versions are never reused after an accepted loss: a follower at a version the lost pushes made
    would otherwise take the new pushes as the ones after its own and silently diverge."""
    path = create_table(tmp_path / "t", Manifest(layout=SMALL_LAYOUT, optimizer=SGD))
    live = LiveTable.open(path, config=LiveConfig(durability=Durability.FSYNC, checkpoint_every=0))
    for i in range(1, 4):
        live.push(LAYER, *_push(i))  # a follower streaming them reaches version 3
    live._close_files()  # a crash
    segment, offset, _length = _last_frame(path)
    os.truncate(segment, offset + 5)  # push 3's record damaged
    with LiveTable.open(path, config=LiveConfig(accept_data_loss=True, checkpoint_every=0)) as accepted:
        assert accepted.version == 4  # 3 was acknowledged; 4 marks the loss and names no push
        assert accepted.push(LAYER, *_push(4)).version == 5
        with pytest.raises(ReplicationGapError):
            accepted.records_after(3, 1 << 20, 0)  # the follower at 3 must be re-seeded
        assert [r.version for r in accepted.records_after(4, 1 << 20, 0)] == [5]
    with LiveTable.open(path) as reopened:
        assert reopened.version == 5


def test_an_empty_seqlock_file_does_not_stop_a_start(tmp_path: Path) -> None:
    """A host crash can leave the seqlock file empty (it was created without a sync before): mapping
    8 bytes of it raised a raw ValueError on every start."""
    path = create_table(tmp_path / "t", Manifest(layout=SMALL_LAYOUT, optimizer=SGD))
    with LiveTable.open(path) as live:
        live.push(LAYER, *_push(1))
    os.truncate(path / "seqlock", 0)
    with LiveTable.open(path) as live:
        assert live.version == 1
        assert (path / "seqlock").read_bytes() == (2).to_bytes(8, "little")


@pytest.mark.parametrize("damage", [b"{not json", b"[]"], ids=["not-json", "not-an-object"])
def test_a_damaged_checkpoint_is_refused_cleanly_and_can_be_accepted(tmp_path: Path, damage: bytes) -> None:
    path = create_table(tmp_path / "t", Manifest(layout=SMALL_LAYOUT, optimizer=SGD))
    live = LiveTable.open(path, config=LiveConfig(checkpoint_every=2))
    for i in range(1, 6):
        live.push(LAYER, *_push(i))  # checkpoints at 2 and 4 drop the log below them: it holds push 5
    live._close_files()  # a crash
    (path / "checkpoint.json").write_bytes(damage)
    for _ in range(2):  # the failed open released the table: the second fails the same way
        with pytest.raises(TableFormatError, match="checkpoint.json is malformed.*--accept-data-loss"):
            LiveTable.open(path)
    with LiveTable.open(path, config=LiveConfig(accept_data_loss=True)) as accepted:
        assert accepted.version == 5  # replayed from the log, whose first record is push 5
    with LiveTable.open(path) as reopened:
        assert reopened.version == 5
