"""The write-ahead log's on-disk format: segment file names, the segment header and the record frame.

docs/format.md ("wal/: the write-ahead log") describes it for users; `memstore.wal` is the log
that writes, recovers and truncates it. The payload of a frame is opaque here (a push record:
memstore.tabledir.record).

A directory of segment files ``wal-{version:020d}.log``, zero-padded so that lexical order is
version order. A segment is named after its first record's version when it is created; a segment
with no record yet is renamed to its first record's version when that record arrives.

Every segment starts with a 20-byte file header, little-endian::

    magic        4s   b"EWSG"
    format       u16  1
    flags        u16  bit 0: base_version is set
    base_version u64  the log's last version when this segment was created (its records are all greater)
    crc32        u32  zlib.crc32 of the 16 bytes above

followed by back-to-back frames, each a 28-byte header then the payload::

    magic        4s   b"EWAL"
    format       u16  1
    reserved     u16  0
    length       u64  payload bytes
    version      u64  the table version this record produces; strictly increasing across the log
    crc32        u32  zlib.crc32 of the 24 header bytes above, then of the payload
    payload      length bytes

The base version lets a log whose every record was truncated away (only an empty segment left)
still know, after a restart, the last version it acknowledged.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"EWSG"
RECORD_MAGIC = b"EWAL"
_FILE_HEADER = struct.Struct("<4sHHQI")
_RECORD_HEADER = struct.Struct("<4sHHQQI")
FILE_HEADER_SIZE = _FILE_HEADER.size  # 20
RECORD_HEADER_SIZE = _RECORD_HEADER.size  # 28
_RECORD_CRC_OFFSET = _RECORD_HEADER.size - 4
_HAS_BASE = 1
SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")  # group 1: the version the segment is named after


class CorruptFrame(Exception):
    """A frame or file header that does not check out; the message says why."""


def segment_path(directory: Path, version: int) -> Path:
    """The segment of the log in `directory` named after `version`."""
    return directory / f"wal-{version:020d}.log"


def file_header(base_version: int | None) -> bytes:
    """A segment's file header (`base_version` None: the log had no version when it was created)."""
    flags = 0 if base_version is None else _HAS_BASE
    head = struct.pack("<4sHHQ", SEGMENT_MAGIC, FORMAT_VERSION, flags, base_version or 0)
    return head + struct.pack("<I", zlib.crc32(head))


def parse_file_header(data: bytes) -> int | None:
    """The base version in a segment's file header; raises CorruptFrame."""
    if len(data) < _FILE_HEADER.size:
        raise CorruptFrame(f"incomplete file header ({len(data)} of {_FILE_HEADER.size} bytes)")
    magic, fmt, flags, base, crc = _FILE_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise CorruptFrame(f"bad file magic {magic!r}")
    if zlib.crc32(data[: _FILE_HEADER.size - 4]) != crc:
        raise CorruptFrame("file header CRC mismatch")
    if fmt != FORMAT_VERSION:
        raise CorruptFrame(f"unsupported format version {fmt}")
    return base if flags & _HAS_BASE else None


def record_header(version: int, payload: memoryview) -> bytes:
    """The header of the frame that logs `payload` as `version` (its CRC covers the payload)."""
    head = struct.pack("<4sHHQQ", RECORD_MAGIC, FORMAT_VERSION, 0, len(payload), version)
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


def parse_record_header(data: bytes, offset: int = 0) -> tuple[int, int, int]:
    """(payload length, version, crc) of the complete record header at `offset`; raises CorruptFrame."""
    magic, fmt, _reserved, length, version, crc = _RECORD_HEADER.unpack_from(data, offset)
    if magic != RECORD_MAGIC:
        raise CorruptFrame(f"bad record magic {magic!r}")
    if fmt != FORMAT_VERSION:
        raise CorruptFrame(f"unsupported record format version {fmt}")
    return length, version, crc


def frame_crc(head: bytes | memoryview, payload: bytes | memoryview) -> int:
    """The CRC a frame's header should hold: of its header's bytes before the CRC, then of its payload."""
    return zlib.crc32(payload, zlib.crc32(head[:_RECORD_CRC_OFFSET]))


def read_frame(f: BinaryIO, offset: int, size: int) -> tuple[int, int, bytes]:
    """(version, frame length, payload) of the frame at `offset`, fully checked; raises CorruptFrame."""
    f.seek(offset)
    head = f.read(_RECORD_HEADER.size)
    if len(head) < _RECORD_HEADER.size:
        raise CorruptFrame(f"incomplete record header ({len(head)} of {_RECORD_HEADER.size} bytes)")
    length, version, crc = parse_record_header(head)
    if length > size - offset - _RECORD_HEADER.size:
        raise CorruptFrame(f"payload of {length} bytes runs past the end of the file")
    payload = f.read(length)
    if len(payload) < length:
        raise CorruptFrame("payload shorter than its header says")
    if frame_crc(head, payload) != crc:
        raise CorruptFrame("record CRC mismatch")
    return version, _RECORD_HEADER.size + length, payload


def valid_frame_after(f: BinaryIO, start: int) -> int | None:
    """Offset of the first CRC-valid frame at or after `start`, or None.

    A crash mid-append leaves no valid frame after the damage; a good frame there means records
    the log acknowledged would be lost by cutting the file, so that is corruption, not a torn tail.
    """
    f.seek(start)
    data = f.read()
    view = memoryview(data)
    pos = data.find(RECORD_MAGIC)
    while 0 <= pos <= len(data) - _RECORD_HEADER.size:
        try:
            length, _version, crc = parse_record_header(data, pos)
        except CorruptFrame:
            length, crc = -1, None
        body = pos + _RECORD_HEADER.size
        if 0 <= length <= len(data) - body:
            if frame_crc(view[pos:body], view[body : body + length]) == crc:
                return start + pos
        pos = data.find(RECORD_MAGIC, pos + 1)
    return None


def torn_version(f: BinaryIO, offset: int) -> int | None:
    """The version a damaged frame's header names, if the header is complete and has the record magic."""
    f.seek(offset)
    head = f.read(_RECORD_HEADER.size)
    if len(head) < _RECORD_HEADER.size:
        return None
    try:
        return parse_record_header(head)[1]
    except CorruptFrame:
        return None
