"""Full disks, truncated and unreadable files: clean errors or a log line naming the file, never a silent death.

Full-disk tests run on a real small tmpfs mounted for the test (root can mount one); where mounting
is not allowed they are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import signal
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

from client import MemstoreClient
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import InternalError, ResourceExhaustedError, TableFormatError
from memstore.live import LiveConfig, LiveTable
from memstore.service import SERVICE_NAME, create_server
from memstore.space import DiskFullError
from memstore.table import Table
from memstore.tabledir.manifest import Backend, Init, Manifest
from memstore.tabledir.names import WAL_DIR
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability, WriteAheadLog
from memstore.wire import memstore_pb2 as pb
from tests.helpers import FAST_FAIL, SMALL_LAYOUT

ADAM = OptimizerConfig(OptimizerKind.ADAM, lr=0.1)
LAZY_TRAINABLE = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, optimizer=ADAM, init=Init.LAZY)
ROWS_PER_PAGE = 4096 // (SMALL_LAYOUT.dim * 4)  # float32 rows of one page
WAIT_S = 30
REPORTER = importlib.util.find_spec("memstore._fatal") is not None
NO_REPORTER = "memstore._fatal was not built (no C compiler at install): faulthandler reports without the file"


@contextlib.contextmanager
def small_disk(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes for the block, at `where` when this process may mount (root); else mounted
    by a helper in a user and mount namespace of its own (`unshare -rm`) and reached through its
    /proc/PID/root. Skips the test when neither is allowed. MEMSTORE_TEST_USERNS=1 forces the helper."""
    where.mkdir()
    refused = "forced by MEMSTORE_TEST_USERNS"
    if not os.environ.get("MEMSTORE_TEST_USERNS"):
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
        if mounted.returncode == 0:
            try:
                yield where
            finally:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
            return
        refused = mounted.stderr.strip()
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && echo mounted && exec sleep 3600'
    try:
        helper = subprocess.Popen(
            ["unshare", "-rm", "sh", "-c", script, "sh", str(size), str(where)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip(f"cannot mount a small tmpfs ({refused}) and there is no unshare: full-disk tests need either")
    try:
        if helper.stdout.readline().strip() != "mounted":
            helper.kill()
            pytest.skip(f"cannot mount a small tmpfs ({refused}; in a user namespace: {helper.stderr.read().strip()})")
        yield Path(f"/proc/{helper.pid}/root") / where.relative_to("/")
    finally:
        if helper.poll() is None:
            helper.kill()
        helper.wait(WAIT_S)
        helper.stdout.close()
        helper.stderr.close()


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; removing it gives the space back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\xff" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def grads(count: int, value: float = 1.0) -> np.ndarray:
    return np.full((count, SMALL_LAYOUT.dim), value, np.float32)


def fresh_page_ids(start_page: int, count: int) -> np.ndarray:
    """Row ids of layer 1 each on its own, never written page."""
    return (np.arange(count) + start_page) * ROWS_PER_PAGE


class Served:
    """`memstore serve` in a child process, its log in a file; killed in `stop`. Without same-host reads:
    they resolve the table's real path, which a tmpfs reached through /proc/PID/root does not have."""

    def __init__(self, table: Path, logs: Path, *flags: str) -> None:
        self.log = logs / f"serve-{time.monotonic_ns()}.log"
        port_file = self.log.with_suffix(".port")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memstore", "serve", str(table), "--listen", "127.0.0.1:0"]
                + ["--port-file", str(port_file), "--checkpoint-every", "1000", "--no-same-host", *flags],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + WAIT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                self.address = None
                return
            assert time.monotonic() < deadline, f"the daemon did not start:\n{self.log.read_text()}"
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"

    def wait(self) -> int:
        return self.proc.wait(WAIT_S)

    def health(self) -> str:
        with grpc.insecure_channel(self.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT_S)


@contextlib.contextmanager
def serving(table: Path, logs: Path, *flags: str) -> Iterator[Served]:
    served = Served(table, logs, *flags)
    try:
        yield served
    finally:
        served.stop()


# -- a full disk ------------------------------------------------------------------------------


def test_a_push_on_a_full_disk_is_refused_cleanly_and_pushes_resume_once_space_is_back(tmp_path) -> None:
    """A lazy table with Adam (sparse rows and state): a push into never-written pages on a full disk
    was SIGBUS for the daemon; a push whose log record did not fit made every later push INTERNAL."""
    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        path = create_table(disk / "table", LAZY_TRAINABLE)
        with serving(path, tmp_path) as daemon, MemstoreClient(daemon.address, FAST_FAIL) as client:
            written = np.arange(200)
            assert client.push(1, written, grads(200)).version == 1
            filler = fill(disk)
            # Rows on pages with no disk blocks: the space is reserved first, and refused.
            with pytest.raises(ResourceExhaustedError, match="disk .* is full.*nothing was applied"):
                client.push(1, fresh_page_ids(10, 3), grads(3))
            # Rows with blocks already, but a log record larger than the log's last page can take.
            with pytest.raises(ResourceExhaustedError, match="disk .* is full.*nothing was applied"):
                client.push(1, written, grads(200))
            assert daemon.proc.poll() is None, daemon.log.read_text()
            assert daemon.health() == "SERVING"
            filler.unlink()
            assert client.push(1, fresh_page_ids(10, 3), grads(3)).version == 2  # nothing was logged before
            assert client.push(1, written, grads(200)).version == 3
        with WriteAheadLog(path / WAL_DIR, Durability.OS) as wal:
            assert [record.version for record in wal.records()] == [1, 2, 3]


def test_a_restart_that_replays_onto_a_full_disk_fails_with_a_clear_error(tmp_path) -> None:
    """Replay writes the logged after-images into the files: into holes on a full disk it was SIGBUS."""
    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        path = create_table(disk / "table", LAZY_TRAINABLE)
        ids = fresh_page_ids(0, 20)
        with serving(path, tmp_path) as daemon, MemstoreClient(daemon.address, FAST_FAIL) as client:
            for step in range(3):
                client.push(1, ids, grads(len(ids), step + 1.0))
            expected = client.lookup(1, ids).numpy()
        # Killed before a checkpoint, and the files lost the pushes' pages (as created): only the log has them.
        for name in os.listdir(path):
            if name.startswith("layer_") and not name.endswith(".sums"):  # the rows and state, not their checksums
                size = (path / name).stat().st_size
                os.truncate(path / name, 0)
                os.truncate(path / name, size)
        filler = fill(disk)
        with serving(path, tmp_path) as daemon:
            assert daemon.wait() == 2, daemon.log.read_text()
            log = daemon.log.read_text()
            assert "is full" in log and "Free space" in log and "Traceback" not in log, log
        filler.unlink()
        with serving(path, tmp_path) as daemon, MemstoreClient(daemon.address, FAST_FAIL) as client:
            np.testing.assert_array_equal(client.lookup(1, ids).numpy(), expected)


def test_a_full_disk_at_a_checkpoint_does_not_fail_the_push_it_follows(tmp_path) -> None:
    """The push was logged and applied; the checkpoint after it found the disk full and the push raised
    OSError (INTERNAL for a client, who may then apply it twice), and a log that could not start a new
    segment refused every later push."""
    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        path = create_table(disk / "table", LAZY_TRAINABLE)
        with LiveTable.open(path, config=LiveConfig(Durability.FSYNC, checkpoint_every=1)) as live:
            ids = np.arange(8)
            live.push(1, ids, grads(8))
            filler = fill(disk)
            result = live.push(1, ids, grads(8))  # its record fits the log's last page; the checkpoint does not
            assert result.version == 2 and live.version == 2
            assert not (path / "checkpoint.json.tmp").exists()  # no half-written checkpoint left behind
            filler.unlink()
            assert live.push(1, ids, grads(8)).version == 3
        with LiveTable.open(path, read_only=True) as reopened:
            assert reopened.version == 3


@pytest.mark.parametrize("backend", [Backend.MMAP, Backend.LMDB])
def test_a_refused_push_leaves_no_log_record_on_either_backend(tmp_path, backend) -> None:
    """LMDB reported the full disk only at its commit, after the push was logged: the log then held a
    version the table never reached, and every later push failed."""
    with small_disk(tmp_path / "disk", 4 << 20) as disk:
        manifest = replace(LAZY_TRAINABLE, backend=backend, init=Init.EAGER)
        path = create_table(disk / "table", manifest)
        with LiveTable.open(path, config=LiveConfig(Durability.OS, checkpoint_every=0)) as live:
            live.push(1, np.arange(4), grads(4))
            filler = fill(disk)
            with pytest.raises(DiskFullError, match="nothing was applied"):
                live.push(1, fresh_page_ids(20, 40), grads(40))
            assert live.version == 1 and live._wal.last_version == 1
            filler.unlink()
            assert live.push(1, fresh_page_ids(20, 40), grads(40)).version == 2


def test_a_snapshot_on_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path) -> None:
    """A snapshot that ran out of space was a bare OSError (INTERNAL for the Snapshot call)."""
    with small_disk(tmp_path / "disk", 2 << 20) as disk:
        path = create_table(disk / "table", LAZY_TRAINABLE)
        with LiveTable.open(path, config=LiveConfig(Durability.OS)) as live:
            live.push(1, np.arange(2000), grads(2000))
            filler = fill(disk)
            with pytest.raises(DiskFullError, match="snapshot"):
                live.snapshot(disk / "snap")
            assert sorted(p.name for p in disk.iterdir()) == ["filler", "table"]  # no staging debris
            filler.unlink()
            assert live.snapshot(disk / "snap") == 1


def test_create_larger_than_the_free_disk_is_refused_first(tmp_path, capsys) -> None:
    from memstore.cli import main

    with small_disk(tmp_path / "disk", 256 << 10) as disk:
        argv = [
            "create",
            str(disk / "t"),
            "--layers",
            "1",
            "--vocab-size-per-ngram",
            "5000,5000",
            "--dim",
            "64",
            "--no-progress",
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "needs" in err and "bytes" in err and "free" in err and "--lazy" in err, err
        assert list(disk.iterdir()) == []  # nothing written
        assert main([*argv, "--lazy"]) == 0


# -- a failed sync ------------------------------------------------------------------------------


def test_a_failed_log_sync_turns_the_daemon_not_serving(tmp_path, monkeypatch) -> None:
    """After a failed fsync the kernel may have dropped the log's pages: pushes must stop and health
    must say so (it said SERVING while every push failed with a bare INTERNAL)."""
    path = create_table(tmp_path / "table", LAZY_TRAINABLE)
    live = LiveTable.open(path, config=LiveConfig(Durability.FSYNC))
    server, port = create_server(live, "127.0.0.1:0")
    server.start()
    try:
        with MemstoreClient(f"127.0.0.1:{port}", FAST_FAIL) as client:
            client.push(1, np.arange(4), grads(4))

            def broken(_fd: int) -> None:
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(os, "fdatasync", broken)
            with pytest.raises(InternalError, match="failed to write or sync.*restart"):
                client.push(1, np.arange(4), grads(4))
            monkeypatch.undo()
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(InternalError, match="restart"):
                client.push(1, np.arange(4), grads(4))
    finally:
        server.stop(None).wait()
        live.close()


# -- truncated and unreadable files --------------------------------------------------------------

_MAP_AND_FAULT = """
import sys
from memstore.table import Table
import numpy as np
table = Table.open(sys.argv[1])
print("mapped", flush=True)
sys.stdin.readline()
table.gather(1, np.arange(table.manifest.layout.num_rows(1)))
print("survived", flush=True)
"""


@pytest.mark.skipif(not REPORTER, reason=NO_REPORTER)
@pytest.mark.parametrize("backend, name", [(Backend.MMAP, "layer_1.rows"), (Backend.LMDB, "layer_1.lmdb/data.mdb")])
def test_a_row_file_truncated_under_a_reader_is_named_before_it_dies(tmp_path, backend, name) -> None:
    """A process that maps a table (a daemon, a same-host client) died of SIGBUS with an empty log."""
    path = create_table(tmp_path / "table", Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, backend=backend))
    child = subprocess.Popen(
        [sys.executable, "-c", _MAP_AND_FAULT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "mapped"
        os.truncate(path / name, 8192)  # another process cuts the file short
        _, err = child.communicate("go\n", timeout=WAIT_S)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(WAIT_S)
    assert child.returncode == -signal.SIGBUS
    assert "SIGBUS" in err and str((path / name).resolve()) in err, err


def test_a_daemon_whose_row_file_is_truncated_logs_the_file_before_dying(tmp_path) -> None:
    if not REPORTER:
        pytest.skip(NO_REPORTER)
    path = create_table(tmp_path / "table", Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32))
    with serving(path, tmp_path) as daemon:
        lookup = pb.LookupRequest(layer_id=1, row_ids=np.arange(1000, 1100, dtype="<i8").tobytes())
        os.truncate(path / "layer_1.rows", 4096)
        with grpc.insecure_channel(daemon.address) as channel:  # a raw call: its deadline holds whatever happens
            call = channel.unary_stream(
                f"/{SERVICE_NAME}/Lookup", request_serializer=pb.LookupRequest.SerializeToString
            )
            with pytest.raises(grpc.RpcError):
                list(call(lookup, timeout=10))
        assert daemon.wait() == -signal.SIGBUS
        log = daemon.log.read_text()
        assert "SIGBUS" in log and str((path / "layer_1.rows").resolve()) in log, log


def test_a_truncated_lmdb_file_is_refused_at_start_by_verify_and_serve(tmp_path) -> None:
    path = create_table(tmp_path / "table", Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, backend=Backend.LMDB))
    data = path / "layer_4.lmdb" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(TableFormatError, match="data.mdb .*truncated"):
        Table.open(path)
    verify = subprocess.run(
        [sys.executable, "-m", "memstore", "verify", str(path)], capture_output=True, text=True, timeout=WAIT_S
    )
    assert verify.returncode == 2 and "truncated" in verify.stderr, (verify.returncode, verify.stderr)
    with serving(path, tmp_path) as daemon:
        assert daemon.wait() == 2
        assert "truncated" in daemon.log.read_text()


def test_a_truncated_optimizer_state_file_is_refused_at_start(tmp_path) -> None:
    path = create_table(tmp_path / "table", replace(LAZY_TRAINABLE, init=Init.EAGER))
    state = next(p for p in path.iterdir() if ".exp_avg." in p.name and not p.name.endswith(".sums"))
    os.truncate(state, state.stat().st_size - 4096)
    with pytest.raises(TableFormatError, match=state.name):
        LiveTable.open(path)


_OPEN_AS_NOBODY = """
import os, sys
import memstore.exchange  # imported as root: the interpreter's own files may be root's only
from memstore.cli import main
os.setgid(65534); os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
@pytest.mark.parametrize("command, unreadable", [("info", "manifest.json"), ("verify", "layer_1.rows")])
def test_unreadable_table_files_give_a_clear_error(tmp_path, command, unreadable) -> None:
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"memstore-perm-{os.getpid()}-{unreadable}"
    try:
        root.mkdir(mode=0o755)
        path = create_table(root / "table", Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32))
        os.chmod(path, 0o755)
        os.chmod(path / unreadable, 0o600)
        done = subprocess.run(
            [sys.executable, "-c", _OPEN_AS_NOBODY, command, str(path)],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert done.returncode == 2, done.stderr
        assert "permission denied" in done.stderr and unreadable in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    finally:
        subprocess.run(["rm", "-rf", str(root)])


def test_reshard_on_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, capsys) -> None:
    """It was a bare OSError traceback from the command line."""
    from memstore.cli import main

    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        source = create_table(disk / "table", Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32))
        assert main(["reshard", str(source), str(disk / "resharded"), "--shards", "2", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is full" in err and "Free space" in err and "Traceback" not in err, err
        assert sorted(p.name for p in disk.iterdir()) == ["table"]  # no staging debris


def test_a_log_write_that_finds_the_disk_full_is_cut_back_and_the_log_goes_on(tmp_path) -> None:
    """The log refused every append after one ENOSPC until it was reopened (INTERNAL for every push)."""
    with small_disk(tmp_path / "disk", 256 << 10) as disk:
        with WriteAheadLog(disk / "wal", Durability.FSYNC, segment_bytes=64 << 10) as wal:
            wal.append(1, b"one")
            filler = fill(disk)
            for version in (2, 2):  # the same version again: the refused one left nothing behind
                with pytest.raises(DiskFullError, match="nothing was applied"):
                    wal.append(version, bytes(48 << 10))
            filler.unlink()
            wal.append(2, bytes(48 << 10))
            wal.append(3, bytes(48 << 10))  # into a new segment
        with WriteAheadLog(disk / "wal", Durability.FSYNC) as reopened:
            assert [(r.version, len(r.payload)) for r in reopened.records()] == [(1, 3), (2, 48 << 10), (3, 48 << 10)]


def test_a_replica_on_a_full_disk_keeps_following_and_catches_up_once_space_is_back(tmp_path) -> None:
    """A replica that could not apply a record for want of space stopped following for good."""
    from memstore.replica import FollowConfig, Follower

    quick = FollowConfig(heartbeat_s=0.05, silence_s=2.0, initial_backoff_s=0.05, max_backoff_s=0.2)
    primary_path = create_table(tmp_path / "primary", LAZY_TRAINABLE)
    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        replica_path = create_table(disk / "replica", LAZY_TRAINABLE)
        primary = LiveTable.open(primary_path, config=LiveConfig(Durability.OS))
        server, port = create_server(primary, "127.0.0.1:0")
        server.start()
        replica = LiveTable.open(replica_path, config=LiveConfig(Durability.OS), primary=f"127.0.0.1:{port}")
        follower = Follower(replica, quick)
        try:
            follower.start()
            primary.push(1, np.arange(4), grads(4))
            _wait_until(lambda: replica.version == 1)
            filler = fill(disk)
            primary.push(1, fresh_page_ids(10, 30), grads(30))
            _wait_until(lambda: "is full" in follower.status().problem)
            assert replica.version == 1
            filler.unlink()
            _wait_until(lambda: replica.version == 2)
            np.testing.assert_array_equal(
                replica.gather(1, fresh_page_ids(10, 30))[0], primary.gather(1, fresh_page_ids(10, 30))[0]
            )
        finally:
            follower.stop()
            replica.close()
            server.stop(None).wait()
            primary.close()


def _wait_until(condition, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
