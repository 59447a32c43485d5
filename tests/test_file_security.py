"""What another local user, or a planted file, can do to a table: private modes, safe temp files, snapshot names.

Each test here failed on the code before its fix: tables were created with the umask's modes
(644 rows and log), temp files were opened through whatever sat at ``DEST.tmp``, snapshot names
could hold newlines, and a destination that appeared during a long copy was replaced.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import MemstoreClient
from memstore.cli import main
from memstore.daemon_config import ServerConfig
from memstore.errors import InvalidArgumentError, ResourceExhaustedError
from memstore.exchange import export_safetensors
from memstore.live import LiveConfig, LiveTable
from memstore.reshard import reshard
from memstore.service import SERVICE_NAME, create_server
from memstore.space import DiskFullError
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from memstore.wire import memstore_pb2 as pb
from tests.helpers import FAST_FAIL, SMALL_LAYOUT, make_table

LAYER = 1
DIM = SMALL_LAYOUT.dim
SGD = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)
GRPC = replace(FAST_FAIL, same_host=False, max_attempts=1)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask a user could run with: what memstore makes must not depend on it."""
    saved = os.umask(0)
    try:
        yield
    finally:
        os.umask(saved)


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of every entry under `root` (itself included), by relative path."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def _assert_modes(root: Path, dir_mode: int, file_mode: int) -> None:
    wrong = {
        name: oct(mode)
        for name, mode in _modes(root).items()
        if mode != (dir_mode if (root / name).is_dir() else file_mode)
    }
    assert not wrong, f"under {root}, expected dirs {oct(dir_mode)} and files {oct(file_mode)}: {wrong}"


@pytest.fixture
def served(tmp_path: Path):
    """(address, LiveTable, snapshot dir) of a trainable table served in-process; `start(config)` starts it."""
    path = make_table(tmp_path / "t", seed=1, optimizer=SGD)
    live = LiveTable.open(path, config=LiveConfig(durability=Durability.OS))
    servers = []

    def start(**config) -> str:
        server, port = create_server(live, "127.0.0.1:0", ServerConfig(snapshot_dir=tmp_path / "snaps", **config))
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start, live, tmp_path / "snaps"
    for server in servers:
        server.stop(None).wait()
    live.close()


# -- private files ------------------------------------------------------------------------------------


def test_a_trained_table_and_its_snapshot_are_private_whatever_the_umask(tmp_path, open_umask) -> None:
    """Rows, optimizer state, sums, log segments, checkpoint, seqlock, writer.lock: 0600 in 0700 directories."""
    path = make_table(tmp_path / "t", seed=1, optimizer=SGD)
    with LiveTable.open(path, config=LiveConfig(durability=Durability.OS)) as live:
        live.push(LAYER, np.arange(4), np.ones((4, DIM), np.float32))
        live.checkpoint()
        live.push(LAYER, np.arange(4), np.ones((4, DIM), np.float32))  # a log segment past the checkpoint
        live.snapshot(tmp_path / "snaps" / "one")
        names = {name for name in _modes(path)}
        assert {"writer.lock", "checkpoint.json", "manifest.json"} <= names and any(n.startswith("wal/") for n in names)
        _assert_modes(path, 0o700, 0o600)
    _assert_modes(tmp_path / "snaps", 0o700, 0o600)


def test_the_cli_creates_private_tables_and_group_readable_ones_on_request(tmp_path, open_umask, capsys) -> None:
    args = ["--layers", "1", "--vocab-size-per-ngram", "300,300", "--dim", "8", "--no-progress"]
    assert main(["create", str(tmp_path / "private"), *args]) == 0
    _assert_modes(tmp_path / "private", 0o700, 0o600)
    assert main(["create", str(tmp_path / "shared"), *args, "--group-readable", "--shards", "2"]) == 0
    _assert_modes(tmp_path / "shared", 0o750, 0o640)
    assert os.umask(0) == 0  # the command put the caller's umask back


def test_an_export_is_private_and_never_writes_through_a_planted_tmp_link(tmp_path, open_umask) -> None:
    path = make_table(tmp_path / "t")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "out.safetensors"
    (tmp_path / "out.safetensors.tmp").symlink_to(victim)  # another user's link at the old, fixed temp name
    export_safetensors(path, dest)
    assert victim.read_bytes() == b"precious"
    assert not dest.is_symlink() and stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_a_planted_checkpoint_tmp_link_is_not_followed(tmp_path) -> None:
    path = make_table(tmp_path / "t", seed=1, optimizer=SGD)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (path / "checkpoint.json.tmp").symlink_to(victim)
    with LiveTable.open(path, config=LiveConfig(durability=Durability.OS)) as live:
        live.push(LAYER, np.arange(4), np.ones((4, DIM), np.float32))
        live.checkpoint()
    assert victim.read_bytes() == b"precious"
    assert not (path / "checkpoint.json").is_symlink()


# -- destinations that appear during a long copy ------------------------------------------------------


def test_reshard_never_replaces_what_appeared_at_the_destination_during_the_copy(tmp_path) -> None:
    source = make_table(tmp_path / "src")
    dest = tmp_path / "dest"

    def someone_creates_dest(rows: int) -> None:
        if not dest.exists():
            dest.mkdir()
            (dest / "precious").write_text("theirs")

    with pytest.raises(InvalidArgumentError, match="appeared while the new table was being written"):
        reshard(source, dest, 2, progress=someone_creates_dest)
    assert (dest / "precious").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]  # no staging debris


# -- snapshots -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a\nINFO forged line", "a b", "é", "x" * 101, "a.b", ""])
def test_snapshot_names_outside_the_rule_are_invalid_and_say_the_rule(served, name) -> None:
    start, _, snaps = served
    with MemstoreClient(start(), GRPC) as client:
        with pytest.raises(InvalidArgumentError, match=r"1 to 100 characters, each a letter, a digit, '_' or '-'"):
            client.snapshot(name)
        assert client.snapshot("x" * 100)[1] == 0  # the longest allowed
    assert [p.name for p in snaps.iterdir()] == ["x" * 100]


def test_a_dangling_link_at_the_snapshot_name_is_invalid_argument_not_internal(served, tmp_path) -> None:
    start, _, snaps = served
    snaps.mkdir()
    (snaps / "taken").symlink_to(tmp_path / "nowhere")
    with MemstoreClient(start(), GRPC) as client:
        with pytest.raises(InvalidArgumentError, match="exists; snapshots never overwrite"):
            client.snapshot("taken")
    assert sorted(p.name for p in snaps.iterdir()) == ["taken"]  # no staging debris


def test_snapshots_past_max_snapshots_are_refused_with_how_to_delete_them(served) -> None:
    start, _, snaps = served
    with MemstoreClient(start(max_snapshots=2), GRPC) as client:
        client.snapshot("one")
        client.snapshot("two")
        with pytest.raises(ResourceExhaustedError, match=r"--max-snapshots 2\): delete old ones \(rm -r"):
            client.snapshot("three")
        (snaps / "one").rename(snaps / ".deleted")  # hidden entries are not snapshots
        assert client.snapshot("three")[1] == 0
    assert sorted(p.name for p in snaps.iterdir()) == [".deleted", "three", "two"]


def test_a_snapshot_larger_than_the_free_space_is_refused_before_copying(tmp_path) -> None:
    from tests.test_disk_faults import small_disk

    with small_disk(tmp_path / "disk", 256 << 10) as disk:
        path = make_table(tmp_path / "t", seed=1, optimizer=SGD)  # ~300 KB of rows: more than the disk
        with LiveTable.open(path, config=LiveConfig(durability=Durability.OS)) as live:
            with pytest.raises(DiskFullError, match=r"the snapshot snap needs [\d,]+ bytes"):
                live.snapshot(disk / "snap")
        assert list(disk.iterdir()) == []  # refused before a byte was copied


def test_a_snapshot_onto_another_file_system_is_copied(tmp_path) -> None:
    """copy_file_range refuses (EXDEV) between some file systems: the snapshot failed with INTERNAL."""
    from tests.test_disk_faults import small_disk

    with small_disk(tmp_path / "disk", 8 << 20) as disk:
        path = make_table(tmp_path / "t", seed=1, optimizer=SGD)
        with LiveTable.open(path, config=LiveConfig(durability=Durability.OS)) as live:
            live.push(LAYER, np.arange(4), np.ones((4, DIM), np.float32))
            assert live.snapshot(disk / "snap") == 1
            ids = np.arange(8)
            with LiveTable.open(disk / "snap", read_only=True) as snap:
                np.testing.assert_array_equal(snap.gather(LAYER, ids)[0], live.gather(LAYER, ids)[0])


def test_a_follower_id_with_a_newline_cannot_forge_a_log_line(served, caplog) -> None:
    start, live, _ = served
    forged = "r1\nERROR memstore.service: forged"
    request = pb.FollowRequest(manifest_json=live.manifest.to_json(), heartbeat_s=0.05, follower_id=forged)
    with grpc.insecure_channel(start()) as channel, caplog.at_level(logging.INFO, logger="memstore.service"):
        follow = channel.unary_stream(
            f"/{SERVICE_NAME}/Follow",
            request_serializer=pb.FollowRequest.SerializeToString,
            response_deserializer=pb.FollowResponse.FromString,
        )
        stream = follow(request, timeout=30)
        next(stream)  # the first heartbeat: the daemon has logged the follower by then
        stream.cancel()
    lines = [line for record in caplog.records for line in record.getMessage().splitlines()]
    assert any("'r1\\nERROR memstore.service: forged'" in line for line in lines), lines
    assert not any(line.startswith("ERROR memstore.service: forged") for line in lines), lines
