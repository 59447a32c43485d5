"""The write-ahead log that makes acknowledged training pushes durable.

The daemon applies a push as: compute the new rows -> `WriteAheadLog.append` one record (an opaque
payload, the after-image of the rows and their optimizer state: memstore.tabledir.record) -> apply it
to the mmap'd table -> acknowledge. On restart it replays `records(after_version=checkpoint)`;
records are after-images, so replaying one that already reached the table is harmless. Once the
table is checkpointed at version V, `truncate_through(V)` drops the segments nobody needs any more.

On disk
-------
A directory of segment files ``wal-{version:020d}.log``, each a file header then back-to-back
frames (a header with the record's version, length and CRC, then its payload); the layout is owned
by `memstore.tabledir.walformat` (docs/format.md describes it). A segment is named after its first
record's version when it is created; a segment with no record yet is renamed to its first record's
version when that record arrives.

Recovery
--------
Opening the log scans every frame of every segment and checks its CRC and the version order. A
crash in the middle of an append can only leave a damaged *tail of the last segment*: a partial
header or payload, or bytes that fail the magic or CRC check (or a partial file header if the
crash hit a segment's creation). Such a tail is cut off (truncated to the end of the last good
record, the file and the directory fsynced; a last segment whose file header is incomplete is
deleted) and appends continue after the last good record; `WriteAheadLog.tail_cut` says what was
cut (offset, bytes, the record's version when its header was readable), for the caller to log and
to weigh against what it knows was acknowledged (memstore.live does). Only the log's one writer
repairs: readers use `inspect_log`, which finds the same and changes nothing. Anything else is
real corruption and raises `DataLossError` naming the file and offset: a bad frame followed by a
good one anywhere after it (found by searching the rest of the file for a valid frame), a bad
frame or header in a segment that is not the last, or good frames whose versions or segment
names are out of order.

Durability
----------
- `Durability.FSYNC`: the segment is ``fdatasync``'d (``fsync`` where unavailable) before
  `append` returns, and the directory is fsynced when a segment is created or renamed. An
  acknowledged record survives power loss and kernel crashes.
- `Durability.OS`: `append` returns once ``write`` has handed the whole frame to the kernel. An
  acknowledged record survives the daemon being killed (``kill -9``, OOM), not power loss or a
  kernel crash, which can lose the last few seconds of records (recovery then cuts back to a
  consistent prefix).

A write that fails for want of space (ENOSPC, EDQUOT) is cut back to the last good record and
raised as `DiskFullError` (memstore.space): nothing was logged, and appends go on once there is
room. After any other failed write, or a failed sync, the log refuses further appends: after a
failed fsync the kernel may already have dropped the dirty pages, so the only safe continuation
is a restart, which recovers (`failed` says why).
"""

from __future__ import annotations

import enum
import operator
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from memstore.errors import DataLossError, InternalError, InvalidArgumentError
from memstore.space import disk_full_error, is_disk_full
from memstore.tabledir.fsafe import file_mode, fsync_dir, make_dir
from memstore.tabledir.walformat import (
    FILE_HEADER_SIZE,
    RECORD_HEADER_SIZE,
    SEGMENT_NAME,
    CorruptFrame,
    file_header,
    frame_crc,
    parse_file_header,
    parse_record_header,
    read_frame,
    record_header,
    segment_path,
    torn_version,
    valid_frame_after,
)

_MAX_VERSION = (1 << 64) - 1  # a frame's version is a u64


class Durability(enum.Enum):
    """What an acknowledged append survives."""

    FSYNC = "fsync"  # fdatasync before append returns: survives power loss
    OS = "os"  # write() returned before append returns: survives kill -9 of the daemon, not power loss

    def __str__(self) -> str:  # as argparse shows the choices
        return self.value


@dataclass(frozen=True)
class WalRecord:
    """One logged push: the table version it produces and the caller's encoded after-image."""

    version: int
    payload: bytes


@dataclass
class _Segment:
    path: Path
    name_version: int
    base_version: int | None
    first_version: int | None = None
    last_version: int | None = None
    end: int = FILE_HEADER_SIZE


def _checked_version(version: int) -> int:
    try:
        checked = operator.index(version)
    except TypeError as exc:
        raise InvalidArgumentError(f"version must be an int, got {type(version).__name__}") from exc
    if isinstance(version, bool) or not 0 <= checked <= _MAX_VERSION:
        raise InvalidArgumentError(f"version must be an int in [0, 2**64), got {version!r}")
    return checked


def _datasync(fd: int) -> None:
    # Looked up at call time so that tests can count calls by monkeypatching os.
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


def _write_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write `buffers` back to back at `offset`, looping over short writes."""
    views = [b for b in buffers if len(b)]
    while views:
        if hasattr(os, "pwritev"):
            n = os.pwritev(fd, views, offset)
        else:
            n = os.pwrite(fd, views[0], offset)
        if n <= 0:
            raise OSError(f"write returned {n}")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


@dataclass(frozen=True)
class TailCut:
    """A damaged tail of the last segment, as recovery finds it: what a crash mid-append leaves.

    The records before it are kept; the bytes from `offset` on are cut off (the whole file when
    its own header was incomplete: the segment is deleted). `version` is the version the cut
    record's header names, when that header was readable.
    """

    path: Path
    offset: int
    bytes: int
    version: int | None
    reason: str
    segment_deleted: bool = False

    def describe(self) -> str:
        """One line for the log: where, how many bytes, which version, why."""
        what = f"the record of version {self.version}" if self.version is not None else "a record of unknown version"
        if self.segment_deleted:
            return f"deleted {self.path} ({self.bytes} bytes, {self.reason}): a segment whose creation never completed"
        return f"cut {self.bytes} bytes at offset {self.offset} of {self.path}: {what} ({self.reason})"


@dataclass(frozen=True)
class LogState:
    """What recovery would find in a log directory (see `inspect_log`)."""

    last_version: int | None  # as WriteAheadLog.last_version
    tail_cut: TailCut | None  # the damaged tail recovery would cut off, if any


def inspect_log(directory: Path) -> LogState:
    """The state of the log in `directory` as opening it would recover it, changing nothing on disk.

    For readers of a table that is not being written (offline tools, read-only daemons): opening a
    WriteAheadLog cuts a damaged tail, which must only ever be done by the table's one writer (a
    reader cutting the tail of an append in progress would destroy it). Raises DataLossError as
    recovery does; a missing directory is an empty log.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return LogState(None, None)
    segments, cut = _recover(directory, repair=False)
    if not segments:
        return LogState(None, cut)
    last = segments[-1]
    return LogState(last.last_version if last.last_version is not None else last.base_version, cut)


def _recover(directory: Path, repair: bool) -> tuple[list[_Segment], TailCut | None]:
    """Scan every segment in order and check how they chain; cut a torn tail off the last one when
    `repair` (only the log's writer repairs). Returns the segments and the tail cut (or found)."""
    paths = sorted(p for p in directory.iterdir() if SEGMENT_NAME.fullmatch(p.name) and p.is_file())
    segments: list[_Segment] = []
    cut: TailCut | None = None
    for i, path in enumerate(paths):
        is_last = i == len(paths) - 1
        segment, cut_here = _scan(directory, path, is_last, repair)
        cut = cut_here or cut
        if segment is None:
            continue
        prev = segments[-1] if segments else None
        if prev is not None:
            if prev.last_version is None:
                raise DataLossError(f"{prev.path}: empty segment that is not the last one")
            if segment.base_version != prev.last_version:
                raise DataLossError(
                    f"{path}: offset 0: base version {segment.base_version} does not follow the previous "
                    f"segment's last version {prev.last_version}"
                )
        if segment.first_version is None:
            if segment.base_version is not None and segment.name_version <= segment.base_version:
                raise DataLossError(f"{path}: offset 0: named below its base version {segment.base_version}")
        elif segment.first_version != segment.name_version:
            raise DataLossError(
                f"{path}: offset {FILE_HEADER_SIZE}: first record has version {segment.first_version}, "
                "not the one the file is named after"
            )
        elif segment.base_version is not None and segment.first_version <= segment.base_version:
            raise DataLossError(f"{path}: offset {FILE_HEADER_SIZE}: record version not above the base version")
        segments.append(segment)
    return segments, cut


def _scan(directory: Path, path: Path, is_last: bool, repair: bool) -> tuple[_Segment | None, TailCut | None]:
    """Check every frame of one segment; find a torn tail of the last one and, when `repair`, cut it off
    (the segment is None when its header was torn: it is deleted, or with no repair, skipped)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            base = parse_file_header(f.read(FILE_HEADER_SIZE))
        except CorruptFrame as exc:
            if is_last and valid_frame_after(f, 0) is None:
                # A crash while creating the segment: it never held an acknowledged record.
                if repair:
                    path.unlink()
                    fsync_dir(directory)
                return None, TailCut(path, 0, size, None, str(exc), segment_deleted=True)
            raise DataLossError(f"{path}: offset 0: {exc}") from exc
        segment = _Segment(path, int(SEGMENT_NAME.fullmatch(path.name)[1]), base)
        offset = FILE_HEADER_SIZE
        cut: TailCut | None = None
        while offset < size:
            try:
                version, frame_len, _payload = read_frame(f, offset, size)
            except CorruptFrame as exc:
                found = valid_frame_after(f, offset + 1)
                if is_last and found is None:
                    cut = TailCut(path, offset, size - offset, torn_version(f, offset), str(exc))
                    break
                detail = f"; a valid record follows at offset {found}" if found is not None else ""
                raise DataLossError(f"{path}: offset {offset}: {exc}{detail}") from exc
            if segment.last_version is not None and version <= segment.last_version:
                raise DataLossError(f"{path}: offset {offset}: version {version} after version {segment.last_version}")
            if segment.first_version is None:
                segment.first_version = version
            segment.last_version = version
            offset += frame_len
        segment.end = offset
    if offset < size and repair:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
    return segment, cut


class WriteAheadLog:
    """A segmented, checksummed, append-only log of (version, payload) records. Thread-safe.

    Use as a context manager, or call close().
    """

    def __init__(
        self, directory: Path, durability: Durability = Durability.FSYNC, segment_bytes: int = 256 << 20
    ) -> None:
        """Open the log in `directory` (created if missing) and recover it; see the module docstring.

        Raises DataLossError when the log is damaged in a way a crash mid-append cannot explain;
        `tail_cut` is the torn tail recovery cut off (None when there was none).
        """
        if isinstance(segment_bytes, bool) or not isinstance(segment_bytes, int) or segment_bytes <= 0:
            raise InvalidArgumentError(f"segment_bytes must be a positive int, got {segment_bytes!r}")
        self.directory = Path(directory)
        self.durability = Durability(durability)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._closed = False
        self._failed: OSError | None = None
        self._fd: int | None = None
        if not self.directory.is_dir():
            make_dir(self.directory, parents=True)
        self._segments, self.tail_cut = _recover(self.directory, repair=True)
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY)

    # -- public API -------------------------------------------------------------------------------

    @property
    def last_version(self) -> int | None:
        """Version of the last good record (or, once all were truncated, of the last one acknowledged)."""
        if not self._segments:
            return None
        last = self._segments[-1]
        return last.last_version if last.last_version is not None else last.base_version

    def append(self, version: int, payload: bytes) -> None:
        """Log one record; when this returns the record is as durable as `durability` promises.

        `version` must be greater than `last_version` (else InvalidArgumentError, nothing written).
        """
        version = _checked_version(version)
        try:
            view = memoryview(payload).cast("B")
        except TypeError as exc:
            raise InvalidArgumentError(f"payload must be contiguous bytes, got {type(payload).__name__}") from exc
        header = record_header(version, view)
        frame_len = len(header) + len(view)
        with self._lock:
            self._check_writable()
            last = self.last_version
            if last is not None and version <= last:
                raise InvalidArgumentError(f"version {version} is not above the log's last version {last}")
            try:
                current = self._segments[-1] if self._segments else None
                if current is None or (
                    current.last_version is not None and current.end + frame_len > self.segment_bytes
                ):
                    # The append's own fdatasync covers the new file's header; only its name needs a sync.
                    current = self._new_segment(version, sync_file=False, sync_dir=self.durability is Durability.FSYNC)
                elif current.last_version is None and current.name_version != version:
                    self._rename(current, version)
                assert self._fd is not None
                _write_all(self._fd, [memoryview(header), view], current.end)
            except OSError as exc:
                if is_disk_full(exc) and self._cut_back():
                    raise disk_full_error(self.directory, f"logging the push of version {version}", exc) from None
                self._fail(exc)
                raise
            try:
                if self.durability is Durability.FSYNC:
                    _datasync(self._fd)
            except OSError as exc:  # the kernel may have dropped the pages it could not write: never retry
                self._fail(exc)
                raise
            current.end += frame_len
            if current.first_version is None:
                current.first_version = version
            current.last_version = version

    def records(self, after_version: int | None = None) -> Iterator[WalRecord]:
        """Every good record with version > `after_version` (all when None), in version order.

        Sees the log as it is when iteration starts; records appended later are not included. Each
        record's CRC is checked again (DataLossError if a file changed since the log was opened).
        """
        files: list[tuple[BinaryIO, _Segment, int]] = []
        try:
            with self._lock:
                if self._closed:
                    raise InternalError(f"write-ahead log {self.directory} is closed")
                for seg in self._segments:
                    if seg.last_version is None:
                        continue
                    if after_version is not None and seg.last_version <= after_version:
                        continue
                    files.append((open(seg.path, "rb"), seg, seg.end))
            for f, seg, end in files:
                yield from self._read_segment(f, seg.path, end, after_version)
        finally:
            for f, _seg, _end in files:
                f.close()

    def truncate_through(self, version: int) -> None:
        """Delete the segments whose every record is <= `version` (the table is checkpointed at `version`).

        Rotates first when every record of the current segment is <= `version`, so that it can go
        too; the new, empty segment keeps `last_version` across a restart.
        """
        version = _checked_version(version)
        with self._lock:
            self._check_writable()
            if not self._segments:
                return
            try:
                current = self._segments[-1]
                if current.last_version is not None and current.last_version <= version:
                    # Named last_version + 1, the lowest version its first record can have; renamed then if
                    # needed. Synced before any deletion so a crash can never leave the directory empty.
                    self._new_segment(current.last_version + 1, sync_file=True, sync_dir=True)
                deleted = 0
                # Segments are in version order, so the deletable ones are a prefix; the current one stays.
                while len(self._segments) > 1:
                    oldest = self._segments[0]
                    if oldest.last_version is None or oldest.last_version > version:
                        break
                    oldest.path.unlink()
                    self._segments.pop(0)
                    deleted += 1
                if deleted:
                    fsync_dir(self.directory)
            except OSError as exc:
                if is_disk_full(exc):  # only the new segment's creation can need space, and it left nothing
                    raise disk_full_error(self.directory, "starting a new log segment", exc) from None
                self._fail(exc)
                raise

    def close(self) -> None:
        """Close the log; idempotent. Appending afterwards raises InternalError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- private ----------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise InternalError(f"write-ahead log {self.directory} is closed")
        if self._failed is not None:
            raise InternalError(
                f"write-ahead log {self.directory} refuses writes after an I/O error ({self._failed}): the "
                "disk may have dropped acknowledged writes; restart the daemon, which recovers from the log"
            )

    @property
    def failed(self) -> OSError | None:
        """The I/O error after which the log refuses appends until it is reopened (None: healthy)."""
        return self._failed

    def _cut_back(self) -> bool:
        """After a write that found the disk full: cut whatever part of the frame reached the file
        (the last segment back to its last good record). True when the log is as before the append."""
        if self._fd is None or not self._segments:
            return True  # the segment that was being created is unlinked by _new_segment
        try:
            os.ftruncate(self._fd, self._segments[-1].end)
            return True
        except OSError:
            return False

    def _fail(self, exc: OSError) -> None:
        self._failed = exc
        if self._fd is not None and self._segments:
            try:
                # Best effort: leave no partial frame behind (recovery would cut it off anyway).
                os.ftruncate(self._fd, self._segments[-1].end)
            except OSError:
                pass

    def _new_segment(self, name_version: int, sync_file: bool, sync_dir: bool) -> _Segment:
        """Create and switch to an empty segment named `name_version`."""
        path = segment_path(self.directory, name_version)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode())
        try:
            _write_all(fd, [memoryview(file_header(self.last_version))], 0)
            if sync_file:
                _datasync(fd)
            if sync_dir:
                fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        segment = _Segment(path, name_version, self.last_version)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._segments.append(segment)
        return segment

    def _rename(self, segment: _Segment, name_version: int) -> None:
        """Rename an empty segment after the record about to become its first."""
        path = segment_path(self.directory, name_version)
        os.rename(segment.path, path)
        segment.path = path
        segment.name_version = name_version
        if self.durability is Durability.FSYNC:
            fsync_dir(self.directory)

    def _read_segment(self, f: BinaryIO, path: Path, end: int, after_version: int | None) -> Iterator[WalRecord]:
        offset = FILE_HEADER_SIZE
        f.seek(offset)
        while offset < end:
            head = f.read(RECORD_HEADER_SIZE)
            try:
                if len(head) < RECORD_HEADER_SIZE:
                    raise CorruptFrame("incomplete record header")
                length, version, crc = parse_record_header(head)
                if after_version is not None and version <= after_version:
                    f.seek(length, os.SEEK_CUR)
                else:
                    payload = f.read(length)
                    if len(payload) < length or frame_crc(head, payload) != crc:
                        raise CorruptFrame("record CRC mismatch or short payload")
                    yield WalRecord(version, payload)
            except CorruptFrame as exc:
                raise DataLossError(
                    f"{path}: offset {offset}: {exc} (the file changed after the log was opened)"
                ) from exc
            offset += RECORD_HEADER_SIZE + length
