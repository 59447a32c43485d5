"""Row checksums (memstore.integrity): damage is found on read, by the scrub, by verify, by snapshots."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import ClientConfig, MemstoreClient
from memstore.cli import main as cli_main
from memstore.create import create_table
from memstore.daemon_config import ServerConfig
from memstore.dtypes import DType
from memstore.errors import DataLossError, InvalidArgumentError, TableFormatError
from memstore.integrity import IntegrityConfig, verify_table
from memstore.live import LiveConfig, LiveTable
from memstore.service import create_server
from memstore.storage.lmdb_store import LmdbRowStore
from memstore.tabledir.manifest import Backend, Init, Manifest
from memstore.tabledir.names import MANIFEST_NAME, WAL_DIR, sums_path
from memstore.tabledir.optimizer import OptimizerConfig
from memstore.tabledir.sums import BLOCK_ROWS, row_checksums
from memstore.wal import Durability
from tests.helpers import SMALL_LAYOUT, make_table

ADAM = OptimizerConfig(kind="adam", lr=0.01)
DIM = SMALL_LAYOUT.dim
ROW_BYTES = DType.FLOAT16.row_bytes(DIM)
NO_SCRUB = LiveConfig(integrity=IntegrityConfig(scrub_period_s=0))


def _flip(path: Path, row: int, row_bytes: int = ROW_BYTES, offset: int = 3) -> None:
    """Flip one byte of a row in a file, as a failing disk or a stray write would (the page cache is shared)."""
    fd = os.open(path, os.O_RDWR)
    try:
        position = row * row_bytes + offset
        (byte,) = os.pread(fd, 1, position)
        os.pwrite(fd, bytes([byte ^ 0x5A]), position)
    finally:
        os.close(fd)


def _grads(count: int, value: float = 0.5) -> np.ndarray:
    return np.full((count, DIM), value, dtype=np.float32)


def _wait(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- the checksum


def test_any_single_word_change_changes_the_checksum() -> None:
    rng = np.random.default_rng(0)
    for row_bytes in (32, 12, 6, 5):  # 8-, 4-, 2- and 1-byte words
        rows = rng.integers(0, 256, size=(64, row_bytes), dtype=np.uint8)
        base = row_checksums(rows)
        for position in range(row_bytes):
            for bit in (0, 7):
                changed = rows.copy()
                changed[:, position] ^= np.uint8(1 << bit)
                assert (row_checksums(changed) != base).all(), (row_bytes, position, bit)
    assert (row_checksums(np.zeros((3, 40), dtype=np.uint8)) == 0).all()  # sparse (never written) rows sum to 0


# --------------------------------------------------------------------------- a running daemon


@pytest.fixture
def serving(tmp_path: Path) -> Iterator:
    """Start a daemon on a trainable table (same-host reads off: every lookup goes through the daemon)."""
    started = []

    def start(path: Path, scrub_period_s: float) -> tuple[LiveTable, str]:
        live = LiveTable.open(path, config=LiveConfig(integrity=IntegrityConfig(scrub_period_s=scrub_period_s)))
        server, port = create_server(live, "127.0.0.1:0", ServerConfig(same_host=False))
        server.start()
        started.append((server, live))
        return live, f"127.0.0.1:{port}"

    yield start
    for server, live in started:
        server.stop(grace=None).wait()
        live.close()


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


CLIENT = ClientConfig(timeout_s=10, max_attempts=1, same_host=False)


def test_flipped_bytes_answer_data_loss_for_their_rows_and_other_rows_are_served(serving, tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    live, address = serving(path, scrub_period_s=0)  # no scrub: the read itself finds the damage
    damaged_row = 3 * BLOCK_ROWS + 17
    _flip(path / "layer_1.rows", damaged_row)
    with MemstoreClient(address, CLIENT) as client:
        with pytest.raises(DataLossError, match=rf"layer 1 rows {damaged_row} .*damaged blocks of layer_1\.rows"):
            client.lookup(1, np.array([damaged_row]))
        neighbour = damaged_row + 1  # same block: its rows are not served either
        with pytest.raises(DataLossError):
            client.lookup(1, np.array([5, neighbour]))
        healthy = np.array([0, 5, 4 * BLOCK_ROWS + 1])
        served = client.lookup(1, healthy).numpy()
        np.testing.assert_array_equal(served, live.table.store(1).gather(healthy))
        assert client.lookup(4, np.array([damaged_row])).shape == (1, DIM)  # the other layer's file is intact
        with pytest.raises(DataLossError):  # a push never reads (and logs, and replicates) damaged rows
            client.push(1, np.array([damaged_row]), _grads(1))
        assert client.version() == 0
    assert _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_the_scrub_finds_damage_in_rows_already_read_and_health_turns_not_serving(serving, tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    live, address = serving(path, scrub_period_s=0.4)
    row = 2 * BLOCK_ROWS + 5
    with MemstoreClient(address, CLIENT) as client:
        client.lookup(1, np.array([row]))  # verified now: later reads cost one flag lookup
        client.push(1, np.array([row, row + 1]), _grads(2))  # pushes keep the checksums current
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING
        passes = live.integrity.scrub_passes
        _wait(lambda: live.integrity.scrub_passes > passes, "a clean scrub pass")
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING
        _flip(path / "layer_1.rows", row + 1)
        _wait(lambda: _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING")
        with pytest.raises(DataLossError, match="layer 1 rows"):
            client.lookup(1, np.array([row]))
        assert client.lookup(1, np.array([0])).shape == (1, DIM)


def test_memstore_serve_with_a_short_scrub_period_turns_not_serving(tmp_path: Path) -> None:
    """Through the command line: `memstore serve --scrub-period-s`, a subprocess."""
    path = make_table(tmp_path / "t", optimizer=ADAM)
    port_file = tmp_path / "port"
    cmd = [sys.executable, "-m", "memstore", "serve", str(path), "--listen", "127.0.0.1:0"]
    cmd += ["--port-file", str(port_file), "--scrub-period-s", "0.3", "--no-same-host"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: port_file.exists() and port_file.read_text().endswith("\n"), "the daemon's port")
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING
        _flip(path / "layer_4.exp_avg.f32.sums", 0, offset=64)  # a damaged checksum is damage too
        _wait(lambda: _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING")
        with MemstoreClient(address, CLIENT) as client:
            with pytest.raises(DataLossError, match="optimizer state 'exp_avg'"):
                client.push(4, np.array([0]), _grads(1))
            assert client.lookup(4, np.array([0])).shape == (1, DIM)  # the rows themselves are intact
    finally:
        child.terminate()
        try:
            output, _ = child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            output, _ = child.communicate()
    assert b"DATA LOSS" in output


# --------------------------------------------------------------------------- pushes, replicas, snapshots


def test_pushes_replays_and_checkpoints_keep_the_checksums_current(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    rng = np.random.default_rng(1)
    with LiveTable.open(path, config=replace(NO_SCRUB, checkpoint_every=3)) as live:
        for _ in range(10):
            ids = rng.choice(live.manifest.stored_rows(1), size=40, replace=False)
            live.push(1, ids, rng.standard_normal((40, DIM)).astype(np.float32))
        assert live.integrity.verify_all() == []
    assert verify_table(path, Manifest.read(path)) == []


def test_a_replicated_record_onto_a_damaged_block_leaves_the_damage_visible(tmp_path: Path) -> None:
    """A record rewrites the checksums of the rows it writes only, never its whole block from the file."""
    primary_path = make_table(tmp_path / "p", optimizer=ADAM)
    replica_path = make_table(tmp_path / "r", optimizer=ADAM)
    damaged = BLOCK_ROWS + 3
    _flip(replica_path / "layer_1.rows", damaged)
    with LiveTable.open(primary_path, config=NO_SCRUB) as primary:
        primary.push(1, np.array([damaged + 1, damaged + 2]), _grads(2))
        (record,) = primary.records_after(0, 1 << 20, 0)
    with LiveTable.open(replica_path, config=NO_SCRUB, primary="primary:1") as replica:
        replica.apply_replicated(record.version, record.payload)
        (found,) = replica.integrity.verify_all()
        assert (found.layer, found.slot, found.rows) == (1, None, [damaged])


def test_a_snapshot_never_copies_damage(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    with LiveTable.open(path, config=NO_SCRUB) as live:
        live.push(1, np.array([1, 2, 3]), _grads(3))
        live.snapshot(tmp_path / "good")
        _flip(path / "layer_4.exp_avg_sq.f32", 7, row_bytes=4 * DIM)  # never read since: not known yet
        assert live.integrity.intact
        with pytest.raises(DataLossError, match=r"copied damaged rows: layer 4 optimizer state 'exp_avg_sq' 7 in"):
            live.snapshot(tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
        assert not live.integrity.intact  # the source's block was checked again and marked
        with pytest.raises(DataLossError, match="a snapshot would copy"):
            live.snapshot(tmp_path / "bad2")
    assert verify_table(tmp_path / "good", Manifest.read(tmp_path / "good")) == []


# --------------------------------------------------------------------------- verify (offline)


def test_verify_tells_a_trained_table_from_a_damaged_one(tmp_path: Path, capsys) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    with LiveTable.open(path, config=NO_SCRUB) as live:
        for step in range(3):
            live.push(1, np.arange(step * 10, step * 10 + 10), _grads(10))
    assert cli_main(["verify", str(path), "--no-progress"]) == 0
    assert "intact: trained (3 pushes" in capsys.readouterr().out
    _flip(path / "layer_1.exp_avg.f32", 12, row_bytes=4 * DIM)
    assert cli_main(["verify", str(path), "--no-progress"]) == 2
    assert "damaged: layer 1 optimizer state 'exp_avg' 12 in layer_1.exp_avg.f32" in capsys.readouterr().err


def test_verify_without_checksums_says_it_cannot_tell_for_a_trained_table(tmp_path: Path, capsys) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    with LiveTable.open(path, config=NO_SCRUB) as live:
        live.push(1, np.arange(4), _grads(4))
    for sums in path.glob("*.sums"):
        sums.unlink()
    assert cli_main(["verify", str(path), "--no-progress"]) == 3
    assert "cannot verify: trained (1 pushes)" in capsys.readouterr().err


@pytest.mark.parametrize("backend", [Backend.MMAP, Backend.LMDB], ids=lambda b: b.value)
def test_rows_changed_behind_the_table_are_found_on_both_backends(tmp_path: Path, backend: Backend) -> None:
    manifest = Manifest(layout=SMALL_LAYOUT, backend=backend, optimizer=ADAM)
    path = create_table(tmp_path / "t", manifest)
    with LiveTable.open(path, config=NO_SCRUB) as live:
        live.push(4, np.arange(100, 110), _grads(10))
    # Bytes changed without the table knowing: a store opened on its own (valid LMDB, wrong rows).
    store_path = path / manifest.layer_file(4)
    if backend is Backend.LMDB:
        store = LmdbRowStore(store_path, manifest.stored_rows(4), DIM, DType.FLOAT16, read_only=False)
    else:
        from memstore.storage import MmapRowStore

        store = MmapRowStore(store_path, manifest.stored_rows(4), DIM, DType.FLOAT16, read_only=False)
    store.update(np.array([105, 900]), np.ones((2, DIM), dtype=np.float16))
    store.close()
    (found,) = verify_table(path, Manifest.read(path))
    assert (found.file, found.rows) == (manifest.layer_file(4), [105, 900])
    with LiveTable.open(path, config=NO_SCRUB) as live:
        with pytest.raises(DataLossError, match="layer 4 rows 900"):
            live.gather(4, np.array([900]))
        assert live.gather(4, np.array([2 * BLOCK_ROWS]))[0].shape == (1, DIM)  # another block


def test_a_lazy_table_checks_written_and_never_written_rows(tmp_path: Path) -> None:
    manifest = Manifest(layout=SMALL_LAYOUT, init=Init.LAZY, optimizer=OptimizerConfig(kind="sgd", lr=0.1))
    path = create_table(tmp_path / "t", manifest)
    with LiveTable.open(path, config=NO_SCRUB) as live:
        live.push(1, np.array([10, 11]), np.zeros((2, DIM), dtype=np.float32))  # all-zero rows are stored as -0.0
        live.push(1, np.array([12]), _grads(1))
    assert verify_table(path, Manifest.read(path)) == []
    _flip(path / "layer_1.rows", 12)
    _flip(path / "layer_1.rows", 3000)  # inside a hole: never written, its bytes must stay zero
    (found,) = verify_table(path, Manifest.read(path))
    assert found.rows == [12, 3000]


# --------------------------------------------------------------------------- files ahead of the log


_CRASH = """
import os, sys, numpy as np
from memstore.live import LiveConfig, LiveTable
from memstore.wal import Durability
live = LiveTable.open(sys.argv[1], config=LiveConfig(durability=Durability.OS, checkpoint_every=0))
for step in range(10):
    if step == 9:  # the log as the disk held it when the host crashed: push 10 never reached it
        print({p.name: p.stat().st_size for p in (live.path / "wal").iterdir()}, flush=True)
    live.push(1, np.arange(step * 3, step * 3 + 3), np.ones((3, live.manifest.layout.dim), np.float32))
os._exit(0)  # the daemon dies: no checkpoint; the mapped pages (rows and checksums) kept push 10
"""


def test_files_ahead_of_the_log_are_refused_on_start(tmp_path: Path, caplog) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    out = subprocess.run([sys.executable, "-c", _CRASH, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    sizes = eval(out.stdout.strip())  # noqa: S307 (our own child's dict of file sizes)
    for segment in (path / WAL_DIR).iterdir():  # the host crash: the log's tail was only in the page cache
        if segment.name in sizes:
            os.truncate(segment, sizes[segment.name])
        else:
            segment.unlink()
    # ... and so was the seqlock page that recorded push 10's acknowledgement (memstore.recovery reads it)
    (path / "seqlock").write_bytes((2 * 9).to_bytes(8, "little"))
    with pytest.raises(DataLossError, match=r"files hold pushes past version 9.*versions up to 10"):
        LiveTable.open(path, config=NO_SCRUB)
    config = replace(NO_SCRUB, durability=Durability.OS, accept_data_loss=True)  # `serve --accept-data-loss`
    with caplog.at_level(logging.ERROR, "memstore.integrity"), LiveTable.open(path, config=config) as live:
        assert live.version == 9
        assert "(accepted)" in caplog.text
    with LiveTable.open(path, config=NO_SCRUB) as live:  # accepted once: the next start is clean
        assert live.version == 9


# --------------------------------------------------------------------------- tables without checksums


def test_a_table_without_checksums_gets_them_on_its_first_writable_open(tmp_path: Path, caplog) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    for sums in path.glob("*.sums"):
        sums.unlink()
    with caplog.at_level(logging.WARNING, "memstore.integrity"), LiveTable.open(path, read_only=True) as live:
        assert live.integrity is None
    assert "damage is not detected" in caplog.text
    with caplog.at_level(logging.WARNING, "memstore.integrity"), LiveTable.open(path, config=NO_SCRUB) as live:
        assert live.integrity is not None
    assert "building them from the rows as they are now" in caplog.text
    assert verify_table(path, Manifest.read(path)) == []


def test_an_untrained_table_without_checksums_and_damaged_rows_is_refused(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    for sums in path.glob("*.sums"):
        sums.unlink()
    _flip(path / "layer_4.rows", 50)
    with pytest.raises(DataLossError, match="do not match the sha256 recorded at create"):
        LiveTable.open(path, config=NO_SCRUB)
    assert not list(path.glob("*.sums"))  # damage never becomes the reference


def test_integrity_off_removes_the_checksums_and_a_checked_start_rebuilds_them(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    off = LiveConfig(integrity=IntegrityConfig(enabled=False))
    with LiveTable.open(path, config=off) as live:
        assert live.integrity is None
        live.push(1, np.arange(5), _grads(5))  # not recorded: stale checksums would read as damage later
    assert not list(path.glob("*.sums"))
    with LiveTable.open(path, config=NO_SCRUB) as live:
        assert live.integrity.verify_all() == []


def test_a_damaged_sidecar_header_is_data_loss(tmp_path: Path) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    sums = sums_path(path / "layer_1.rows")
    os.truncate(sums, sums.stat().st_size - 8)
    with pytest.raises(DataLossError, match="checksum file .*layer_1.rows.sums holds"):
        LiveTable.open(path, config=NO_SCRUB)


# --------------------------------------------------------------------------- the manifest


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", "bfloat16"), ("init_std", 0.5), ("optimizer", None), ("rows_sha256", "0" * 64)],
)
def test_an_edited_manifest_field_is_named(tmp_path: Path, field: str, value: object) -> None:
    path = make_table(tmp_path / "t", optimizer=ADAM)
    data = json.loads((path / MANIFEST_NAME).read_text())
    data[field] = value  # each is still a valid manifest on its own: only the checksums tell
    (path / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    with pytest.raises(TableFormatError, match=f"edited after memstore wrote it: {field} no longer match"):
        Manifest.read(path)


def test_a_manifest_without_checksums_is_still_read(tmp_path: Path) -> None:
    """`import --manifest` takes hand-written manifests; older tables have none."""
    manifest = Manifest(layout=SMALL_LAYOUT)
    data = json.loads(manifest.to_json())
    del data["checksums"]
    assert Manifest.from_json(json.dumps(data)) == manifest


@pytest.mark.parametrize("std", [float("nan"), float("inf"), -1.0])
def test_a_non_finite_or_negative_init_std_is_rejected(tmp_path: Path, std: float, capsys) -> None:
    with pytest.raises(InvalidArgumentError, match="init_std"):
        Manifest(layout=SMALL_LAYOUT, init_std=std)
    sizes = ["--layers", "1", "--vocab-size-per-ngram", "50,70", "--dim", "8"]
    code = cli_main(["create", str(tmp_path / "t"), *sizes, "--init-std", str(std), "--no-progress"])
    assert code == 2
    assert "init_std" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------- sparse checksum files


def test_a_sparse_checksum_file_gets_disk_before_a_push_is_logged(tmp_path: Path, monkeypatch) -> None:
    """A lazy table's checksum file stays sparse, like its rows; a push reserves the pages it writes first,
    so a full disk fails the push cleanly (nothing logged or applied) instead of SIGBUS on a write through
    the map."""
    import errno

    from memstore.space import DiskFullError

    manifest = Manifest(layout=SMALL_LAYOUT, init=Init.LAZY, optimizer=OptimizerConfig(kind="sgd", lr=0.1))
    path = create_table(tmp_path / "t", manifest)
    sums = sums_path(path / "layer_1.rows")
    assert sums.stat().st_blocks * 512 < sums.stat().st_size  # sparse
    real_fallocate = os.posix_fallocate

    def full_disk(fd: int, offset: int, length: int) -> None:  # for the checksum files only: rows still fit
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".sums"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fallocate(fd, offset, length)

    with LiveTable.open(path, config=NO_SCRUB) as live:
        monkeypatch.setattr(os, "posix_fallocate", full_disk)
        with pytest.raises(DiskFullError, match=r"is full.*a push \(its rows' checksums\) was refused"):
            live.push(1, np.array([4000]), _grads(1))
        assert live.version == 0
        monkeypatch.setattr(os, "posix_fallocate", real_fallocate)
    with LiveTable.open(path, config=NO_SCRUB) as live:  # nothing was logged: nothing replays
        assert live.version == 0
        live.push(1, np.array([4000]), _grads(1))
        assert live.version == 1 and live.integrity.verify_all() == []
    assert verify_table(path, Manifest.read(path)) == []


def test_reshard_writes_the_checksums_of_its_shards(tmp_path: Path) -> None:
    """A resharded table is checked from its first start, read-only (a frozen table) included."""
    from memstore.reshard import reshard

    path = make_table(tmp_path / "t")  # frozen: only ever opened read-only, so nothing could build them later
    reshard(path, tmp_path / "u", 2, 8)
    for shard in sorted((tmp_path / "u").iterdir()):
        assert verify_table(shard, Manifest.read(shard)) == []
        with LiveTable.open(shard, config=NO_SCRUB) as live:
            assert live.integrity is not None
