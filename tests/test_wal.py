"""The write-ahead log: round trips across segments, torn-tail recovery versus real corruption,
truncation after a checkpoint, both durability modes, kill -9 of a writer, and concurrent appends."""

from __future__ import annotations

import itertools
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memstore.errors import DataLossError, InternalError, InvalidArgumentError
from memstore.tabledir.walformat import FILE_HEADER_SIZE, RECORD_HEADER_SIZE
from memstore.wal import Durability, TailCut, WalRecord, WriteAheadLog, inspect_log

REPO = Path(__file__).resolve().parents[1]
_HEADER = struct.Struct("<4sHHQQI")


def _payload(version: int) -> bytes:
    return f"rows-{version};".encode() * (version % 5 + 1)


def _open(directory: Path, durability: Durability = Durability.OS, segment_bytes: int = 256 << 20) -> WriteAheadLog:
    # OS durability by default: the tests that care about fsync ask for it, the rest stay fast.
    return WriteAheadLog(directory, durability, segment_bytes)


def _fill(wal: WriteAheadLog, versions: range | list[int]) -> None:
    for version in versions:
        wal.append(version, _payload(version))


def _expected(versions: range | list[int]) -> list[WalRecord]:
    return [WalRecord(v, _payload(v)) for v in versions]


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.log"))


def _frames(path: Path) -> list[tuple[int, int, int]]:
    """(offset, frame length, version) of every frame in a segment, parsed independently of the module."""
    data = path.read_bytes()
    frames, offset = [], FILE_HEADER_SIZE
    while offset + RECORD_HEADER_SIZE <= len(data):
        magic, _fmt, _res, length, version, _crc = _HEADER.unpack_from(data, offset)
        assert magic == b"EWAL"
        frames.append((offset, RECORD_HEADER_SIZE + length, version))
        offset += RECORD_HEADER_SIZE + length
    return frames


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# -- round trips -------------------------------------------------------------------------------------


def test_round_trip_across_segments_and_reopen(tmp_path: Path) -> None:
    with _open(tmp_path, segment_bytes=200) as wal:
        _fill(wal, range(1, 31))
        assert wal.last_version == 30
        assert list(wal.records()) == _expected(range(1, 31))
        assert list(wal.records(after_version=17)) == _expected(range(18, 31))
        assert list(wal.records(after_version=0)) == _expected(range(1, 31))
        assert list(wal.records(after_version=30)) == []
    segments = _segments(tmp_path)
    assert len(segments) > 3
    for path in segments:
        frames = _frames(path)
        # Named after the first record; never past segment_bytes unless one record alone does.
        assert path.name == f"wal-{frames[0][2]:020d}.log"
        assert path.stat().st_size <= 200 or len(frames) == 1
    with _open(tmp_path, segment_bytes=200) as wal:
        assert wal.last_version == 30
        assert list(wal.records()) == _expected(range(1, 31))
        _fill(wal, [31, 40])  # gaps are fine, only the order matters
    with _open(tmp_path, segment_bytes=200) as wal:
        assert wal.last_version == 40
        assert list(wal.records(after_version=29)) == _expected([30, 31, 40])


def test_empty_log(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "wal"
    with _open(directory) as wal:
        assert wal.last_version is None
        assert list(wal.records()) == []
        wal.truncate_through(10)
    assert directory.is_dir() and _segments(directory) == []
    with _open(directory) as wal:
        assert wal.last_version is None
        wal.append(0, b"")
        assert list(wal.records()) == [WalRecord(0, b"")]


def test_versions_must_increase_and_bad_arguments_write_nothing(tmp_path: Path) -> None:
    with _open(tmp_path) as wal:
        wal.append(5, b"five")
        (segment,) = _segments(tmp_path)
        size = segment.stat().st_size
        for version in (5, 4, 0):
            with pytest.raises(InvalidArgumentError, match="not above"):
                wal.append(version, b"x")
        for version in (-1, 1 << 64, True, 6.0, "6"):
            with pytest.raises(InvalidArgumentError):
                wal.append(version, b"x")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            wal.append(6, "text")  # type: ignore[arg-type]
        assert segment.stat().st_size == size
        assert wal.last_version == 5
        wal.append(6, memoryview(bytearray(b"six")))
    with _open(tmp_path) as wal:
        assert list(wal.records()) == [WalRecord(5, b"five"), WalRecord(6, b"six")]
    with pytest.raises(InvalidArgumentError):
        WriteAheadLog(tmp_path, segment_bytes=0)


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    wal = _open(tmp_path)
    wal.append(1, b"a")
    wal.close()
    wal.close()
    with pytest.raises(InternalError, match="closed"):
        wal.append(2, b"b")
    with pytest.raises(InternalError, match="closed"):
        wal.truncate_through(1)


def test_record_larger_than_a_segment_goes_alone(tmp_path: Path) -> None:
    with _open(tmp_path, segment_bytes=120) as wal:
        wal.append(1, b"small")
        wal.append(2, b"B" * 500)
        wal.append(3, b"small")
        wal.append(4, b"small")
        wal.append(5, b"C" * 500)
        assert [r.version for r in wal.records()] == [1, 2, 3, 4, 5]
    assert [[v for _o, _n, v in _frames(p)] for p in _segments(tmp_path)] == [[1], [2], [3, 4], [5]]


# -- recovery ----------------------------------------------------------------------------------------

_LAST_FRAME = RECORD_HEADER_SIZE + len(_payload(3))
_CUTS = [1, 3, 4, 6, 8, 12, 16, 20, 24, 27, RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 1, _LAST_FRAME - 1]


@pytest.mark.parametrize("kept", _CUTS)
def test_torn_tail_is_cut_off(tmp_path: Path, kept: int) -> None:
    """A crash mid-append leaves the last frame's first `kept` bytes; recovery drops exactly that frame."""
    with _open(tmp_path) as wal:
        _fill(wal, [1, 2, 3])
    (segment,) = _segments(tmp_path)
    start = _frames(segment)[-1][0]
    os.truncate(segment, start + kept)
    with _open(tmp_path) as wal:
        assert wal.last_version == 2
        assert list(wal.records()) == _expected([1, 2])
        assert segment.stat().st_size == start
        wal.append(3, b"again")
    with _open(tmp_path) as wal:
        assert list(wal.records()) == [*_expected([1, 2]), WalRecord(3, b"again")]


def test_torn_first_record_of_a_new_segment(tmp_path: Path) -> None:
    """A crash right after rotation: the last segment holds a header and part of its first record."""
    with _open(tmp_path, segment_bytes=100) as wal:
        _fill(wal, [1, 2, 3, 10])
    last = _segments(tmp_path)[-1]
    assert last.name == f"wal-{10:020d}.log"
    os.truncate(last, FILE_HEADER_SIZE + 5)
    with _open(tmp_path, segment_bytes=100) as wal:
        assert wal.last_version == 3
        assert last.stat().st_size == FILE_HEADER_SIZE
        wal.append(7, b"seven")  # below the empty segment's name: the segment is renamed after it
    assert _segments(tmp_path)[-1].name == f"wal-{7:020d}.log"
    with _open(tmp_path, segment_bytes=100) as wal:
        assert [r.version for r in wal.records()] == [1, 2, 3, 7]


@pytest.mark.parametrize("kept", [0, 3, FILE_HEADER_SIZE - 1])
def test_torn_segment_header_is_removed(tmp_path: Path, kept: int) -> None:
    with _open(tmp_path, segment_bytes=60) as wal:
        _fill(wal, [1, 2])
    last = _segments(tmp_path)[-1]
    os.truncate(last, kept)
    with _open(tmp_path, segment_bytes=60) as wal:
        assert wal.last_version == 1
        assert not last.exists()
        wal.append(2, b"two")
    with _open(tmp_path) as wal:
        assert list(wal.records()) == [WalRecord(1, _payload(1)), WalRecord(2, b"two")]


@pytest.mark.parametrize("kept", [3, RECORD_HEADER_SIZE + 1])
def test_a_cut_tail_is_reported_with_its_bytes_and_version(tmp_path: Path, kept: int) -> None:
    with _open(tmp_path) as wal:
        _fill(wal, [1, 2, 3])
        assert wal.tail_cut is None
    (segment,) = _segments(tmp_path)
    start = _frames(segment)[-1][0]
    os.truncate(segment, start + kept)
    with _open(tmp_path) as wal:
        cut = wal.tail_cut
        assert (cut.path, cut.offset, cut.bytes) == (segment, start, kept)
        assert cut.version == (3 if kept >= RECORD_HEADER_SIZE else None)  # known once its header is whole
        assert f"cut {kept} bytes at offset {start}" in cut.describe()
    with _open(tmp_path) as wal:
        assert wal.tail_cut is None  # cut once


def test_a_deleted_torn_segment_is_reported(tmp_path: Path) -> None:
    with _open(tmp_path, segment_bytes=60) as wal:
        _fill(wal, [1, 2])
    last = _segments(tmp_path)[-1]
    os.truncate(last, 7)
    with _open(tmp_path, segment_bytes=60) as wal:
        assert wal.tail_cut == TailCut(last, 0, 7, None, wal.tail_cut.reason, segment_deleted=True)
        assert "incomplete file header" in wal.tail_cut.describe()


@pytest.mark.parametrize("torn", ["record", "segment header"])
def test_readers_of_a_log_never_cut_it(tmp_path: Path, torn: str) -> None:
    """Only the log's writer may cut a torn tail: a reader seeing a writer's append in progress would
    destroy it. inspect_log (which offline tools and read-only opens use) reports the log as recovery
    would find it and leaves every byte in place."""
    with _open(tmp_path, segment_bytes=60 if torn == "segment header" else 1 << 20) as wal:
        _fill(wal, [1, 2])
    last = _segments(tmp_path)[-1]
    os.truncate(last, 7 if torn == "segment header" else last.stat().st_size - 3)
    before = {p.name: p.read_bytes() for p in _segments(tmp_path)}
    state = inspect_log(tmp_path)
    assert state.last_version == 1 and state.tail_cut is not None
    assert {p.name: p.read_bytes() for p in _segments(tmp_path)} == before
    assert inspect_log(tmp_path / "missing").last_version is None and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("where", ["magic", "version", "crc", "payload"])
def test_flipped_byte_in_last_record_drops_it(tmp_path: Path, where: str) -> None:
    with _open(tmp_path) as wal:
        _fill(wal, [1, 2, 3])
    (segment,) = _segments(tmp_path)
    start, length, _v = _frames(segment)[-1]
    _flip(segment, start + {"magic": 0, "version": 16, "crc": 24, "payload": length - 1}[where])
    with _open(tmp_path) as wal:
        assert wal.last_version == 2
        assert list(wal.records()) == _expected([1, 2])
    assert segment.stat().st_size == start


@pytest.mark.parametrize("where", ["magic", "length", "version", "crc", "payload"])
def test_flipped_byte_in_a_middle_record_is_data_loss(tmp_path: Path, where: str) -> None:
    with _open(tmp_path) as wal:
        _fill(wal, [1, 2, 3, 4])
    (segment,) = _segments(tmp_path)
    start, _length, _v = _frames(segment)[1]
    _flip(segment, start + {"magic": 1, "length": 8, "version": 16, "crc": 25, "payload": 30}[where])
    size = segment.stat().st_size
    with pytest.raises(DataLossError, match=rf"{segment.name}.*offset {start}\b"):
        _open(tmp_path)
    assert segment.stat().st_size == size  # nothing cut: an operator must look at it


@pytest.mark.parametrize("damage", ["flip", "cut", "file header"])
def test_damage_in_a_segment_that_is_not_the_last_is_data_loss(tmp_path: Path, damage: str) -> None:
    """The same damage that is a torn tail in the last segment: here later segments prove records were lost."""
    with _open(tmp_path, segment_bytes=100) as wal:
        _fill(wal, range(1, 10))
    first, *_rest = _segments(tmp_path)
    start, length, _v = _frames(first)[-1]
    if damage == "flip":
        _flip(first, start + length - 1)
    elif damage == "cut":
        os.truncate(first, start + length - 1)
    else:
        start = 0
        _flip(first, 2)
    with pytest.raises(DataLossError, match=rf"{first.name}.*offset {start}\b"):
        _open(tmp_path)


def test_segment_named_after_another_version_is_data_loss(tmp_path: Path) -> None:
    with _open(tmp_path, segment_bytes=60) as wal:
        _fill(wal, [1, 2, 3])
    second = _segments(tmp_path)[1]
    second.rename(tmp_path / f"wal-{9:020d}.log")
    with pytest.raises(DataLossError):
        _open(tmp_path)


# -- truncation --------------------------------------------------------------------------------------


def test_truncate_through_keeps_every_later_record(tmp_path: Path) -> None:
    with _open(tmp_path, segment_bytes=150) as wal:
        _fill(wal, range(1, 21))
        before = {p.name: [v for _o, _n, v in _frames(p)] for p in _segments(tmp_path)}
        assert len(before) >= 4
        wal.truncate_through(8)
        after = {p.name: [v for _o, _n, v in _frames(p)] for p in _segments(tmp_path)}
        assert after == {name: vs for name, vs in before.items() if vs[-1] > 8}
        assert any(9 in vs for vs in after.values())  # the segment holding 9 stayed, whatever else it holds
        assert [r.version for r in wal.records(after_version=8)] == list(range(9, 21))
        assert wal.last_version == 20
        _fill(wal, [21])
    with _open(tmp_path, segment_bytes=150) as wal:
        assert [r.version for r in wal.records(after_version=8)] == list(range(9, 22))
        assert wal.last_version == 21


@pytest.mark.parametrize("through", [20, 25])
def test_truncate_through_the_current_segment_rotates(tmp_path: Path, through: int) -> None:
    with _open(tmp_path, segment_bytes=150) as wal:
        _fill(wal, range(1, 21))
        wal.truncate_through(through)
        (only,) = _segments(tmp_path)
        assert only.stat().st_size == FILE_HEADER_SIZE
        assert wal.last_version == 20
        assert list(wal.records()) == []
        wal.truncate_through(through)  # nothing left to drop; the empty segment stays
        assert _segments(tmp_path) == [only]
    with _open(tmp_path, segment_bytes=150) as wal:
        assert wal.last_version == 20  # remembered by the empty segment's header
        assert list(wal.records()) == []
        with pytest.raises(InvalidArgumentError):
            wal.append(20, b"old")
        wal.append(23, b"new")
    assert [p.name for p in _segments(tmp_path)] == [f"wal-{23:020d}.log"]
    with _open(tmp_path, segment_bytes=150) as wal:
        assert list(wal.records()) == [WalRecord(23, b"new")]


# -- durability --------------------------------------------------------------------------------------


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"fdatasync": 0, "fsync": 0}
    for name in calls:
        real = getattr(os, name, None)
        if real is None:
            continue

        def counting(fd: int, _real=real, _name=name) -> None:
            calls[_name] += 1
            _real(fd)

        monkeypatch.setattr(os, name, counting)
    return calls


def test_fsync_mode_syncs_once_per_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _open(tmp_path, Durability.FSYNC) as wal:
        wal.append(1, b"first")  # creates the segment, which also syncs the directory
        calls = _count_syncs(monkeypatch)
        _fill(wal, range(2, 7))
        assert calls["fdatasync"] + calls["fsync"] == 5
        assert calls["fdatasync"] == (5 if hasattr(os, "fdatasync") else 0)
    with _open(tmp_path) as wal:
        assert [r.version for r in wal.records()] == [1, 2, 3, 4, 5, 6]


def test_os_mode_does_not_sync_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_syncs(monkeypatch)
    with _open(tmp_path, Durability.OS, segment_bytes=100) as wal:
        _fill(wal, range(1, 11))  # rotations included
    assert calls == {"fdatasync": 0, "fsync": 0}
    with WriteAheadLog(tmp_path, "os", segment_bytes=100) as wal:  # type: ignore[arg-type]
        assert wal.durability is Durability.OS
        assert list(wal.records()) == _expected(range(1, 11))


_WRITER = """
import sys
from pathlib import Path
from memstore.wal import Durability, WriteAheadLog

wal = WriteAheadLog(Path(sys.argv[1]), Durability(sys.argv[2]), segment_bytes=2048)
version = wal.last_version or 0
while True:
    version += 1
    wal.append(version, (b"%d;" % version) * (version % 50 + 1))
    sys.stdout.write(f"{version}\\n")
    sys.stdout.flush()
"""


@pytest.mark.parametrize("durability", list(Durability))
def test_kill_9_loses_no_acknowledged_record(tmp_path: Path, durability: Durability) -> None:
    rng = random.Random(durability.value)
    target = rng.randrange(20, 150)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path), durability.value],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        read = 0
        while read < target and proc.stdout is not None and proc.stdout.readline():
            read += 1
        time.sleep(rng.random() * 0.005)  # let the writer get anywhere into a later append
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # Read the rest through the same buffered reader: readline() may already hold lines that
        # communicate() (which reads the raw pipe) would never see.
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert read == target, err.decode()
    # Every line printed before the kill is an acknowledged append, read or not.
    acknowledged = read + len(out.splitlines())
    with _open(tmp_path, segment_bytes=2048) as wal:
        records = list(wal.records())
        assert acknowledged <= len(records) <= acknowledged + 1
        assert records == [WalRecord(v, (b"%d;" % v) * (v % 50 + 1)) for v in range(1, len(records) + 1)]
        assert wal.last_version == len(records)
        wal.append(len(records) + 1, b"after")
    with _open(tmp_path) as wal:
        assert wal.last_version == len(records) + 1


# -- threads -----------------------------------------------------------------------------------------


def test_concurrent_appends_all_land_in_order(tmp_path: Path) -> None:
    wal = _open(tmp_path, segment_bytes=512)
    counter = itertools.count(1)
    caller_lock = threading.Lock()

    def push() -> None:
        for _ in range(50):
            with caller_lock:  # like the daemon: version assignment and append under one lock
                version = next(counter)
                wal.append(version, _payload(version))

    threads = [threading.Thread(target=push) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert list(wal.records()) == _expected(range(1, 201))
    wal.close()
    with _open(tmp_path, segment_bytes=512) as reopened:
        assert list(reopened.records()) == _expected(range(1, 201))


def test_racing_appends_keep_the_log_ordered(tmp_path: Path) -> None:
    """Without the caller's lock, appends race on the log's own lock: late versions are refused, never interleaved."""
    counter = itertools.count(1)
    accepted: list[int] = []
    refused: list[int] = []

    def push(wal: WriteAheadLog) -> None:
        for _ in range(50):
            version = next(counter)
            try:
                wal.append(version, _payload(version))
                accepted.append(version)
            except InvalidArgumentError:
                refused.append(version)

    with _open(tmp_path, segment_bytes=512) as wal:
        threads = [threading.Thread(target=push, args=(wal,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert len(accepted) + len(refused) == 200
        versions = [r.version for r in wal.records()]
        assert versions == sorted(accepted)
        assert all(a < b for a, b in itertools.pairwise(versions))


# -- I/O failures ------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "pwritev"), reason="the log writes with pwritev where the OS has it")
def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev
    calls = []

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        return real(fd, [bytes(buffers[0][:7])], offset)  # at most 7 bytes per call

    monkeypatch.setattr(os, "pwritev", short)
    with _open(tmp_path) as wal:
        _fill(wal, [1, 2])
    assert len(calls) > 2 * (RECORD_HEADER_SIZE // 7)
    monkeypatch.undo()
    with _open(tmp_path) as wal:
        assert list(wal.records()) == _expected([1, 2])


@pytest.mark.parametrize("failing", ["pwritev", "fdatasync"])
def test_io_error_poisons_the_log_until_reopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    if failing == "fdatasync" and not hasattr(os, "fdatasync"):
        failing = "fsync"
    with _open(tmp_path, Durability.FSYNC) as wal:
        _fill(wal, [1, 2])

        def broken(*_args: object) -> int:
            raise OSError(5, "Input/output error")  # a full disk is not an I/O error: tests/test_disk_faults.py

        monkeypatch.setattr(os, failing, broken)
        with pytest.raises(OSError, match="Input/output"):
            wal.append(3, b"three")
        monkeypatch.undo()
        with pytest.raises(InternalError, match="I/O error"):
            wal.append(4, b"four")
    with _open(tmp_path) as wal:
        assert [r.version for r in wal.records()] == [1, 2]  # the failed frame was cut back
        wal.append(3, b"three")
