"""Prefetch: every Engram layer's rows fetched while earlier work computes.

Engram's row ids depend only on the tokens, so they are known before the first layer runs.
The protocol:

1. `handle = prefetcher.submit(input_ids)` at the start of a step, or one step ahead while
   the current step computes. It runs the model's compress + hash (`row_ids_fn`) for every
   Engram layer and starts one lookup per layer at once on a worker pool (the client
   deduplicates each layer's ids). Rows land in a reusable host buffer set; on CUDA the
   buffers are pinned and each layer's rows are copied to the device on a side stream,
   with one CUDA event per layer. `submit_row_ids(ids)` does the same for ids already hashed
   (decoding fetches only the newest position).
2. The Engram layer calls `handle.rows(layer_id)`: it waits for its own layer only (the
   future, then on CUDA the compute stream waits on that layer's event; the host does not
   block). The wait is the step's exposed stall, recorded per layer in `prefetcher.stats`.
3. `handle.release()` (or leaving `with handle:`) once the step is done, after backward:
   autograd may keep views of the buffers until then. The buffer set returns to the pool.

Bounded memory: `PrefetchConfig.depth` buffer sets exist (2: the step computing and the
one being fetched); `submit` waits for a released set, and a buffer grows only when a step
needs more rows than any before it (`stats.buffer_allocations` counts every allocation).
Without a GPU the same protocol runs on threads with plain host tensors.

Errors: a failed lookup raises in `handle.rows(layer_id)` of the step that needs it, as the
project's exception of the same kind, with the step and layer named. A failed layer never
returns its buffer's contents (stale rows of an earlier step) nor zeros: the paper finds a
model with its Engram zeroed keeps only 29% of its factual recall. The next step's handle is
independent and unaffected.

CUDA: streams, events and buffers
---------------------------------
`PrefetchConfig.device` is resolved once, in the constructor ("cuda" becomes
`cuda:<torch.cuda.current_device()>`); the copy stream, every buffer, every event and every
wait use that device, whatever device is current later (DDP's `set_device`) or on the worker
threads (each thread has its own current device). Per buffer set and layer there is a pinned
host tensor `host`, a device tensor `on_device`, and these orderings:

1. Device memory is allocated under `torch.cuda.stream(copy stream)`, so the caching allocator
   takes it from the copy stream's pool: a block freed by the caller's stream, still read by its
   queued kernels, is never handed to the copy.
2. A worker, before writing a layer's rows into `host`, waits on its own thread
   (`Event.synchronize`) for `copied`, the event of the last copy that read that host tensor:
   a queued non-blocking copy never reads rows of a later step.
3. On the copy stream the worker waits (`wait_event`, no host block) for every `released` event
   of the set's previous step, then copies `host` into `on_device` (non-blocking) and records a
   fresh `copied` event (timing-enabled) on the copy stream.
4. `rows(layer)` runs on the consumer stream: the stream current (for the prefetcher's device)
   when it is called. It records a timing event there, makes that stream wait on `copied`, and
   marks `on_device` as used by it (`record_stream`), so a buffer that grows or is dropped at
   close returns to the allocator only after the consumer's queued work.
5. `release(stream=None)` records one `released` event on each stream that called rows() in
   this step (or on `stream` when given) and returns the set to the pool. The device buffer is
   overwritten (step 3) only after those events, the host buffer (step 2) only after the copy.
   release is idempotent and thread-safe (one set is returned once), and after `close()` it is a
   no-op, so an exception that led to the close is not hidden by another one.

Stall: `stats.stall_s` is the host's wait in rows(); `stats.gpu_stall_s` the time the consumer
stream waited for a copy (the timing event of step 4 to `copied`), collected without a host
sync as the events complete (at submit and release; `close()` collects the rest).

CUDA graphs: submit() and rows() refuse to run while the current stream is capturing (their
waits use events recorded outside the capture, and the buffers alternate between steps). Call
`handle.rows(layer)` before `graph.replay()`, outside capture, and copy the rows into the
graph's static input tensors (`static.copy_(rows)`, on the stream that replays).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client import metrics
from client.cache import CacheConfig, CacheStats, DeviceCache, open_cache
from client.config import check_timeout
from client.protocol import RowReader
from memstore.errors import InternalError, InvalidArgumentError, MemstoreError, ResourceExhaustedError
from memstore.tabledir.manifest import Manifest

if TYPE_CHECKING:
    from memstore.table import Table

RowIds = Mapping[int, "torch.Tensor | np.ndarray"]


class TableFetcher:
    """A table opened in this process behind the `RowReader` interface (the in-process baseline)."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def describe(self, timeout: float | None = None) -> Manifest:
        """The table's manifest."""
        return self.table.manifest

    def lookup(
        self, layer_id: int, row_ids: Any, *, timeout: float | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows [*row_ids.shape, dim] of the stored dtype, written into `out` when given."""
        ids = np.asarray(row_ids, dtype=np.int64)
        dtype = self.table.manifest.dtype
        dim = dtype.stored_width(self.table.manifest.layout.dim)
        target = None if out is None else dtype.raw_view(out).reshape(ids.size, dim)  # [N, dim]
        rows = self.table.gather(layer_id, ids.reshape(-1), target)  # [N, dim]
        return dtype.to_torch(rows.reshape(*ids.shape, dim))  # [*shape, dim]


@dataclass(frozen=True)
class PrefetchConfig:
    """How far ahead and with how much memory; the defaults overlap one step ahead."""

    depth: int = 2  # buffer sets: steps fetched or in use at once
    overlap: bool = True  # False fetches inside submit (the synchronous baseline, same code path)
    device: str = "cpu"  # where the model wants its rows; "cuda" pins host buffers and copies on a side stream
    timeout_s: float | None = None  # deadline per lookup; None: the fetcher's own
    acquire_timeout_s: float = 300.0  # how long submit waits for a released buffer set
    # A row cache per layer on `device`: only its misses are fetched. Over a trainable table (a MemstoreClient)
    # it follows the pushes within CacheConfig.cache_max_lag versions (client.coherence).
    cache: CacheConfig | None = None

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise InvalidArgumentError(f"PrefetchConfig.depth must be at least 1; got {self.depth}")
        check_timeout(self.acquire_timeout_s, "PrefetchConfig.acquire_timeout_s")
        if self.timeout_s is not None:
            check_timeout(self.timeout_s, "PrefetchConfig.timeout_s")


@dataclass
class PrefetchStats:
    """What prefetching cost the model: exposed stall per layer, and fetch work done behind it."""

    steps: int = 0
    stall_s: dict[int, float] = field(default_factory=dict)  # time rows() waited on the host, per layer
    gpu_stall_s: dict[int, float] = field(default_factory=dict)  # time the consumer stream waited for copies (CUDA)
    fetch_s: dict[int, float] = field(default_factory=dict)  # time the lookups took, per layer
    ready_on_request: int = 0  # rows() calls that found their rows already there
    requests: int = 0
    rows: int = 0
    buffer_allocations: int = 0
    cache: CacheStats | None = None  # the device cache's hits and savings, when PrefetchConfig.cache is set

    @property
    def total_stall_s(self) -> float:
        """Exposed host stall over all layers and steps."""
        return sum(self.stall_s.values())

    @property
    def total_gpu_stall_s(self) -> float:
        """Time consumer streams waited for copies, over all layers and steps (0 without CUDA)."""
        return sum(self.gpu_stall_s.values())

    def summary(self) -> str:
        """One line for logs: steps, rows, exposed stall (total and per layer, host and GPU)."""
        per_layer = ", ".join(f"layer {layer} {s:.3f} s" for layer, s in sorted(self.stall_s.items()))
        gpu = ""
        if self.gpu_stall_s:
            gpu_layers = ", ".join(f"layer {layer} {s:.3f} s" for layer, s in sorted(self.gpu_stall_s.items()))
            gpu = f"; GPU stall {self.total_gpu_stall_s:.3f} s ({gpu_layers})"
        cache = "" if self.cache is None else f"; {self.cache.summary()}"
        return (
            f"{self.steps} prefetches, {self.rows:,} rows; "
            f"exposed stall {self.total_stall_s:.3f} s ({per_layer}){gpu}; "
            f"{self.ready_on_request}/{self.requests} layers' rows were ready when asked for{cache}"
        )


class _BufferSet:
    """One step's landing buffers: a host tensor per layer (pinned on CUDA), a device copy and events.

    The orderings between them are the module docstring's "CUDA: streams, events and buffers".
    """

    def __init__(
        self,
        layer_ids: tuple[int, ...],
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        copy_stream: torch.cuda.Stream | None,
    ) -> None:
        self.dim = dim
        self.dtype = dtype
        self.device = device
        self.copy_stream = copy_stream
        cuda = device.type == "cuda"
        self.host = {layer: torch.empty(0, dim, dtype=dtype, pin_memory=cuda) for layer in layer_ids}
        self.on_device = {layer: self._device_empty(0) for layer in layer_ids}
        self.copied: dict[int, torch.cuda.Event] = {}  # layer -> event of the last copy out of host[layer]
        self.released: list[torch.cuda.Event] = []  # consumer streams done with on_device (previous step)

    def _device_empty(self, count: int) -> torch.Tensor:
        if self.copy_stream is None:
            return torch.empty(count, self.dim, dtype=self.dtype, device=self.device)
        with torch.cuda.stream(self.copy_stream):  # the copy stream's pool: no block a queued kernel still reads
            return torch.empty(count, self.dim, dtype=self.dtype, device=self.device)

    def host_view(self, layer: int, shape: tuple[int, ...], stats: PrefetchStats) -> torch.Tensor:
        """A [*shape, dim] view of the layer's host buffer, grown (and counted) only if too small."""
        count = int(np.prod(shape))
        if count > len(self.host[layer]):
            # The old pinned tensor may still be read by a queued copy: torch's pinned-memory cache
            # keeps its block until that copy completes. The old device tensor was marked with each
            # consumer stream (record_stream in rows()), so it is reused only after their work.
            self.host[layer] = torch.empty(count, self.dim, dtype=self.dtype, pin_memory=self.device.type == "cuda")
            stats.buffer_allocations += 1
            if self.device.type != "cpu":
                self.on_device[layer] = self._device_empty(count)
                stats.buffer_allocations += 1
        return self.host[layer][:count].view(*shape, self.dim)  # [*shape, dim]

    def device_view(self, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.on_device[layer][: int(np.prod(shape))].view(*shape, self.dim)  # [*shape, dim]


class PrefetchHandle:
    """One submitted step: its row ids, one future per layer, and the buffer set they land in."""

    def __init__(
        self,
        prefetcher: Prefetcher,
        step: int,
        row_ids: dict[int, np.ndarray],
        futures: dict[int, Future],
        buffers: _BufferSet,
        fetched_in_submit_s: dict[int, float] | None = None,
    ) -> None:
        self.step = step
        self.row_ids = row_ids
        self._prefetcher = prefetcher
        self._futures = futures
        # Without overlap the model already waited in submit(): part of each layer's stall.
        self._fetched_in_submit_s = fetched_in_submit_s or {}
        self._buffers: _BufferSet | None = buffers
        self._waited: set[int] = set()
        self._consumers: list[torch.cuda.Stream] = []  # CUDA: the streams rows() was called on
        self._lock = threading.Lock()

    def rows(self, layer_id: int) -> torch.Tensor:
        """This step's rows [*ids.shape, dim] of one layer, in the stored dtype on the configured device
        (quantized rows: decoded to float32 there).

        Waits for this layer's lookup only; a failed lookup raises here, naming step and layer.
        The tensor is a view of a reused buffer: valid until `release()`. On CUDA the stream current
        now is the consumer: it waits for the copy, and release() records on it.
        """
        _refuse_capture("handle.rows()")
        buffers = self._buffers
        if buffers is None:
            raise InvalidArgumentError(f"the handle of step {self.step} was released; its rows are gone")
        future = self._futures.get(layer_id)
        if future is None:
            raise InvalidArgumentError(f"step {self.step} fetched layers {sorted(self._futures)}, not {layer_id}")
        stats = self._prefetcher.stats
        first_request = layer_id not in self._waited
        ready = future.done()
        start = time.perf_counter()
        try:
            rows = future.result()
        except CancelledError:
            raise InvalidArgumentError(
                f"the prefetcher was closed before step {self.step}, layer {layer_id} was fetched"
            ) from None
        except MemstoreError as exc:
            named = type(exc)(f"prefetch of step {self.step}, layer {layer_id}: {exc}")
            named.code = exc.code
            raise named from exc
        except Exception as exc:
            raise InternalError(f"prefetch of step {self.step}, layer {layer_id} failed: {exc!r}") from exc
        finally:
            if first_request:
                self._waited.add(layer_id)
                stall = time.perf_counter() - start
                metrics.observe_prefetch_stall(layer_id, stall + self._fetched_in_submit_s.get(layer_id, 0.0))
                with self._prefetcher._stats_lock:
                    stats.stall_s[layer_id] = stats.stall_s.get(layer_id, 0.0) + stall
                    stats.requests += 1
                    stats.ready_on_request += ready
        if buffers.copy_stream is not None:
            self._consume_on_device(layer_id, buffers)
        if self._prefetcher.storage.quantized:  # decoded on the model's device, on its stream
            return self._prefetcher.storage.dequantize(rows)  # [*ids.shape, dim] float32
        return rows

    def _consume_on_device(self, layer_id: int, buffers: _BufferSet) -> None:
        """The consumer stream waits for the copy (the host does not) and marks the buffer as its own."""
        consumer = torch.cuda.current_stream(buffers.device)
        with self._lock:
            if consumer not in self._consumers:
                self._consumers.append(consumer)
        arrived = torch.cuda.Event(enable_timing=True)
        arrived.record(consumer)
        copied = buffers.copied[layer_id]
        consumer.wait_event(copied)
        buffers.on_device[layer_id].record_stream(consumer)
        self._prefetcher._gpu_waits.append((layer_id, arrived, copied))

    def release(self, stream: torch.cuda.Stream | None = None) -> None:
        """Return the buffer set to the pool (after the step's backward). Idempotent and thread-safe;
        a no-op once the prefetcher is closed.

        On CUDA the next copy into these device buffers waits for the work queued so far on every
        stream that called rows() in this step, or on `stream` alone when given.
        """
        with self._lock:
            buffers, self._buffers = self._buffers, None
            consumers = [stream] if stream is not None else list(self._consumers)
        if buffers is None or self._prefetcher.closed:
            return
        wait_futures(self._futures.values())  # a worker may still write into the buffers; never raises
        if buffers.copy_stream is not None:
            buffers.released = []
            for consumer in consumers:
                event = torch.cuda.Event()
                event.record(consumer)
                buffers.released.append(event)
            self._prefetcher._collect_gpu_stalls(block=False)
        self._prefetcher._free.put(buffers)

    def __enter__(self) -> PrefetchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Prefetcher:
    """Fetches all Engram layers' rows of a step ahead of the layers that need them.

    `row_ids_fn` maps input ids [B, T] to {layer id: row ids [B, T, heads]}
    (`EngramLM.row_ids`). Use as a context manager, or call close().
    """

    def __init__(
        self,
        fetcher: RowReader,
        row_ids_fn: Callable[[Any], RowIds],
        layer_ids: tuple[int, ...] | list[int],
        config: PrefetchConfig | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.row_ids_fn = row_ids_fn
        self.layer_ids = tuple(layer_ids)
        self.config = config or PrefetchConfig()
        self.stats = PrefetchStats()
        self.closed = False
        self._stats_lock = threading.Lock()
        manifest = fetcher.describe(self.config.timeout_s)
        missing = set(self.layer_ids) - set(manifest.layout.layer_ids)
        if missing:
            raise InvalidArgumentError(
                f"the table has layers {list(manifest.layout.layer_ids)}; it cannot serve layers {sorted(missing)}"
            )
        self.storage = manifest.dtype
        self.device = _resolve_device(self.config.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.cache: DeviceCache | None = None
        if self.config.cache is not None:
            self.cache = open_cache(fetcher, manifest, self.config.cache, self.device, self.config.timeout_s)
            self.cache.stream = self._copy_stream  # its lookups run there: changes are written there too
            self.stats.cache = self.cache.stats
        self._gpu_waits: deque[tuple[int, torch.cuda.Event, torch.cuda.Event]] = deque()  # (layer, arrived, copied)
        self._gpu_waits_lock = threading.Lock()  # release() and submit() may collect from different threads
        self._free: queue.Queue[_BufferSet] = queue.Queue()
        width = manifest.dtype.stored_width(manifest.layout.dim)  # stored units per row
        for _ in range(self.config.depth):
            self._free.put(_BufferSet(self.layer_ids, width, self.storage.torch, self.device, self._copy_stream))
        self._pool = ThreadPoolExecutor(max_workers=len(self.layer_ids), thread_name_prefix="engram-prefetch")
        self._steps = 0

    def submit(self, input_ids: Any) -> PrefetchHandle:
        """Hash `input_ids` [B, T] for every layer and start fetching their rows."""
        _refuse_capture("prefetcher.submit()")
        return self.submit_row_ids(self.row_ids_fn(input_ids))

    def submit_row_ids(self, row_ids: RowIds) -> PrefetchHandle:
        """Start fetching rows for ids already hashed: {layer id: row ids [...]} for every layer."""
        _refuse_capture("prefetcher.submit_row_ids()")
        if self.closed:
            raise InvalidArgumentError("the prefetcher is closed; open a new one to fetch more steps")
        if set(row_ids) != set(self.layer_ids):
            raise InvalidArgumentError(f"row ids are for layers {sorted(row_ids)}; expected {list(self.layer_ids)}")
        ids = {layer: _as_numpy(row_ids[layer]) for layer in self.layer_ids}
        try:
            buffers = self._free.get(timeout=self.config.acquire_timeout_s)
        except queue.Empty:
            raise ResourceExhaustedError(
                f"all {self.config.depth} prefetch buffer sets are held by unreleased steps; call "
                "handle.release() when a step is done, or raise PrefetchConfig.depth"
            ) from None
        try:
            with self._stats_lock:
                views = {layer: buffers.host_view(layer, ids[layer].shape, self.stats) for layer in self.layer_ids}
        except BaseException:
            self._free.put(buffers)  # a failed allocation must not cost the pool its set
            raise
        if self._copy_stream is not None:
            self._collect_gpu_stalls(block=False)
        step = self._steps
        self._steps += 1
        with self._stats_lock:
            self.stats.steps += 1
            self.stats.rows += sum(i.size for i in ids.values())
        futures: dict[int, Future] = {}
        fetched_in_submit_s: dict[int, float] = {}
        for layer in self.layer_ids:
            if self.config.overlap:
                futures[layer] = self._pool.submit(self._fetch, layer, ids[layer], views[layer], buffers)
            else:
                futures[layer], fetched_in_submit_s[layer] = self._fetch_now(layer, ids[layer], views[layer], buffers)
        return PrefetchHandle(self, step, ids, futures, buffers, fetched_in_submit_s)

    def _fetch_now(self, layer: int, ids: np.ndarray, host: torch.Tensor, buffers: _BufferSet) -> tuple[Future, float]:
        """The synchronous baseline: fetch in the caller, and count the whole fetch as stall (returned)."""
        future: Future = Future()
        start = time.perf_counter()
        try:
            future.set_result(self._fetch(layer, ids, host, buffers))
        except BaseException as exc:  # surfaces in rows(), exactly as with overlap
            future.set_exception(exc)
        stall = time.perf_counter() - start
        with self._stats_lock:
            self.stats.stall_s[layer] = self.stats.stall_s.get(layer, 0.0) + stall
        return future, stall

    def _fetch(self, layer: int, ids: np.ndarray, host: torch.Tensor, buffers: _BufferSet) -> torch.Tensor:
        if self.cache is not None:
            return self._fetch_cached(layer, ids, host, buffers)
        start = time.perf_counter()
        previous_copy = buffers.copied.get(layer)
        if previous_copy is not None:  # a queued copy may still read the host buffer: wait here, not in the caller
            previous_copy.synchronize()
        self.fetcher.lookup(layer, ids, timeout=self.config.timeout_s, out=host)
        metrics.count_prefetch_rows(layer, ids.size)
        rows = host
        if self._copy_stream is not None:
            with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
                for released in buffers.released:  # the previous step's consumers still read the device buffer
                    self._copy_stream.wait_event(released)
                rows = buffers.device_view(layer, ids.shape)
                rows.copy_(host, non_blocking=True)
                copied = torch.cuda.Event(enable_timing=True)
                copied.record(self._copy_stream)
                buffers.copied[layer] = copied
        elif self.device.type != "cpu":
            rows = buffers.device_view(layer, ids.shape).copy_(host)
        with self._stats_lock:
            self.stats.fetch_s[layer] = self.stats.fetch_s.get(layer, 0.0) + time.perf_counter() - start
        return rows

    def _fetch_cached(self, layer: int, ids: np.ndarray, host: torch.Tensor, buffers: _BufferSet) -> torch.Tensor:
        """Rows through the device cache: only its misses are fetched, the step's rows assembled on the device."""
        start = time.perf_counter()
        cache = self.cache
        assert cache is not None

        versioned = cache.coherence is not None

        def fetch(miss: np.ndarray) -> Any:
            if versioned:  # the cache tags each admitted row with the version it shows
                return self.fetcher.lookup(layer, miss, timeout=self.config.timeout_s, return_version=True)  # type: ignore[call-arg]
            return self.fetcher.lookup(layer, miss, timeout=self.config.timeout_s)

        if self._copy_stream is not None:
            # The cache's tensors are used on the copy stream only; the consumer waits on `copied` as before.
            with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
                for released in buffers.released:  # the previous step's consumers still read the device buffer
                    self._copy_stream.wait_event(released)
                rows = buffers.device_view(layer, ids.shape)
                rows.copy_(cache.lookup(layer, ids, fetch))
                copied = torch.cuda.Event(enable_timing=True)
                copied.record(self._copy_stream)
                buffers.copied[layer] = copied
        else:
            rows = host if self.device.type == "cpu" else buffers.device_view(layer, ids.shape)
            rows.copy_(cache.lookup(layer, ids, fetch))
        metrics.count_prefetch_rows(layer, ids.size)
        with self._stats_lock:
            self.stats.fetch_s[layer] = self.stats.fetch_s.get(layer, 0.0) + time.perf_counter() - start
        return rows

    def _collect_gpu_stalls(self, block: bool) -> None:
        """Add the consumer streams' waits for copies to stats.gpu_stall_s, oldest first, for the events
        that completed (all of them when `block`: only close() blocks)."""
        with self._gpu_waits_lock:
            self._collect_gpu_stalls_locked(block)

    def _collect_gpu_stalls_locked(self, block: bool) -> None:
        while self._gpu_waits:
            layer, arrived, copied = self._gpu_waits[0]
            if block:
                arrived.synchronize()
                copied.synchronize()
            elif not (arrived.query() and copied.query()):
                return
            self._gpu_waits.popleft()
            waited_s = max(0.0, arrived.elapsed_time(copied) / 1000.0)  # the copy ended after the consumer arrived
            metrics.observe_prefetch_gpu_stall(layer, waited_s)
            with self._stats_lock:
                self.stats.gpu_stall_s[layer] = self.stats.gpu_stall_s.get(layer, 0.0) + waited_s

    def close(self) -> None:
        """Stop the workers (in-flight lookups finish first), and collect the GPU stall still in flight.
        Idempotent; handles released afterwards return nothing."""
        self.closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.cache is not None:
            self.cache.close()  # stop following the table's pushes
        if self._copy_stream is not None:
            self._collect_gpu_stalls(block=True)
            self._copy_stream.synchronize()  # no copy outlives the prefetcher's buffers

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_device(name: str) -> torch.device:
    """The device, with CUDA's index fixed now: the device current at construction."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _refuse_capture(what: str) -> None:
    """CUDA graphs: the prefetcher's waits and alternating buffers cannot be captured."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise InvalidArgumentError(
            f"{what} cannot run inside CUDA graph capture (its events are recorded outside it and its buffers "
            "alternate between steps): call handle.rows(layer) before replay, outside capture, and copy the rows "
            "into the graph's static input tensors"
        )


def _as_numpy(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        return ids.detach().to("cpu", torch.int64).numpy()
    return np.asarray(ids, dtype=np.int64)
