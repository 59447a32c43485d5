"""MemstoreClient: deadlines, retries, dedup and the project's exceptions around the gRPC stub."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from client.config import ClientConfig, check_timeout, seconds_left
from client.dataplane import DataPlaneUnavailable
from client.dataplane_route import DataPlaneRoute
from memstore.codec import check_request_rows, encode_grads, encode_row_ids
from memstore.dtypes import DType
from memstore.errors import (
    DataLossError,
    InvalidArgumentError,
    LayoutMismatchError,
    ResourceExhaustedError,
    UnavailableError,
    error_from_rpc,
)
from memstore.same_host import SameHostReader, open_if_same_host
from memstore.storage.base import take_rows
from memstore.tabledir.manifest import Manifest
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

_T = TypeVar("_T")


class MemstoreClient:
    """A connection to one memstore daemon. Thread-safe; use as a context manager.

    `expected_fingerprint`, when given, is checked against the served table before the
    client is returned, so a model never reads rows of a table built for another layout.
    """

    def __init__(
        self, address: str, config: ClientConfig | None = None, *, expected_fingerprint: str | None = None
    ) -> None:
        self.address = address
        self.config = config or ClientConfig()
        self._channel = self.config.open_channel(address)
        self._stub = pb_grpc.MemstoreStub(self._channel)
        self._describe_lock = threading.Lock()
        self._described: pb.DescribeResponse | None = None
        self._manifest_parsed: Manifest | None = None
        self._local: SameHostReader | None = None
        self._local_checked = False
        self._seen_lock = threading.Lock()
        self._seen_version = 0
        self._retired: list[SameHostReader] = []
        self._route = DataPlaneRoute(address, self.config, self._stub, self._call, self._remember_describe)
        if expected_fingerprint is not None:
            try:
                self.check_fingerprint(expected_fingerprint)
            except BaseException:
                self.close()
                raise

    def describe(self, timeout: float | None = None) -> Manifest:
        """The served table's manifest (layout, dtype, seed, fingerprint)."""
        return self._manifest(timeout)

    @property
    def trainable(self) -> bool:
        """Whether the daemon takes pushes (its table has an optimizer and is served writable)."""
        return self._describe(None).trainable

    @property
    def mutable(self) -> bool:
        """Whether the served table can change while this client reads it: it takes pushes, or it is a read
        replica applying its primary's (a device cache then follows the changes, client.coherence)."""
        served = self._describe(None)
        return served.trainable or served.replication.role == pb.REPLICATION_ROLE_REPLICA

    def server_limits(self, timeout: float | None = None) -> pb.ServerLimits:
        """Limits the server enforces (max rows per request, chunk size)."""
        return self._describe(timeout).limits

    def check_fingerprint(self, expected: str, timeout: float | None = None) -> None:
        """Raise LayoutMismatchError unless the served table has the expected fingerprint."""
        served = self._describe(timeout)
        if served.fingerprint != expected:
            manifest = Manifest.from_json(served.manifest_json)
            raise LayoutMismatchError(
                f"{self.address} serves a table with fingerprint {served.fingerprint}, expected {expected}: "
                f"it has layers {list(manifest.layout.layer_ids)}, vocab sizes "
                f"{list(manifest.layout.vocab_size_per_ngram)}, {manifest.layout.heads_per_ngram} heads, "
                f"dim {manifest.layout.dim}, seed {manifest.seed}; point the model at the table built for it"
            )

    def lookup(
        self,
        layer_id: int,
        row_ids: Any,
        *,
        timeout: float | None = None,
        out: torch.Tensor | None = None,
        return_version: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, int]:
        """Rows for `row_ids` (numpy/torch integers of any shape) of one layer: [*row_ids.shape, dim].

        Duplicate ids cross the wire once when that saves at least `config.dedup_min_saving`
        of the rows (Engram's Zipfian N-grams repeat a lot). The tensor has the stored dtype, on the CPU.
        With `out` (a contiguous CPU tensor of the stored dtype and [*row_ids.shape, dim] or
        [row_ids.size, dim]) the rows land there and a view of `out` is returned: buffers
        reused across steps (the prefetcher's) cost no allocation. With `return_version`, also
        the table version the rows show (pushes applied; no row is torn by a concurrent push).
        """
        check_layer_id(layer_id)
        ids = as_int64_array(row_ids)
        flat = ids.reshape(-1)  # [N]
        # One deadline for the whole call: the first lookup's Describe takes from it too.
        deadline = time.monotonic() + self._timeout(timeout)
        target = None if out is None else out_rows(out, ids.shape, self._manifest(seconds_left(deadline)))  # [N, dim]
        local = self._same_host_table(seconds_left(deadline))
        if local is not None:  # rows straight from the mapped files: same checks, same errors as the daemon
            done = self._lookup_same_host(local, layer_id, ids, flat, target, deadline)
            if done is not None:
                return done if return_version else done[0]
        # numpy, not torch, on this path: torch's OpenMP workers spin after each parallel op
        # and starve the gRPC receive thread on small hosts (measured: 2x slower lookups).
        # Restoring duplicates costs a row gather here, so dedup only when it saves rows on the wire.
        if self._dedup_pays(_distinct_count(flat), len(flat)):
            unique, inverse = np.unique(flat, return_inverse=True)  # [U], [N]
            dtype, rows, version = self._fetch(layer_id, unique, deadline)  # [U, dim]
            rows = take_rows(rows, inverse, target)  # [N, dim]
        else:
            dtype, rows, version = self._fetch(layer_id, flat, deadline, target)  # [N, dim]
        self.note_version(version)
        tensor = dtype.to_torch(rows.reshape(*ids.shape, rows.shape[-1]))  # [*shape, dim]
        return (tensor, version) if return_version else tensor

    def _lookup_same_host(
        self,
        local: SameHostReader,
        layer_id: int,
        ids: np.ndarray,
        flat: np.ndarray,
        target: np.ndarray | None,
        deadline: float,
    ) -> tuple[torch.Tensor, int] | None:
        """(rows [*ids.shape, dim], their version) read from the mapped table, or None when pushes kept
        overlapping the read (the caller asks the daemon). Every call of a decoding step comes here: keep it
        free of locks and of Describe (the limit came with `local`)."""
        limit = local.max_rows_per_request  # always given by _same_host_table
        if limit is not None and len(flat) > limit:  # the rows the wire would carry, deduplicated or not
            distinct = _distinct_count(flat)
            check_request_rows(distinct if self._dedup_pays(distinct, len(flat)) else len(flat), limit)
        if local.row_cache is not None:  # the daemon's row cache: its rows here, the rest over gRPC
            rows, version = self._lookup_cached(local, layer_id, flat, target, deadline)  # [N, dim]
        else:
            got = local.gather(layer_id, flat, target)  # None: pushes kept overlapping the read
            if got is None:
                return None
            rows, version = got  # [N, dim]
        self.note_version(version)
        if ids.ndim != 1:
            rows = rows.reshape(*ids.shape, rows.shape[-1])  # [*shape, dim]
        return local.manifest.dtype.to_torch(rows), version

    def _lookup_cached(
        self, local: SameHostReader, layer_id: int, flat: np.ndarray, target: np.ndarray | None, deadline: float
    ) -> tuple[np.ndarray, int]:
        """Rows copied from the daemon's row cache, the distinct ones it lacked fetched over gRPC (which
        admits them there); and a version every row shows at least."""
        rows, missed, version = local.gather_cached(layer_id, flat, target)  # [N, dim], [N]
        if missed.all() and not local.row_cache.alive():  # its daemon stopped: ask the one serving now
            self._forget_same_host(local)
        if missed.any():
            wanted, back = np.unique(flat[missed], return_inverse=True)  # [U], [M]
            _, fetched, fetched_version = self._fetch(layer_id, wanted, deadline)  # [U, dim]
            rows[missed] = take_rows(fetched, back)
            version = min(version, fetched_version)
        return rows, version

    def push(
        self,
        layer_id: int,
        row_ids: Any,
        grads: Any,
        *,
        step_id: int = 0,
        lr_scale: float | None = None,
        timeout: float | None = None,
    ) -> PushAck:
        """Send gradients [*row_ids.shape, dim] for rows of one layer to the table's optimizer.

        Gradients of repeated ids are summed here first (what the optimizer of an in-process
        sparse embedding does too); they travel as float32 whatever the storage dtype.
        Returns once the daemon has made the update durable and visible: the table version
        after it. `lr_scale` multiplies the table's learning rate (a schedule's factor).
        `step_id` (> 0, increasing per client and layer) makes the push safe to retry: the daemon
        answers a repeat of the last step it applied for this client and layer without applying
        it again, so UNAVAILABLE is retried only for pushes that carry one.
        """
        check_layer_id(layer_id)
        ids = as_int64_array(row_ids).reshape(-1)  # [N]
        unique, summed = sum_duplicate_rows(ids, grad_rows(grads, len(ids)))  # [U], [U, dim]
        request = pb.PushRequest(
            layer_id=layer_id,
            row_ids=encode_row_ids(unique),
            grads=encode_grads(summed),
            step_id=step_id,
            client_id=self.config.client_id,
        )
        if lr_scale is not None:
            request.lr_scale = lr_scale
        deadline = time.monotonic() + self._timeout(timeout)

        def attempt(seconds: float) -> PushAck:
            response = self._call(self._stub.Push, request, seconds)
            self.note_version(response.version)
            return PushAck(version=response.version, layer_step=response.layer_step, rows=len(unique))

        # A push may have been applied before its answer was lost: only one with a step id (which the
        # daemon recognises when repeated) is safe to send again on UNAVAILABLE.
        return self._retrying(attempt, deadline, retry_unavailable=step_id > 0)

    def snapshot(self, name: str, *, timeout: float | None = None) -> tuple[str, int]:
        """Ask the daemon for a consistent snapshot named `name` (in its snapshot directory):
        (its path on the daemon's host, the version it holds)."""
        response = self._unary(self._stub.Snapshot, pb.SnapshotRequest(name=name), timeout, retry=False)
        return response.path, response.version

    def version(self, timeout: float | None = None) -> int:
        """The served table's version now (pushes applied since creation)."""
        version = self._unary(self._stub.Describe, pb.DescribeRequest(), timeout).version
        self.note_version(version)
        return version

    @property
    def seen_version(self) -> int:
        """The newest table version this client has heard of: its lookups' and pushes' answers, `version()`,
        and what `note_version` was told (a device cache's row watch). A coherent device cache stays within
        its lag bound of it."""
        return self._seen_version

    def note_version(self, version: int) -> None:
        """Record that the table has reached `version` (kept if newer than `seen_version`)."""
        if version > self._seen_version:
            with self._seen_lock:
                self._seen_version = max(self._seen_version, version)

    def watch_rows(self, from_version: int, layer_ids: Any = (), heartbeat_s: float = 0.0) -> RowWatch:
        """The rows every push past `from_version` leaves, as they land (`RowWatch`, iterable; cancel() ends it).

        The stream has no deadline: it lives while the table trains, with a heartbeat every `heartbeat_s`
        (0: the daemon's default) when idle; its reader watches for silence (client.coherence). Iterating raises
        the project's exceptions: LayoutMismatchError (FAILED_PRECONDITION) when the pushes after `from_version`
        are no longer held."""
        request = pb.WatchRowsRequest(from_version=from_version, layer_ids=list(layer_ids), heartbeat_s=heartbeat_s)
        manifest = self._manifest(None)
        return RowWatch(self._stub.WatchRows(request), manifest.dtype, manifest.dtype.stored_width(manifest.layout.dim))

    def stats(self, timeout: float | None = None) -> str:
        """The daemon's metrics in the Prometheus text format (`memstore.metrics.summarize` reads them)."""
        return self._unary(self._stub.Stats, pb.StatsRequest(), timeout).prometheus_text

    def _fetch(
        self, layer_id: int, ids: np.ndarray, deadline: float, out: np.ndarray | None = None
    ) -> tuple[DType, np.ndarray, int]:
        """(dtype, rows [N, dim], the version of the first message: every row shows at least it).

        Over the data plane when the daemon offers it, else gRPC streaming. A daemon too busy for the
        lookup (its in-flight budget or call limit) refuses it before sending a row; it is repeated
        until the deadline: a loaded daemon slows its callers down rather than failing them. A lookup
        that failed UNAVAILABLE (no daemon, or the connection broke mid-stream) is repeated whole,
        `max_attempts` times in all.
        """
        request: pb.LookupRequest | None = None
        rows = out

        def attempt(seconds: float) -> tuple[DType, np.ndarray, int]:
            nonlocal request, rows
            plane = self._route.planes(time.monotonic() + seconds)
            if plane is not None:
                manifest = self._manifest(seconds)
                dtype = manifest.dtype
                if rows is None:
                    rows = np.empty((len(ids), dtype.stored_width(manifest.layout.dim)), dtype.numpy)
                try:
                    return dtype, rows, plane.lookup(layer_id, ids, time.monotonic() + seconds, rows)
                except DataPlaneUnavailable as exc:
                    if self.config.data_plane:
                        raise
                    self._route.fall_back(plane, exc)
            if request is None:
                request = pb.LookupRequest(layer_id=layer_id, row_ids=encode_row_ids(ids))
            return self._fetch_once(request, layer_id, len(ids), seconds, rows)

        return self._retrying(attempt, deadline)

    def _remember_describe(self, served: pb.DescribeResponse) -> None:
        with self._describe_lock:
            if self._described is None:
                self._described = served

    def _fetch_once(
        self, request: pb.LookupRequest, layer_id: int, num_ids: int, timeout: float, out: np.ndarray | None
    ) -> tuple[DType, np.ndarray, int]:
        dtype: DType | None = None
        version = 0
        received = 0
        try:
            for message in self._stub.Lookup(request, timeout=timeout):
                if dtype is None:
                    dtype = DType.from_wire(message.dtype)
                    version = message.version
                    if out is None:
                        out = np.empty((message.num_rows, dtype.stored_width(message.dim)), dtype=dtype.numpy)
                    elif out.shape != (message.num_rows, dtype.stored_width(message.dim)) or out.dtype != dtype.numpy:
                        raise DataLossError(
                            f"lookup of layer {layer_id} answered {message.num_rows} x {message.dim} rows of "
                            f"{dtype.value}; the client expected {out.shape} of {out.dtype} from the table's manifest"
                        )
                chunk = np.frombuffer(message.rows, dtype=out.dtype)
                count = len(chunk) // out.shape[1]
                if message.row_offset != received or len(chunk) % out.shape[1] or received + count > len(out):
                    raise DataLossError(f"lookup response inconsistent at row {received} of layer {layer_id}")
                out[received : received + count] = chunk.reshape(count, out.shape[1])  # [count, dim]
                received += count
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        if out is None or received != num_ids or out.shape[0] != num_ids:
            raise DataLossError(f"lookup of {num_ids} rows of layer {layer_id} returned {received}")
        assert dtype is not None
        return dtype, out, version

    def _dedup_pays(self, distinct: int, total: int) -> bool:
        return distinct <= (1.0 - self.config.dedup_min_saving) * total

    @property
    def transport(self) -> str:
        """ "same-host" when lookups read the daemon's files in place, "data-plane" when their rows come over
        the daemon's data plane, else "grpc" (known after the first lookup)."""
        if self._local is not None:
            return "same-host"
        return "data-plane" if self._route.current is not None else "grpc"

    def _same_host_table(self, timeout: float | None) -> SameHostReader | None:
        if self.config.same_host is False:
            return None
        if not self._local_checked:
            served = self._describe(timeout)
            with self._describe_lock:
                if not self._local_checked:
                    self._local = open_if_same_host(
                        served.same_host, served.fingerprint, served.version, served.limits.max_rows_per_request
                    )
                    self._local_checked = True
            if self._local is None and self.config.same_host:
                raise UnavailableError(
                    f"{self.address} offers no same-host access to this process (another host, another mount "
                    "namespace, or --no-same-host); drop ClientConfig(same_host=True) to use gRPC"
                )
        return self._local

    def _forget_same_host(self, local: SameHostReader) -> None:
        """Stop using `local` (a stopped daemon's row cache) and describe the daemon again on the next
        lookup. It is closed with the client: another thread may still be copying from it."""
        with self._describe_lock:
            if self._local is local:
                self._retired.append(local)
                self._local = None
                self._local_checked = False
                self._described = None

    def _manifest(self, timeout: float | None) -> Manifest:
        if self._manifest_parsed is None:
            self._manifest_parsed = Manifest.from_json(self._describe(timeout).manifest_json)
        return self._manifest_parsed

    def _describe(self, timeout: float | None) -> pb.DescribeResponse:
        with self._describe_lock:
            if self._described is None:
                self._described = self._unary(self._stub.Describe, pb.DescribeRequest(), timeout)
            return self._described

    def _unary(self, method: Any, request: Any, timeout: float | None, *, retry: bool = True) -> Any:
        """A unary call within this client's deadline (retried like a lookup unless `retry` is False)."""
        deadline = time.monotonic() + self._timeout(timeout)
        if not retry:
            return self._call(method, request, seconds_left(deadline))
        # A busy daemon's refusal of a cheap call is repeated a few times, not for the whole deadline.
        return self._retrying(lambda seconds: self._call(method, request, seconds), deadline, busy_until_deadline=False)

    @staticmethod
    def _call(method: Any, request: Any, seconds: float) -> Any:
        """One attempt of a unary call, failing with the project's exception."""
        try:
            return method(request, timeout=seconds)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def _retrying(
        self,
        attempt: Callable[[float], _T],
        deadline: float,
        *,
        retry_unavailable: bool = True,
        busy_until_deadline: bool = True,
    ) -> _T:
        """`attempt(seconds left)` until it succeeds, fails for good, or the deadline comes.

        Repeated: UNAVAILABLE (nothing answered, or the connection broke), `max_attempts` attempts in
        all unless `retry_unavailable` is False; RESOURCE_EXHAUSTED with a pushback (a busy daemon)
        until the deadline, or `max_attempts` attempts in all unless `busy_until_deadline`. Every
        attempt gets only what is left of the one deadline and no backoff sleeps past it, so the call
        ends by its deadline whatever happens to the daemon.
        """
        backoff = self.config.initial_backoff_s
        attempts = unavailable = 0
        while True:
            attempts += 1
            try:
                return attempt(seconds_left(deadline))
            except UnavailableError as exc:
                unavailable += 1
                if not retry_unavailable or unavailable >= self.config.max_attempts:
                    raise
                error: Exception = exc
                wait = backoff
            except ResourceExhaustedError as exc:
                if exc.retry_after_s is None:  # the request itself is over a limit: a repeat fails too
                    raise
                if not busy_until_deadline and attempts >= self.config.max_attempts:
                    raise
                error, wait = exc, max(backoff, exc.retry_after_s)
            if time.monotonic() + wait >= deadline:
                raise error
            time.sleep(wait)
            backoff = min(2 * backoff, self.config.max_backoff_s)

    def _timeout(self, timeout: float | None) -> float:
        return self.config.timeout_s if timeout is None else check_timeout(timeout)

    def close(self) -> None:
        """Close the channel (in-flight calls are cancelled) and unmap same-host files."""
        self._channel.close()
        self._route.close()
        if self._local is not None:
            self._local.close()
            self._local = None
        while self._retired:
            self._retired.pop().close()

    def __enter__(self) -> MemstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class WatchedChange:
    """One push's rows as a row watch delivers them: `rows[i]` is row `ids[i]` of `layer_id` after the push."""

    version: int
    layer_id: int
    ids: np.ndarray  # int64 [N]
    rows: np.ndarray  # [N, stored width], the stored dtype's raw values (read-only)


@dataclass(frozen=True)
class WatchedBatch:
    """A row watch message: the changes of the pushes up to `through_version`, and the table's version."""

    changes: list[WatchedChange]
    through_version: int
    table_version: int


class RowWatch:
    """A WatchRows stream in progress: iterate for `WatchedBatch`es; `cancel()` ends it from any thread."""

    def __init__(self, call: Any, dtype: DType, width: int) -> None:
        self._call = call
        self._dtype = dtype
        self._width = width

    def __iter__(self) -> RowWatch:
        return self

    def __next__(self) -> WatchedBatch:
        try:
            message = next(self._call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        changes = []
        for change in message.changes:
            ids = np.frombuffer(change.row_ids, dtype="<i8")
            rows = np.frombuffer(change.rows, dtype=self._dtype.numpy)
            if len(rows) != len(ids) * self._width:
                raise DataLossError(
                    f"a row watch change of layer {change.layer_id} at version {change.version} has {len(rows)} "
                    f"values for {len(ids)} rows of width {self._width}"
                )
            changes.append(WatchedChange(change.version, change.layer_id, ids, rows.reshape(len(ids), self._width)))
        return WatchedBatch(changes, message.through_version, message.table_version)

    def cancel(self) -> None:
        """End the stream (its iteration then raises a CANCELLED MemstoreError)."""
        self._call.cancel()


@dataclass(frozen=True)
class PushAck:
    """An acknowledged push: the table version after it, the layer's optimizer step, rows sent."""

    version: int
    layer_step: int
    rows: int


def sum_duplicate_rows(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct ids ascending [U], the rows of each id summed in float32 [U, dim])."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    if len(ordered) == 0:
        return ordered, rows[:0].astype(np.float32)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # [U]
    return ordered[starts], np.add.reduceat(rows[order].astype(np.float32, copy=False), starts, axis=0)


def out_rows(out: torch.Tensor, shape: tuple[int, ...], manifest: Manifest) -> np.ndarray:
    """`out` as a writable raw [N, dim] array for rows of `shape` ids, or InvalidArgumentError saying
    what it must be."""
    dtype, dim = manifest.dtype, manifest.dtype.stored_width(manifest.layout.dim)
    count = math.prod(shape)  # on every lookup into a buffer: np.prod costs a microsecond more
    wanted = dtype.torch
    if (
        not isinstance(out, torch.Tensor)
        or out.dtype != wanted
        or not out.is_cpu
        or not out.is_contiguous()
        or tuple(out.shape) not in ((*shape, dim), (count, dim))
    ):
        described = type(out).__name__
        if isinstance(out, torch.Tensor):
            layout = "" if out.is_contiguous() else ", not contiguous"
            described = f"{tuple(out.shape)} of {out.dtype} on {out.device}{layout}"
        raise InvalidArgumentError(
            f"out must be a contiguous CPU tensor of {wanted} shaped {(*shape, dim)} or {(count, dim)}; got {described}"
        )
    return dtype.raw_view(out).reshape(count, dim)  # [N, dim], shares memory with out


def grad_rows(grads: Any, num_ids: int) -> np.ndarray:
    """Gradients [*row_ids.shape, dim] (torch or numpy) as float32 rows [num_ids, dim]."""
    values = grads.detach().to("cpu", torch.float32).numpy() if isinstance(grads, torch.Tensor) else grads
    values = np.asarray(values, dtype=np.float32)
    if values.ndim < 1 or values.size != num_ids * (values.shape[-1] if values.ndim else 0):
        raise InvalidArgumentError(
            f"grads must be [*row_ids.shape, dim] float32: {num_ids} rows; got shape {values.shape}"
        )
    return values.reshape(num_ids, values.shape[-1])  # [N, dim]


def check_layer_id(layer_id: int) -> None:
    """InvalidArgumentError unless `layer_id` can be an Engram layer id (the wire's uint32)."""
    if not 0 <= layer_id < 2**32:
        raise InvalidArgumentError(f"layer id {layer_id} is not an Engram layer id (0 <= id < 2**32)")


def _distinct_count(ids: np.ndarray) -> int:
    """Number of distinct ids; a plain sort is 4x cheaper than a unique with inverse."""
    if len(ids) == 0:
        return 0
    # int32 sorts in half the time; ids of a table under 2**31 rows (any real one) fit.
    ordered = np.sort(ids.astype(np.int32) if 0 <= ids.min() and ids.max() < 2**31 else ids)
    return 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))


def as_int64_array(row_ids: Any) -> np.ndarray:
    """Row ids (numpy or torch integers of any shape) as int64, or InvalidArgumentError."""
    if isinstance(row_ids, torch.Tensor):
        if row_ids.dtype == torch.int64 and row_ids.is_cpu:  # already what the lookup needs: shared, not copied
            return row_ids.numpy()
        if row_ids.is_floating_point() or row_ids.is_complex() or row_ids.dtype == torch.bool:
            raise InvalidArgumentError(f"row ids must be integers; got a {row_ids.dtype} tensor")
        return row_ids.detach().to("cpu", torch.int64).numpy()
    ids = np.asarray(row_ids)
    if not isinstance(row_ids, np.ndarray) and ids.size == 0:
        # numpy makes [] float64: an empty list (or tuple) of ids is no ids, not floats.
        return np.zeros(ids.shape, dtype=np.int64)
    if ids.dtype.kind not in "iu":
        given = f"a {type(row_ids).__name__} of " if not isinstance(row_ids, np.ndarray) else ""
        raise InvalidArgumentError(f"row ids must be integers; got {given}{ids.dtype} values")
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError("row ids must fit in int64")
    return ids.astype(np.int64, copy=False)
