"""The table directory's contract (memstore.tabledir, docs/format.md): the names on disk, durable writes that
leave the old file or the new one and no temp file, staging that leaves nothing behind, and a format
package that reading a table does not pay for with the server's engine."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memstore.errors import InvalidArgumentError, TableFormatError
from memstore.tabledir import names
from memstore.tabledir.checkpoint import Checkpoint, PushResult
from memstore.tabledir.fsafe import fsync_dir, write_durably, writing_durably
from memstore.tabledir.lock import record_writer_pid, writer_pid
from memstore.tabledir.manifest import Backend, Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.tabledir.seqlock import SeqLock
from memstore.tabledir.staging import publish_dir, replace_table_dir, staged, staging_dir
from memstore.tabledir.sums import write_sums_file
from tests.helpers import SMALL_LAYOUT, make_table

ADAM = OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.01)


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- names ----------------------------------------------------------------------------------------


def test_the_names_on_disk_are_the_ones_tables_were_written_with() -> None:
    """Every table written so far opens by these names: they are the format, spelled out here on purpose."""
    assert (names.MANIFEST_NAME, names.CHECKPOINT_NAME, names.SEQLOCK_NAME) == (
        "manifest.json",
        "checkpoint.json",
        "seqlock",
    )
    assert (names.WAL_DIR, names.WRITER_LOCK_NAME) == ("wal", "writer.lock")
    assert names.layer_file(4, lmdb=False) == "layer_4.rows"
    assert names.layer_file(4, lmdb=True) == "layer_4.lmdb"
    assert names.state_file(4, "exp_avg_sq", lmdb=False) == "layer_4.exp_avg_sq.f32"
    assert names.state_file(4, "sum", lmdb=True) == "layer_4.sum.f32.lmdb"
    assert names.sums_path(Path("t/layer_1.rows")) == Path("t/layer_1.rows.sums")
    assert names.shard_name(12) == "shard-12"
    assert names.staging_name("t", "creating") == f".t.creating-{os.getpid()}"
    assert names.temp_name("checkpoint.json", "ab12") == "checkpoint.json.ab12.tmp"


@pytest.mark.parametrize("backend", [Backend.MMAP, Backend.LMDB])
def test_the_manifest_names_its_files_from_the_names_module(backend: Backend) -> None:
    manifest = Manifest(layout=SMALL_LAYOUT, backend=backend, optimizer=ADAM)
    lmdb = backend is Backend.LMDB
    for layer in SMALL_LAYOUT.layer_ids:
        assert manifest.layer_file(layer) == names.layer_file(layer, lmdb)
        assert manifest.state_files(layer) == {
            slot: (names.state_file(layer, slot, lmdb), SMALL_LAYOUT.dim) for slot in ("exp_avg", "exp_avg_sq")
        }
    assert json.loads(manifest.to_json())["files"] == {
        str(layer): names.layer_file(layer, lmdb) for layer in SMALL_LAYOUT.layer_ids
    }


def test_shard_dirs_lists_whole_runs_of_shards_with_manifests_only(tmp_path: Path) -> None:
    for shard in (0, 1, 2):
        (tmp_path / names.shard_name(shard)).mkdir()
        (tmp_path / names.shard_name(shard) / names.MANIFEST_NAME).write_text("{}")
    (tmp_path / "shard-x").mkdir()  # not a shard number: ignored
    assert names.shard_dirs(tmp_path) == [tmp_path / f"shard-{k}" for k in range(3)]
    (tmp_path / "shard-1" / names.MANIFEST_NAME).unlink()  # a gap: not a sharded table
    assert names.shard_dirs(tmp_path) == []


# --- durable writes -------------------------------------------------------------------------------


def test_write_durably_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    write_durably(path, b"new")
    assert path.read_bytes() == b"new" and _entries(tmp_path) == ["f"]


def test_a_failing_streamed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="No space"):
        with writing_durably(path) as f:
            f.write(b"half of the new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_bytes() == b"old" and _entries(tmp_path) == ["f"]


def test_a_failing_sync_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed fsync says the new bytes may not be on disk: the file must not be replaced by them."""
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        write_durably(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and _entries(tmp_path) == ["f"]


def test_a_failing_checksum_sidecar_write_leaves_no_temp_file(tmp_path: Path) -> None:
    """The sidecar writer streams through the one durable write: an error midway leaves nothing half written
    (before, its temp file stayed behind)."""
    rows = np.zeros((3, 4), dtype="<f4")
    with pytest.raises(TableFormatError, match="3 rows were checksummed where the store has 5"):
        write_sums_file(tmp_path / "layer_1.rows.sums", 5, 16, iter([rows]))
    assert _entries(tmp_path) == []


def test_checkpoint_seqlock_and_pid_files_round_trip_without_temp_files(tmp_path: Path) -> None:
    checkpoint = Checkpoint(7, {1: 3, 4: 2}, {("trainer", 1): (9, PushResult(7, 3, 12))})
    checkpoint.write(tmp_path)
    assert Checkpoint.read(tmp_path) == checkpoint
    seqlock = SeqLock(tmp_path / names.SEQLOCK_NAME, create=True)
    try:
        assert seqlock.read() == 0
        seqlock.set(14)
        assert (tmp_path / names.SEQLOCK_NAME).read_bytes() == (14).to_bytes(8, "little")
    finally:
        seqlock.close()
    record_writer_pid(tmp_path)
    assert writer_pid(tmp_path) == os.getpid()
    assert _entries(tmp_path) == sorted([names.CHECKPOINT_NAME, names.SEQLOCK_NAME, names.WRITER_LOCK_NAME])


def test_fsync_dir_syncs_directories_only(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")


# --- staging --------------------------------------------------------------------------------------


def test_a_failing_staged_build_leaves_nothing_beside_the_target(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="interrupted"):
        with staged(tmp_path / "t", "creating") as tmp:
            (tmp / "layer_1.rows").write_bytes(b"x" * 64)
            raise RuntimeError("interrupted")
    assert _entries(tmp_path) == []


def test_a_staging_directory_left_by_this_process_is_started_afresh(tmp_path: Path) -> None:
    first = staging_dir(tmp_path / "t", "creating")
    (first / "stale").write_bytes(b"from an interrupted build")
    again = staging_dir(tmp_path / "t", "creating")
    assert again == first == tmp_path / names.staging_name("t", "creating") and _entries(again) == []


def test_publish_never_replaces_what_appeared_at_the_target(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "precious").write_bytes(b"keep")
    with pytest.raises(InvalidArgumentError, match="appeared while the new table was being written"):
        with staged(tmp_path / "t", "snapshot-1") as tmp:
            publish_dir(tmp, tmp_path / "t")
    assert _entries(tmp_path) == ["t"] and (tmp_path / "t" / "precious").read_bytes() == b"keep"


def test_an_overwrite_replaces_a_table_and_nothing_else(tmp_path: Path) -> None:
    old = make_table(tmp_path / "t", seed=1)
    new = make_table(tmp_path / "u", seed=2)
    replace_table_dir(new, old, overwrite=True)
    assert Manifest.read(old).seed == 2 and _entries(tmp_path) == ["t"]
    (tmp_path / "notes").mkdir()
    other = make_table(tmp_path / "v", seed=3)
    with pytest.raises(InvalidArgumentError, match="is not a memstore table"):
        replace_table_dir(other, tmp_path / "notes", overwrite=True)
    assert _entries(tmp_path) == ["notes", "t", "v"]


# --- what reading the format loads ----------------------------------------------------------------

_SERVER_MODULES = [
    "memstore.live",
    "memstore.wal",
    "memstore.optim",
    "memstore.create",
    "memstore.integrity",
    "memstore.reshard",
    "memstore.replica",
    "memstore.service",
    "memstore.daemon",
    "memstore.dataplane.server",
    "memstore.storage.lmdb_store",
    "lmdb",
    "tqdm",
    "prometheus_client",
]


def _loaded(statement: str, modules: list[str]) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after `statement`."""
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()


def test_reading_the_table_format_loads_no_server_engine() -> None:
    """A client maps a table by its manifest, checkpoint and sequence lock (and a tool may read its checksum
    sidecars and log segments): none of them may pull in the log, the optimizer arithmetic, the integrity engine
    or the daemon."""
    statement = (
        "import memstore.tabledir.manifest, memstore.tabledir.seqlock, memstore.tabledir.checkpoint, "
        "memstore.tabledir.sums, memstore.tabledir.walformat"
    )
    assert _loaded(statement, _SERVER_MODULES) == []


def test_layers_point_down_reshard_without_the_daemon_and_the_daemon_without_create() -> None:
    assert _loaded("import memstore.reshard", ["memstore.live", "memstore.service"]) == []
    assert _loaded("import memstore.live", ["memstore.create", "memstore.exchange", "memstore.reshard"]) == []
