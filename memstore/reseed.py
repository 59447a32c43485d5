"""Re-seeding a replica over RPC: the whole table streamed from its primary, replacing the replica's.

A replica follows its primary's log (memstore.replica). When it cannot, because the records after
its version are no longer held (it was too far behind) or because its table holds pushes the
primary never had (a deposed primary: its log keeps after-images only, so they cannot be undone),
it is re-seeded: the primary snapshots its table into a hidden directory on its own host
(`LiveTable.snapshot`: files copied while pushes go on, then the logged pushes replayed, so the
copy holds exactly one version) and streams it (`StreamSnapshot`, `snapshot_chunks` here): a
header listing every file with its size, then each file's data extents (SEEK_DATA: the holes of a
sparse, lazy table are not sent and stay holes), each file closed by its digest. The hidden copy
is removed when the stream ends, however it ends.

The receiver (`reseed_from`) writes the files into a staging directory beside the table, checks
every file's digest and size and the manifest's fingerprint, fsyncs them, and only then swaps the
staging directory with the table directory (memstore.tabledir.staging.replace_table_dir: one
atomic exchange; the old files are never rewritten in place). A crash or a cancelled stream at any
point leaves the old table whole (and a hidden staging directory the next attempt removes). A table
a daemon holds (its writer lock) is never replaced: the caller stops serving it first.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import grpc

from memstore.auth import ClientTls, open_channel
from memstore.errors import DataLossError, InvalidArgumentError, error_from_rpc
from memstore.live import LiveTable
from memstore.replica import check_same_table
from memstore.space import check_free
from memstore.tabledir.fsafe import fsync_dir, make_dir, open_new
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import MANIFEST_NAME
from memstore.tabledir.staging import check_replaceable, check_table_root, replace_table_dir, staged
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

log = logging.getLogger("memstore.reseed")

DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 64 << 10
# What a header may list: a table has a few files per layer (rows, optimizer state, checksums).
MAX_FILES = 100_000
_EXTENT = struct.Struct("<QQ")


class ReseedPolicy(enum.Enum):
    """What a replica does when it can no longer follow its primary."""

    AUTO = "auto"  # re-seed itself over the stream, then follow again
    NEVER = "never"  # stop following (NOT_SERVING) until an operator re-seeds it


@dataclass(frozen=True)
class ReseedResult:
    """What a re-seed brought: the version now held, and what crossed the wire."""

    version: int
    files: int
    total_bytes: int  # the files' sizes, holes included
    data_bytes: int  # bytes sent (holes excluded)
    seconds: float


# -- the sending side (the primary) --------------------------------------------------------------


def chunk_size(requested: int, max_message_bytes: int) -> int:
    """File bytes per message: `requested` (0: the default) within [MIN_CHUNK_BYTES, a message's limit
    less room for the framing]."""
    ceiling = max(MIN_CHUNK_BYTES, max_message_bytes - 4096)
    return min(max(requested or DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES), ceiling)


def snapshot_chunks(live: LiveTable, scratch: Path, chunk_bytes: int) -> Iterator[pb.SnapshotChunk]:
    """Snapshot `live` into a hidden directory under `scratch` and yield it as a StreamSnapshot stream;
    the directory is removed when the generator ends, is closed (a cancelled stream) or fails."""
    _remove_orphans(scratch, _STREAM_COPY)
    copy = scratch / f".stream-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        version = live.snapshot(copy)
        files = _table_files(copy)
        extents = {path: _extents(copy / path) for path in files}
        header = pb.SnapshotStreamHeader(version=version, fingerprint=live.manifest.fingerprint)
        for path in files:
            size = (copy / path).stat().st_size
            header.files.add(path=path, size=size, data_bytes=sum(length for _, length in extents[path]))
        header.total_bytes = sum(f.size for f in header.files)
        header.data_bytes = sum(f.data_bytes for f in header.files)
        log.info(
            "streaming a snapshot of version %d: %d files, %.1f MB of data (%.1f MB with holes)",
            version,
            len(files),
            header.data_bytes / 1e6,
            header.total_bytes / 1e6,
        )
        yield pb.SnapshotChunk(header=header)
        for index, path in enumerate(files):
            digest = hashlib.sha256()
            fd = os.open(copy / path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                for start, length in extents[path]:
                    for offset in range(start, start + length, chunk_bytes):
                        data = os.pread(fd, min(chunk_bytes, start + length - offset), offset)
                        digest.update(_EXTENT.pack(offset, len(data)))
                        digest.update(data)
                        yield pb.SnapshotChunk(data=pb.SnapshotFileData(file=index, offset=offset, data=data))
            finally:
                os.close(fd)
            yield pb.SnapshotChunk(end=pb.SnapshotFileEnd(file=index, sha256=digest.digest()))
    finally:
        shutil.rmtree(copy, ignore_errors=True)


# A primary's hidden stream copy (`.stream-PID-HEX`) and the snapshot's staging of it (`..stream-PID-HEX.snapshot-...`).
_STREAM_COPY = re.compile(r"\.{1,2}stream-(\d+)-[0-9a-f]+(\.snapshot-.*)?")


def _remove_orphans(directory: Path, pattern: re.Pattern[str]) -> None:
    """Remove what a killed process left there: the entries matching `pattern` (group 1: the pid that
    wrote them) whose process is gone. A table-sized copy must not linger until someone notices."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        log.warning("removing %s, left by a re-seed that was interrupted (process %s is gone)", entry, match.group(1))
        shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _table_files(root: Path) -> list[str]:
    """Every regular file under `root`, as sorted '/'-separated relative paths (the manifest last: a
    receiver that stops early never holds a manifest without its files)."""
    found = []
    for parent, _dirs, names in os.walk(root):
        for name in names:
            path = Path(parent) / name
            if path.is_file() and not path.is_symlink():
                found.append(path.relative_to(root).as_posix())
    return sorted(found, key=lambda p: (p == MANIFEST_NAME, p))


def _extents(path: Path) -> list[tuple[int, int]]:
    """The (offset, length) data extents of a file (one extent covering it where SEEK_DATA is not supported)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents, offset = [], 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                return [(0, size)]  # no SEEK_DATA here: send it whole
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end - start))
            offset = end
        return extents
    finally:
        os.close(fd)


# -- the receiving side (the replica) ------------------------------------------------------------


def reseed_from(
    primary: str,
    table_dir: str | Path,
    *,
    tls: ClientTls | None = None,
    token: str | None = None,
    chunk_bytes: int = 0,
    receiver_id: str = "",
    timeout_s: float | None = None,
    allow_other_table: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> ReseedResult:
    """Replace the table at `table_dir` with a consistent copy of the table the daemon at `primary`
    serves, streamed over `StreamSnapshot` (a replicate token for a daemon with --token-file).

    Atomic: the copy is received into a staging directory beside `table_dir`, every file's digest
    and the manifest's fingerprint are checked and the files fsynced, and only then is it swapped
    with the table directory; any failure (a broken stream, a digest mismatch, a crash) leaves the
    old table as it was. `table_dir` may not exist yet (a new replica). Raises UnavailableError
    while a daemon or reader holds the table (stop serving it first), LayoutMismatchError when the
    primary serves another table than the one at `table_dir` (unless `allow_other_table`),
    DataLossError when what arrived does not match what was announced, and the error of the
    primary's refusal otherwise. `on_chunk(bytes)` is called per data message (progress, tests).
    `timeout_s`: a deadline for the whole stream (None: none). Returns what was received.
    """
    table_dir = Path(table_dir)
    check_replaceable(table_dir)  # fail before streaming gigabytes, not after (checked again at the swap)
    started = time.monotonic()
    options = [("grpc.max_receive_message_length", -1)]
    with open_channel(primary, options, tls, token) as channel:
        request = pb.StreamSnapshotRequest(follower_id=receiver_id, chunk_bytes=chunk_bytes)
        call = pb_grpc.MemstoreStub(channel).StreamSnapshot(request, timeout=timeout_s)
        try:
            header = install_stream(call, table_dir, primary, allow_other_table, on_chunk)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()  # after a failure here: the primary stops sending and removes its copy
    result = ReseedResult(
        header.version, len(header.files), header.total_bytes, header.data_bytes, time.monotonic() - started
    )
    log.info(
        "re-seeded %s from %s: version %d, %d files, %.1f MB received in %.1fs",
        table_dir,
        primary,
        result.version,
        result.files,
        result.data_bytes / 1e6,
        result.seconds,
    )
    return result


def install_stream(
    chunks: Iterator[pb.SnapshotChunk],
    table_dir: Path,
    source: str,
    allow_other_table: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> pb.SnapshotStreamHeader:
    """Receive a StreamSnapshot stream (`chunks`, from `source`, for messages) into a staging directory
    beside `table_dir`, check it whole, and swap it with the table there (see `reseed_from`); its header."""
    ours = _current_manifest(table_dir)
    _remove_orphans(table_dir.parent, re.compile(rf"\.{re.escape(table_dir.name)}\.reseed-(\d+)"))
    with staged(table_dir, "reseed") as tmp:
        header = _receive(chunks, tmp, on_chunk)
        theirs = Manifest.read(tmp)
        if theirs.fingerprint != header.fingerprint:
            raise DataLossError(
                f"the snapshot streamed from {source} has a manifest of fingerprint {theirs.fingerprint}, not the "
                f"{header.fingerprint[:64]} announced; nothing was replaced"
            )
        if ours is not None and not allow_other_table:
            check_same_table(ours, theirs, f"the table at {table_dir}", f"the table {source} serves")
        replace_table_dir(tmp, table_dir, overwrite=True)
    return header


def _current_manifest(table_dir: Path) -> Manifest | None:
    """The manifest of the table at `table_dir`; None when nothing is there; InvalidArgumentError for
    something that is not a memstore table (never replaced)."""
    if not os.path.lexists(table_dir):
        return None
    check_table_root(table_dir)
    if not (table_dir / MANIFEST_NAME).exists():
        raise InvalidArgumentError(
            f"{table_dir} is a sharded table's root: re-seed each shard directory from its own primary"
        )
    return Manifest.read(table_dir)


def _receive(
    call: Iterator[pb.SnapshotChunk], tmp: Path, on_chunk: Callable[[int], None] | None
) -> pb.SnapshotStreamHeader:
    """Write the stream's files into `tmp`, checking sizes, order and digests; the header."""
    first = next(call, None)
    if first is None or first.WhichOneof("part") != "header":
        raise DataLossError("the snapshot stream did not begin with its header; nothing was replaced")
    header = first.header
    paths = _check_paths(header)
    check_free(tmp.parent, header.data_bytes, "the re-seeded table", "free space there, then re-seed again")
    fds: dict[int, int] = {}
    digests: dict[int, hashlib._Hash] = {}
    next_offset: dict[int, int] = {}
    received: dict[int, int] = {}
    ended: set[int] = set()
    try:
        for chunk in call:
            part = chunk.WhichOneof("part")
            if part == "data":
                data = chunk.data
                index = _file_index(data.file, header, ended)
                entry = header.files[index]
                if index not in fds:
                    fds[index] = _create(tmp, paths[index], entry.size)
                    digests[index], next_offset[index], received[index] = hashlib.sha256(), 0, 0
                end = data.offset + len(data.data)
                if data.offset < next_offset[index] or end > entry.size:
                    raise DataLossError(
                        f"the snapshot stream sent bytes {data.offset}..{end} of {entry.path} (size {entry.size}) out "
                        "of order or past its end; nothing was replaced"
                    )
                _write_all(fds[index], data.data, data.offset)
                digests[index].update(_EXTENT.pack(data.offset, len(data.data)))
                digests[index].update(data.data)
                next_offset[index], received[index] = end, received[index] + len(data.data)
                if on_chunk is not None:
                    on_chunk(len(data.data))
            elif part == "end":
                index = _file_index(chunk.end.file, header, ended)
                entry = header.files[index]
                if index not in fds:  # a file of holes only, or empty
                    fds[index] = _create(tmp, paths[index], entry.size)
                    digests[index], received[index] = hashlib.sha256(), 0
                if received[index] != entry.data_bytes or digests[index].digest() != chunk.end.sha256:
                    raise DataLossError(
                        f"{entry.path} arrived damaged ({received[index]} of {entry.data_bytes} data bytes, digest "
                        f"{'matching' if digests[index].digest() == chunk.end.sha256 else 'not matching'}); nothing "
                        "was replaced: re-seed again"
                    )
                os.fsync(fds.pop(index))
                ended.add(index)
            else:
                raise DataLossError(f"the snapshot stream sent a second header or an empty message ({part})")
        missing = [header.files[i].path for i in range(len(header.files)) if i not in ended]
        if missing:
            raise DataLossError(
                f"the snapshot stream ended before {len(missing)} of its files ({', '.join(missing[:3])}) arrived "
                "whole; nothing was replaced: re-seed again"
            )
    finally:
        for fd in fds.values():
            os.close(fd)
    for parent, dirs, _names in os.walk(tmp):  # the new files' names durable before the swap
        for name in dirs:
            fsync_dir(Path(parent) / name)
    fsync_dir(tmp)
    return header


def _check_paths(header: pb.SnapshotStreamHeader) -> list[PurePosixPath]:
    """The header's paths, each a plain relative path inside the table directory, none twice."""
    if not 0 < len(header.files) <= MAX_FILES:
        raise DataLossError(f"the snapshot stream announced {len(header.files)} files (1 to {MAX_FILES} expected)")
    paths, seen = [], set()
    for entry in header.files:
        path = PurePosixPath(entry.path)
        if (
            not entry.path
            or "\0" in entry.path
            or "\\" in entry.path
            or path.is_absolute()
            or any(part in ("", ".", "..") for part in entry.path.split("/"))
            or entry.path in seen
            or entry.data_bytes > entry.size
        ):
            raise DataLossError(f"the snapshot stream announced a file {entry.path[:200]!r} that is refused")
        seen.add(entry.path)
        paths.append(path)
    if MANIFEST_NAME not in seen:
        raise DataLossError(f"the snapshot stream announced no {MANIFEST_NAME}; nothing was replaced")
    return paths


def _file_index(index: int, header: pb.SnapshotStreamHeader, ended: set[int]) -> int:
    if index >= len(header.files) or index in ended:
        raise DataLossError(f"the snapshot stream sent data for file {index}, which is not expected now")
    return index


def _create(tmp: Path, path: PurePosixPath, size: int) -> int:
    """A new private file at tmp/path of `size` bytes (all a hole until written)."""
    target = tmp.joinpath(*path.parts)
    parent = target.parent
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        make_dir(directory)
    fd = open_new(target, os.O_WRONLY)
    os.ftruncate(fd, size)
    return fd


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
