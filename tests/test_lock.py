"""Who may use a table directory: one writer or many readers, whatever files operators delete;
no --overwrite of a table in use; offline readers (export, verify, info, reshard) never read a
table a daemon trains, nor one whose files lack pushes its log holds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from client import MemstoreClient
from memstore.create import create_sharded
from memstore.errors import TableFormatError, UnavailableError
from memstore.exchange import export_safetensors, import_safetensors, rows_digest
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveConfig, LiveTable
from memstore.reshard import reshard
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from tests.helpers import FAST_FAIL, SMALL_LAYOUT, make_table

LAYER = SMALL_LAYOUT.layer_ids[0]
DIM = SMALL_LAYOUT.dim
SGD = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)
GRPC = replace(FAST_FAIL, same_host=False)
NO_CHECKPOINT = LiveConfig(durability=Durability.OS, checkpoint_every=0)


def _memstore(*args: str | Path, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """Run the `memstore` command line; a daemon that wrongly starts serving fails the test by its timeout."""
    return subprocess.run(
        [sys.executable, "-m", "memstore", *map(str, args)], capture_output=True, text=True, timeout=timeout_s
    )


def _push(client_or_live, i: int) -> int:
    ids = np.arange(i, i + 5)
    grads = np.full((5, DIM), -float(i), dtype=np.float32)
    return client_or_live.push(LAYER, ids, grads, step_id=i).version


def _create_args(path: Path) -> list[str]:
    layout = SMALL_LAYOUT
    return [
        "create",
        path,
        "--layers",
        ",".join(map(str, layout.layer_ids)),
        "--vocab-size-per-ngram",
        ",".join(map(str, layout.vocab_size_per_ngram)),
        "--max-ngram",
        str(layout.max_ngram),
        "--heads-per-ngram",
        str(layout.heads_per_ngram),
        "--dim",
        str(layout.dim),
        "--optimizer",
        "sgd",
        "--overwrite",
        "--no-progress",
    ]


def test_deleting_writer_lock_does_not_let_a_second_writer_in(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=SGD)
    process, address = start_daemon(path, ["--no-same-host"])
    try:
        with MemstoreClient(address, GRPC) as client:
            assert _push(client, 1) == 1
        (path / "writer.lock").unlink()  # what an operator does with a "stale" lock
        second = _memstore("serve", path, "--listen", "127.0.0.1:0", timeout_s=30)  # serving: times out
        assert second.returncode == 2
        assert "open for writing by another process (pid unknown); one writer per table" in second.stderr
        with MemstoreClient(address, GRPC) as client:  # the one writer goes on
            assert _push(client, 2) == 2
    finally:
        assert stop_daemon(process) == 0
    with LiveTable.open(path) as reopened:
        assert reopened.version == 2


def test_serving_read_only_beside_a_writer_is_refused_and_the_advice_works(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=SGD)
    process, address = start_daemon(path, ["--no-same-host"])
    try:
        with MemstoreClient(address, GRPC) as client:
            _push(client, 1)
            refused = _memstore("serve", path, "--read-only", "--listen", "127.0.0.1:0", timeout_s=30)
            assert refused.returncode == 2
            assert f"open for writing by another process (pid {process.pid})" in refused.stderr
            assert "memstore snapshot ADDRESS NAME" in refused.stderr
            snapshot, version = client.snapshot("for-reading")  # what the message says to do
            reader, reader_address = start_daemon(Path(snapshot), ["--read-only", "--no-same-host"])
            try:
                with MemstoreClient(reader_address, GRPC) as served:
                    assert served.version() == version == 1
                    expected = client.lookup(LAYER, np.arange(10)).numpy()
                    np.testing.assert_array_equal(served.lookup(LAYER, np.arange(10)).numpy(), expected)
            finally:
                assert stop_daemon(reader) == 0
    finally:
        assert stop_daemon(process) == 0


@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "read-only"])
def test_create_and_import_overwrite_refuse_a_served_table(tmp_path: Path, read_only: bool) -> None:
    path = make_table(tmp_path / "t", optimizer=SGD)
    export_safetensors(path, tmp_path / "rows.safetensors")
    inode = path.stat().st_ino
    process, address = start_daemon(path, ["--no-same-host", *(["--read-only"] if read_only else [])])
    try:
        created = _memstore(*_create_args(path))
        assert created.returncode == 2 and "--overwrite never replaces a table in use" in created.stderr
        imported = _memstore("import", tmp_path / "rows.safetensors", path, "--overwrite", "--no-progress")
        assert imported.returncode == 2 and "--overwrite never replaces a table in use" in imported.stderr
        assert path.stat().st_ino == inode  # the served directory is still the table at PATH
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.safetensors", "t"]  # no staging left
        if not read_only:
            with MemstoreClient(address, GRPC) as client:
                assert _push(client, 1) == 1
    finally:
        assert stop_daemon(process) == 0
    if not read_only:
        with LiveTable.open(path) as reopened:  # the acknowledged push is in the table at PATH
            assert reopened.version == 1
    assert _memstore(*_create_args(path)).returncode == 0  # once nobody serves it
    import_safetensors(tmp_path / "rows.safetensors", path, overwrite=True)


def test_overwriting_a_sharded_table_is_refused_while_one_shard_is_served(tmp_path: Path) -> None:
    manifest = Manifest(layout=SMALL_LAYOUT, optimizer=SGD)
    create_sharded(tmp_path / "s", manifest, 2, 16)
    with LiveTable.open(tmp_path / "s" / "shard-1", config=NO_CHECKPOINT) as live:
        with pytest.raises(UnavailableError, match=r"shard-1 is open for writing.*--overwrite never replaces"):
            create_sharded(tmp_path / "s", manifest, 2, 16, overwrite=True)
        assert _push(live, 8) == 1  # rows 8..12: partitions 8-15 are shard 1's
    create_sharded(tmp_path / "s", manifest, 2, 16, overwrite=True)


def _crash_with_lost_writes(path: Path, pushes: int) -> dict[int, np.ndarray]:
    """Train `pushes` pushes, crash before a checkpoint and lose every write to the table's files (a host
    crash under fsync durability: the log is on disk, the mapped rows were not). Returns the trained rows."""
    pristine = shutil.copytree(path, path.with_name("pristine"))
    live = LiveTable.open(path, config=replace(NO_CHECKPOINT, durability=Durability.FSYNC))
    for i in range(1, pushes + 1):
        _push(live, i)
    trained = {layer: live.gather(layer, np.arange(SMALL_LAYOUT.num_rows(layer)))[0].copy() for layer in (1, 4)}
    live._close_files()
    manifest = Manifest.read(path)
    for layer in SMALL_LAYOUT.layer_ids:
        for name in [manifest.layer_file(layer)] + [name for name, _ in manifest.state_files(layer).values()]:
            shutil.copyfile(pristine / name, path / name)
    return trained


def test_offline_readers_refuse_a_table_whose_pushes_are_only_in_its_log(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=SGD)
    trained = _crash_with_lost_writes(path, 3)
    with pytest.raises(TableFormatError, match=r"past its checkpoint .*export would miss them. Start its daemon"):
        export_safetensors(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(TableFormatError, match="verify would miss them"):
        rows_digest(path)
    verify = _memstore("verify", path, "--no-progress")
    assert verify.returncode == 2 and "past its checkpoint" in verify.stderr and "rows sha256" not in verify.stderr
    info = _memstore("info", path)
    assert info.returncode == 0 and "NOT RECOVERED: the log holds pushes 1..3" in info.stdout
    with pytest.raises(TableFormatError, match="reshard would miss them"):
        reshard(path, tmp_path / "resharded", 2)
    LiveTable.open(path).close()  # what the message says: the writer replays the log
    export_safetensors(path, tmp_path / "out.safetensors")
    exported = load_file(tmp_path / "out.safetensors")
    for layer, rows in trained.items():
        np.testing.assert_array_equal(exported[f"layer_{layer}"], rows)
    assert "NOT RECOVERED" not in _memstore("info", path).stdout


def test_offline_readers_refuse_a_table_being_trained(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=SGD)
    with LiveTable.open(path, config=NO_CHECKPOINT) as live:
        _push(live, 1)
        with pytest.raises(UnavailableError, match=r"open for writing by a daemon.*export the snapshot"):
            export_safetensors(path, tmp_path / "out.safetensors")
        with pytest.raises(UnavailableError, match="verify the snapshot"):
            rows_digest(path)
        info = _memstore("info", path)
        assert info.returncode == 0 and f"in use: open for writing by pid {os.getpid()}" in info.stdout
    export_safetensors(path, tmp_path / "out.safetensors")


def test_info_reports_a_damaged_checkpoint_and_log_instead_of_failing(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=SGD)
    with LiveTable.open(path, config=NO_CHECKPOINT) as live:
        _push(live, 1)
    (path / "checkpoint.json").write_text("[]")
    info = _memstore("info", path)
    assert info.returncode == 0 and "DAMAGED: " in info.stdout and "checkpoint.json is malformed" in info.stdout
    assert "optimizer: sgd" in info.stdout
