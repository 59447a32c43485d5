"""Re-seeding a replica over StreamSnapshot: real daemons on loopback, the tables compared byte for byte."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from memstore.codec import encode_row_ids
from memstore.create import create_table
from memstore.daemon_config import ServerConfig
from memstore.errors import DataLossError, LayoutMismatchError, MemstoreError, ResourceExhaustedError, UnavailableError
from memstore.launch import start_daemon, stop_daemon
from memstore.live import LiveConfig, LiveTable
from memstore.reseed import install_stream, reseed_from
from memstore.service import create_server
from memstore.tabledir.manifest import Init, Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc
from tests.helpers import DEADLINE_S, SMALL_LAYOUT, wait_until

LAYERS = SMALL_LAYOUT.layer_ids
DIM = SMALL_LAYOUT.dim
MANIFEST = Manifest(layout=SMALL_LAYOUT, seed=5, optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.05))
# A checkpoint every other push drops the log behind it, and a one-byte feed keeps the newest record only.
FORGETFUL = LiveConfig(durability=Durability.OS, checkpoint_every=2, feed_bytes=1)
FAST = LiveConfig(durability=Durability.OS, checkpoint_every=0)
DAEMON_FLAGS = ["--durability", "os", "--checkpoint-every", "2", "--feed-bytes", "1"]


def _push(live: LiveTable, first: int, last: int, scale: float = 1.0) -> None:
    """Pushes first..last of a deterministic sequence (scaled gradients: another trainer's pushes)."""
    for i in range(first, last + 1):
        rng = np.random.default_rng(i)
        layer = LAYERS[i % len(LAYERS)]
        ids = rng.choice(SMALL_LAYOUT.num_rows(layer), size=64, replace=False)
        grads = (scale * rng.standard_normal((64, DIM))).astype(np.float32)
        live.push(layer, ids, grads, step_id=i, client_id="trainer")


def _push_rpc(address: str, i: int) -> int:
    """One push through the daemon at `address`; the version it made."""
    layer = LAYERS[i % len(LAYERS)]
    ids = np.arange(i, i + 8)
    grads = np.full((8, DIM), float(i), dtype=np.float32)
    with grpc.insecure_channel(address) as channel:
        request = pb.PushRequest(layer_id=layer, row_ids=encode_row_ids(ids), grads=grads.tobytes(), step_id=i)
        return pb_grpc.MemstoreStub(channel).Push(request, timeout=DEADLINE_S).version


def _describe(address: str) -> pb.DescribeResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.MemstoreStub(channel).Describe(pb.DescribeRequest(), timeout=DEADLINE_S)


def _table_bytes(path: Path) -> dict[str, bytes]:
    """Every file that makes the table: manifest, rows, optimizer state, their checksums (not the daemon's
    own log, checkpoint or locks, which say where each daemon is, not what the table holds)."""
    manifest = Manifest.read(path)
    names = {"manifest.json"}
    for layer in manifest.layout.layer_ids:
        names |= {manifest.layer_file(layer)} | {name for name, _ in manifest.state_files(layer).values()}
    names |= {f"{name}.sums" for name in list(names) if (path / f"{name}.sums").exists()}
    return {name: (path / name).read_bytes() for name in sorted(names)}


def _scratch_left(primary_table: Path) -> list[str]:
    """Hidden stream copies left in the primary's snapshot directory."""
    snapshots = primary_table.with_name(primary_table.name + ".snapshots")
    return [p.name for p in snapshots.iterdir()] if snapshots.exists() else []


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A primary's table and a replica's copy of it, both at version 0."""
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    create_table(primary, MANIFEST)
    shutil.copytree(primary, replica)
    return primary, replica


@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            stop_daemon(process)


def _serve(daemons: list[subprocess.Popen], path: Path, *flags: str) -> str:
    process, address = start_daemon(path, [*DAEMON_FLAGS, *flags])
    daemons.append(process)
    return address


def _caught_up(replica: str, primary: str) -> bool:
    try:
        described = _describe(replica)
    except grpc.RpcError:  # not serving while it re-seeds
        return False
    return described.replication.serving and described.version == _describe(primary).version


def test_replica_whose_records_were_dropped_reseeds_itself_and_follows(pair, daemons) -> None:
    primary_path, replica_path = pair
    with LiveTable.open(primary_path, config=FORGETFUL) as live:
        _push(live, 1, 11)  # checkpoints dropped the log: version 1 onwards is held nowhere
    primary = _serve(daemons, primary_path)
    replica = _serve(daemons, replica_path, "--follow", primary)
    wait_until(lambda: _caught_up(replica, primary), "the replica re-seeded and caught up")
    for i in range(12, 15):  # and it follows again
        _push_rpc(primary, i)
    wait_until(lambda: _caught_up(replica, primary), "the replica followed the pushes after its re-seed")
    assert _describe(replica).version == 14
    for process in reversed(daemons):
        stop_daemon(process)
    daemons.clear()
    assert _table_bytes(replica_path) == _table_bytes(primary_path)
    assert _scratch_left(primary_path) == []


def test_deposed_primary_ahead_of_the_new_one_is_reseeded(pair, daemons) -> None:
    """A primary's pushes never streamed to anyone (it was partitioned, another was elected): its table is
    ahead, and its log's after-images cannot be undone; it rejoins by a re-seed and ends identical."""
    new_primary, old_primary = pair
    with LiveTable.open(old_primary, config=FAST) as live:
        _push(live, 1, 6, scale=3.0)  # acknowledged by nobody else
    with LiveTable.open(new_primary, config=FAST) as live:
        _push(live, 1, 3)
    primary = _serve(daemons, new_primary)
    replica = _serve(daemons, old_primary, "--follow", primary)
    wait_until(lambda: _caught_up(replica, primary), "the deposed primary re-seeded")
    assert _describe(replica).version == 3
    for process in reversed(daemons):
        stop_daemon(process)
    daemons.clear()
    assert _table_bytes(old_primary) == _table_bytes(new_primary)


def test_deposed_primary_at_the_same_version_with_other_pushes_is_reseeded(pair, daemons) -> None:
    """Killed after pushes nobody else got, while the new primary took as many others: the versions
    agree, the rows do not. The follower's last record tells them apart; it is re-seeded."""
    new_primary, old_primary = pair
    old = _serve(daemons, old_primary, "--checkpoint-every", "0")  # its log keeps every push
    for i in range(1, 5):
        _push_rpc(old, 100 + i)  # never streamed to anyone
    killed = daemons.pop()
    killed.kill()  # no checkpoint at exit either: its log still holds the records on restart
    killed.wait(DEADLINE_S)
    primary = _serve(daemons, new_primary, "--checkpoint-every", "0")
    for i in range(1, 7):
        _push_rpc(primary, i)
    replica = _serve(daemons, old_primary, "--follow", primary)
    wait_until(lambda: _caught_up(replica, primary), "the deposed primary re-seeded")
    for process in reversed(daemons):
        stop_daemon(process)
    daemons.clear()
    assert _table_bytes(old_primary) == _table_bytes(new_primary)


def test_replica_whose_table_refuses_to_open_is_reseeded(pair, daemons) -> None:
    """The data-loss refusals protect a primary's own table; a replica's is replaced by its primary's."""
    primary_path, replica_path = pair
    with LiveTable.open(replica_path, config=FAST) as live:
        _push(live, 1, 3)
    (replica_path / "checkpoint.json").write_text("damaged")  # refused: "start it with --accept-data-loss"
    with LiveTable.open(primary_path, config=FAST) as live:
        _push(live, 1, 5)
    primary = _serve(daemons, primary_path)
    replica = _serve(daemons, replica_path, "--follow", primary)
    wait_until(lambda: _caught_up(replica, primary), "the replica re-seeded")
    for process in reversed(daemons):
        stop_daemon(process)
    daemons.clear()
    assert _table_bytes(replica_path) == _table_bytes(primary_path)


def test_reseed_never_leaves_the_replica_stopped(pair, daemons) -> None:
    primary_path, replica_path = pair
    with LiveTable.open(primary_path, config=FORGETFUL) as live:
        _push(live, 1, 5)
    before = _table_bytes(replica_path)
    primary = _serve(daemons, primary_path)
    replica = _serve(daemons, replica_path, "--follow", primary, "--reseed", "never")
    wait_until(lambda: "too far behind" in _describe(replica).replication.problem, "the replica gave up")
    assert not _describe(replica).replication.serving and _describe(replica).version == 0
    stop_daemon(daemons.pop())
    assert _table_bytes(replica_path) == before


@pytest.fixture
def primary(pair) -> Iterator[tuple[str, LiveTable, Path, Path]]:
    """The primary served in this process (address, table), and the paths of both tables."""
    primary_path, replica_path = pair
    live = LiveTable.open(primary_path, config=FAST)
    _push(live, 1, 8)
    server, port = create_server(live, "127.0.0.1:0", ServerConfig(same_host=False))
    server.start()
    try:
        yield f"127.0.0.1:{port}", live, primary_path, replica_path
    finally:
        server.stop(None).wait(DEADLINE_S)
        live.close()


def test_interrupted_reseed_leaves_the_old_table_and_a_second_one_succeeds(primary) -> None:
    address, live, primary_path, replica_path = primary
    before = _table_bytes(replica_path)

    def interrupt(_bytes: int) -> None:
        raise KeyboardInterrupt  # as a Ctrl-C (or a crash) in the middle of the stream

    with pytest.raises(KeyboardInterrupt):
        reseed_from(address, replica_path, chunk_bytes=64 << 10, on_chunk=interrupt)
    assert _table_bytes(replica_path) == before
    assert [p.name for p in replica_path.parent.iterdir() if p.name.startswith(".")] == []  # staging removed
    wait_until(lambda: _scratch_left(primary_path) == [], "the primary removed its copy of the cancelled stream")
    gone = _dead_pid()
    orphan = primary_path.with_name(primary_path.name + ".snapshots") / f".stream-{gone}-abc123"
    orphan.mkdir()  # a copy left by a primary killed while streaming: removed by the next stream
    result = reseed_from(address, replica_path, chunk_bytes=64 << 10)
    assert result.version == live.version == 8 and 0 < result.data_bytes <= result.total_bytes
    live.checkpoint()
    assert _table_bytes(replica_path) == _table_bytes(primary_path)
    assert _scratch_left(primary_path) == []


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait(DEADLINE_S)
    return process.pid


def test_a_killed_reseed_process_leaves_the_old_table(primary) -> None:
    address, _live, primary_path, replica_path = primary
    before = _table_bytes(replica_path)
    reseed = subprocess.Popen(
        [sys.executable, "-m", "memstore", "reseed", str(replica_path), "--from", address],
        env=os.environ | {"PYTHONPATH": os.getcwd()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        staging = f".{replica_path.name}.reseed-{reseed.pid}"
        deadline = time.monotonic() + DEADLINE_S
        while not (replica_path.parent / staging).exists() and reseed.poll() is None:
            assert time.monotonic() < deadline, "the re-seed never began"
            time.sleep(0.001)
        reseed.kill()
    finally:
        reseed.wait(DEADLINE_S)
    assert reseed.returncode in (0, -signal.SIGKILL), reseed.stderr.read() if reseed.stderr else ""
    if reseed.returncode == 0:  # it finished before the kill landed: the table is the new one, whole
        assert Manifest.read(replica_path).fingerprint == MANIFEST.fingerprint
    else:
        assert _table_bytes(replica_path) == before
    result = reseed_from(address, replica_path)
    assert result.version == 8
    assert [p.name for p in replica_path.parent.iterdir() if p.name.startswith(".")] == []  # the killed one's too


def test_damaged_stream_is_refused_and_changes_nothing(primary) -> None:
    address, _live, _primary_path, replica_path = primary
    before = _table_bytes(replica_path)
    with grpc.insecure_channel(address, [("grpc.max_receive_message_length", -1)]) as channel:
        chunks = list(pb_grpc.MemstoreStub(channel).StreamSnapshot(pb.StreamSnapshotRequest(), timeout=DEADLINE_S))
    data = next(i for i, c in enumerate(chunks) if c.WhichOneof("part") == "data" and len(c.data.data) > 100)
    damaged = [pb.SnapshotChunk() for _ in chunks]
    for copy, chunk in zip(damaged, chunks, strict=True):
        copy.CopyFrom(chunk)
    flipped = bytearray(damaged[data].data.data)
    flipped[100] ^= 1
    damaged[data].data.data = bytes(flipped)
    with pytest.raises(DataLossError, match="arrived damaged"):
        install_stream(iter(damaged), replica_path, address)
    with pytest.raises(DataLossError, match="ended before"):
        install_stream(iter(chunks[: len(chunks) // 2]), replica_path, address)
    assert _table_bytes(replica_path) == before
    install_stream(iter(chunks), replica_path, address)  # the same stream undamaged is taken
    assert _table_bytes(replica_path) != before


def test_reseed_refuses_a_served_table_and_another_table(primary, tmp_path: Path) -> None:
    address, _live, _primary_path, replica_path = primary
    with LiveTable.open(replica_path, config=FAST):  # a daemon serves it: never replaced under it
        with pytest.raises(UnavailableError):
            reseed_from(address, replica_path)
    other = tmp_path / "other"
    create_table(other, Manifest(layout=SMALL_LAYOUT, seed=6, optimizer=MANIFEST.optimizer))
    with pytest.raises(LayoutMismatchError, match="seed"):
        reseed_from(address, other)
    assert reseed_from(address, other, allow_other_table=True).version == 8
    assert reseed_from(address, tmp_path / "new").version == 8  # a new replica's table, from nothing


def test_stream_needs_a_replicate_token_and_a_follower_slot(pair, tmp_path: Path) -> None:
    primary_path, replica_path = pair
    tokens = tmp_path / "tokens"
    tokens.write_text("read reader-token-0123456\nwrite writer-token-0123456\nreplicate replica-token-0123456\n")
    tokens.chmod(0o600)
    live = LiveTable.open(primary_path, config=FAST)
    server, port = create_server(live, "127.0.0.1:0", ServerConfig(same_host=False, token_file=tokens))
    server.start()
    full, full_port = create_server(live, "127.0.0.1:0", ServerConfig(same_host=False, max_followers=0))
    full.start()
    try:
        address = f"127.0.0.1:{port}"
        for token in (None, "reader-token-0123456", "writer-token-0123456"):
            with pytest.raises(MemstoreError, match="token"):
                reseed_from(address, replica_path, token=token)
        assert reseed_from(address, replica_path, token="replica-token-0123456").version == 0
        with pytest.raises(ResourceExhaustedError, match="--max-followers"):
            reseed_from(f"127.0.0.1:{full_port}", replica_path)
    finally:
        server.stop(None).wait(DEADLINE_S)
        full.stop(None).wait(DEADLINE_S)
        live.close()


def test_lazy_table_stays_sparse(tmp_path: Path) -> None:
    lazy = Manifest(layout=SMALL_LAYOUT, seed=5, init=Init.LAZY, optimizer=MANIFEST.optimizer)
    primary_path, replica_path = tmp_path / "primary", tmp_path / "replica"
    create_table(primary_path, lazy)
    shutil.copytree(primary_path, replica_path)
    live = LiveTable.open(primary_path, config=FAST)
    _push(live, 1, 2)
    server, port = create_server(live, "127.0.0.1:0", ServerConfig(same_host=False))
    server.start()
    try:
        result = reseed_from(f"127.0.0.1:{port}", replica_path)
        live.checkpoint()
    finally:
        server.stop(None).wait(DEADLINE_S)
        live.close()
    assert result.data_bytes < result.total_bytes  # holes were not sent
    assert _table_bytes(replica_path) == _table_bytes(primary_path)
    for layer in LAYERS:  # and not written: the replica's files take what the primary's take on disk
        name = lazy.layer_file(layer)
        assert (replica_path / name).stat().st_blocks == (primary_path / name).stat().st_blocks
        with LiveTable.open(replica_path, read_only=True) as copy, LiveTable.open(primary_path, read_only=True) as src:
            ids = np.arange(SMALL_LAYOUT.num_rows(layer))
            assert copy.table.store(layer).gather(ids).tobytes() == src.table.store(layer).gather(ids).tobytes()
