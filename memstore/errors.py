"""The project's exceptions, and their mapping to and from gRPC status codes.

Server and client share this module: the daemon raises these from plain functions and
the servicer turns them into status codes; the client turns status codes back into them,
so callers only ever catch `MemstoreError` subclasses, never `grpc.RpcError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc


class MemstoreError(Exception):
    """Base of every error this project raises."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(MemstoreError, ValueError):
    """The request is malformed: unknown layer, ids out of range, wrong byte length ..."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(MemstoreError):
    """A configured limit refused the call. `retry_after_s` is None when the request itself is over
    the limit (split it, or raise the limit); otherwise the daemon was busy and a retry after that
    many seconds may succeed (nothing was applied)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(MemstoreError):
    """The daemon could not be reached (after retries)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(MemstoreError, TimeoutError):
    """The call did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class LayoutMismatchError(MemstoreError):
    """The table served is not the one the caller's model was built for."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class WrongShardError(LayoutMismatchError):
    """Rows were sent to a shard that does not hold their partition."""


class TableFormatError(MemstoreError):
    """A table directory on disk is missing, incomplete or inconsistent."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ReplicationGapError(MemstoreError):
    """A follower asked for pushes its primary cannot stream: older than the primary still holds
    (the follower is too far behind), or past the primary's own version (the two tables diverged)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(MemstoreError):
    """The call carried no valid bearer token (or no client certificate the daemon trusts)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ReadOnlyError(MemstoreError):
    """A write was refused: the table is served read-only, frozen or as a replica, or the
    caller's token may only read."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DataLossError(MemstoreError):
    """A response arrived incomplete or inconsistent."""

    code = grpc.StatusCode.DATA_LOSS


class InternalError(MemstoreError):
    """A bug or an unexpected failure inside the daemon."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[MemstoreError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        LayoutMismatchError,
        ReadOnlyError,
        UnauthenticatedError,
        DataLossError,
        InternalError,
    )
}


def error_from_status(code: grpc.StatusCode, details: str) -> MemstoreError:
    """The project exception for a gRPC status code (MemstoreError for codes without a subclass)."""
    cls = _BY_CODE.get(code, MemstoreError)
    err = cls(f"{code.name}: {details}" if cls is MemstoreError else details)
    err.code = code
    return err


# gRPC's retry pushback (trailing metadata, milliseconds): negative means "do not retry".
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def error_from_rpc(exc: grpc.RpcError) -> MemstoreError:
    """Translate a failed call (a grpc.RpcError that is also a grpc.Call) into a project exception."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    err = error_from_status(code, details or "no details")
    if isinstance(err, ResourceExhaustedError):
        err.retry_after_s = _pushback_s(exc)
    return err


def _pushback_s(exc: grpc.RpcError) -> float | None:
    """The server's retry pushback in seconds; None when it said not to retry (or said nothing
    and the limit is gRPC's own message size, which a retry cannot meet either)."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                millis = int(value)
            except ValueError:
                return None
            return None if millis < 0 else millis / 1000
    details = exc.details() if hasattr(exc, "details") else ""
    # gRPC's own concurrency limit sends no pushback; it clears as calls finish.
    return 0.0 if details and "Concurrent RPC limit" in details else None


def permission_message(path: Path) -> str:
    """What to do about a table file this process may not open (names its owner and mode)."""
    try:
        st = path.stat()
        owner = f"owned by uid {st.st_uid}, mode {st.st_mode & 0o777:o}"
    except OSError:
        owner = "its directory cannot be searched"
    return (
        f"{path} cannot be opened: permission denied ({owner}) for uid {os.geteuid()}; run as a user who may "
        "read and write the table's files, or fix their ownership or mode (chown/chmod)"
    )
