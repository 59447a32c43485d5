"""What a call may hold before and around the servicer: threads, time, and its peer's share.

gRPC Python reads a unary request on a worker thread and waits for it without a limit, and it
waits without a limit for each streamed message to be sent. A peer that sends headers and no
message, or never reads what it asked for, held a thread forever, and the pool has only a few.
`CallGuard` (the daemon's only interceptor) turns every handler into a request-streaming one,
so that it runs before any message is read:

- a call the token check refuses is aborted at once, nothing read;
- the request must arrive within `request_timeout_s`, and each response message must be taken by
  the client within `send_timeout_s`, or the call is cancelled (`Watchdog`) and what it held
  returned;
- calls of one peer host are counted (`PeerCalls`): past `max_calls_per_peer`, RESOURCE_EXHAUSTED;
- health Watch streams stay non-blocking (no thread once the request is read) and at most
  `max_watch_streams` are open at once;
- the servicer's work (gathering, optimizer) runs under `max_workers` slots, taken only once the
  request is read and given back while a message waits for the client (and while a push waits for
  its replicas, `idle_work_slot`): waiting costs a thread from a pool sized for every admitted
  call, never a slot of the work.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from memstore.errors import RETRY_PUSHBACK_KEY, InvalidArgumentError, MemstoreError, ResourceExhaustedError
from memstore.limits import BUSY_RETRY_MS

_HEALTH_WATCH = "/grpc.health.v1.Health/Watch"

# Threads for health checks and reflection (each brief, or cut at the read deadline).
_SIDE_THREADS = 8

# Bytes of the request message being served (as received), for the servicer's in-flight budget.
REQUEST_BYTES: contextvars.ContextVar[int] = contextvars.ContextVar("memstore_request_bytes", default=0)


class _WorkSlot:
    """The work slot a unary call holds, which `idle_work_slot` may give back for a while."""

    def __init__(self, work: threading.BoundedSemaphore) -> None:
        self.work = work
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.work.release()


_WORK_SLOT: contextvars.ContextVar[_WorkSlot | None] = contextvars.ContextVar("memstore_work_slot", default=None)


@contextlib.contextmanager
def idle_work_slot() -> Iterator[None]:
    """Give the calling unary call's work slot back for the block, for a wait that needs no CPU (a push
    waiting for its replicas' confirmations would otherwise keep lookups from every slot); the call
    finishes without one. A no-op outside a call that holds a slot."""
    slot = _WORK_SLOT.get()
    if slot is not None:
        slot.release()
    yield


@dataclass(frozen=True)
class GuardConfig:
    """Limits `CallGuard` applies to every call (ServerConfig carries them)."""

    service: str  # full name of the service whose calls are parsed, counted per peer and take work slots
    max_workers: int
    max_calls: int  # calls of `service` at once, untimed methods not counted
    max_untimed: int  # untimed calls (Follow streams) at once, waiting for their request included
    request_timeout_s: float
    send_timeout_s: float
    max_calls_per_peer: int
    max_watch_streams: int
    untimed_methods: frozenset[str] = frozenset({"Follow"})  # methods with slots of their own, no work slot


class Watchdog:
    """Runs an action (cancel a call) for each armed key whose deadline passes. Its one thread runs
    only while something is armed: a stopped server leaves no thread behind."""

    def __init__(self, poll_s: float = 0.05) -> None:
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._due: dict[object, tuple[float, Callable[[], None]]] = {}
        self._running = False
        self.fired = 0  # actions run so far

    def arm(self, key: object, seconds: float, action: Callable[[], None]) -> None:
        """Run `action` in `seconds` unless `disarm(key)` comes first (re-arming replaces)."""
        with self._lock:
            self._due[key] = (time.monotonic() + seconds, action)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="memstore-watchdog", daemon=True).start()

    @property
    def running(self) -> bool:
        """Whether its thread runs now (only while something is armed, or just was)."""
        return self._running

    def disarm(self, key: object) -> None:
        with self._lock:
            self._due.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(self._poll_s)
            now = time.monotonic()
            with self._lock:
                expired = [key for key, (due, _) in self._due.items() if due <= now]
                actions = [self._due.pop(key)[1] for key in expired]
                if not self._due and not actions:
                    self._running = False
                    return
            for action in actions:
                self.fired += 1
                action()


class PeerCalls:
    """Calls in progress per peer host, at most `limit` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    def acquire(self, peer: str) -> None:
        """Count a call of `peer`, or raise ResourceExhaustedError when it has `limit` already."""
        with self._lock:
            held = self._calls.get(peer, 0)
            if self.limit and held >= self.limit:
                raise ResourceExhaustedError(
                    f"{peer} already has {held} calls in progress, this daemon's limit per peer host "
                    "(--max-calls-per-peer): wait for them to finish, or raise the limit",
                    retry_after_s=BUSY_RETRY_MS / 1000,
                )
            self._calls[peer] = held + 1

    def release(self, peer: str) -> None:
        with self._lock:
            left = self._calls[peer] - 1
            if left:
                self._calls[peer] = left
            else:
                del self._calls[peer]

    def held(self, peer: str) -> int:
        """Calls of `peer` in progress now."""
        return self._calls.get(peer, 0)


def peer_host(peer: str) -> str:
    """`ipv4:10.0.0.1:5555` -> `ipv4:10.0.0.1`; `ipv6:[::1]:5555` -> `ipv6:[::1]`; others as they are."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class CallGuard(grpc.ServerInterceptor):
    """The daemon's interceptor: token check without reading, read and send deadlines, per-peer
    and Watch limits, work slots (see the module's docstring). `check` is the token check (an
    interceptor whose answer for a refused call is a handler that aborts), or None."""

    def __init__(
        self,
        config: GuardConfig,
        check: grpc.ServerInterceptor | None,
        on_refused: Callable[[str, MemstoreError], None],
    ) -> None:
        self._config = config
        self._check = check
        self._on_refused = on_refused
        self._prefix = f"/{config.service}/"
        self.watchdog = Watchdog()
        self.peers = PeerCalls(config.max_calls_per_peer)
        self._work = threading.BoundedSemaphore(config.max_workers)
        self._watch_lock = threading.Lock()
        self.watch_streams = 0
        self.calls = 0  # calls of the service in progress (untimed ones not counted)
        self.untimed = 0  # untimed calls in progress
        # Health and reflection run on threads of their own: however many wait for their request,
        # the service's calls never wait for a thread behind them.
        self._side_pool = futures.ThreadPoolExecutor(max_workers=_SIDE_THREADS, thread_name_prefix="memstore-side")

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED (the check counts a refusal)
            return None if self._check is None else self._check.intercept_service(lambda _d: None, details)
        checked = handler if self._check is None else self._check.intercept_service(lambda _d: handler, details)
        if checked is not handler:  # refused: abort before a byte of the request is read
            refusal = _behavior(checked)
            return _make(handler, lambda _requests, context: refusal(None, context))
        if handler.request_streaming:  # reflection: each message within the read deadline
            return self._streaming_requests(handler)
        return self._unary_request(handler, details.method)

    # A unary request, read by us with a deadline, then parsed and served.
    def _unary_request(self, handler: Any, method: str) -> Any:
        behavior, parse = _behavior(handler), handler.request_deserializer
        ours = method.startswith(self._prefix)
        name = method.rsplit("/", 1)[-1]
        slot = ours and name not in self._config.untimed_methods

        def serve(requests: Iterator[Any], context: grpc.ServicerContext, send_response_callback: Any = None) -> Any:
            if ours and not self._admit(context, name, not slot):
                return None
            if method == _HEALTH_WATCH and not self._admit_watch(context):
                return None
            data = self._read(requests, context)
            if data is None:
                return None  # cancelled (the client left, or the read deadline passed)
            try:
                request = parse(data) if parse is not None else data
            except Exception as exc:  # DecodeError, or worse from a hostile message
                self._refuse(
                    context, name, InvalidArgumentError(f"the request is not a valid {name} message: {str(exc)[:200]}")
                )
            if send_response_callback is not None:  # health Watch: answers later without a thread
                return behavior(request, context, send_response_callback=send_response_callback)
            REQUEST_BYTES.set(len(data))  # what the servicer counts in its budget
            if not handler.response_streaming:
                if not slot:
                    return behavior(request, context)
                if not self._take_work(context):
                    return None
                held = _WorkSlot(self._work)
                token = _WORK_SLOT.set(held)
                try:
                    return behavior(request, context)
                finally:
                    _WORK_SLOT.reset(token)
                    held.release()
            return self._send(behavior(request, context), context, slot)

        if method == _HEALTH_WATCH and getattr(behavior, "experimental_non_blocking", False):
            serve.experimental_non_blocking = True  # type: ignore[attr-defined]
        if not ours:
            serve.experimental_thread_pool = self._side_pool  # type: ignore[attr-defined]
        return _make(handler, serve)

    def _streaming_requests(self, handler: Any) -> Any:
        behavior = _behavior(handler)

        def serve(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            result = behavior(self._timed_requests(requests, context), context)
            return self._send(result, context, False) if handler.response_streaming else result

        serve.experimental_thread_pool = self._side_pool  # type: ignore[attr-defined]
        return _make(handler, serve)

    def _timed_requests(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        while True:
            self.watchdog.arm(context, self._config.request_timeout_s, context.cancel)
            try:
                request = next(requests)
            except StopIteration:
                return
            finally:
                self.watchdog.disarm(context)
            yield request

    def _read(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The one request message, or None when the call ends first (cancelled at the read deadline)."""
        self.watchdog.arm(context, self._config.request_timeout_s, context.cancel)
        try:
            return next(requests, None)
        finally:
            self.watchdog.disarm(context)

    def _send(self, responses: Iterator[Any], context: grpc.ServicerContext, slot: bool) -> Iterator[Any]:
        """`responses`, each taken by the client within the send deadline; the work slot is held only
        while the next message is made."""
        try:
            while True:
                if slot and not self._take_work(context):
                    return
                try:
                    response = next(responses)
                except StopIteration:
                    return
                finally:
                    if slot:
                        self._work.release()
                # gRPC asks for the next message once this one is sent: until then, the watchdog waits.
                self.watchdog.arm(context, self._config.send_timeout_s, context.cancel)
                yield response
                self.watchdog.disarm(context)
        finally:
            self.watchdog.disarm(context)
            close = getattr(responses, "close", None)
            if close is not None:
                close()  # the servicer's stream gives back what it reserved now, not when collected

    @contextlib.contextmanager
    def work_slot(self, seconds: float) -> Iterator[None]:
        """One of the `max_workers` work slots for work outside gRPC (the data plane), waited for at most
        `seconds`; ResourceExhaustedError (with a retry hint) when none came free in time."""
        if not self._work.acquire(timeout=max(0.0, seconds)):
            raise ResourceExhaustedError(
                f"every one of this daemon's {self._config.max_workers} work slots stayed busy (--max-workers): "
                "retry shortly",
                retry_after_s=BUSY_RETRY_MS / 1000,
            )
        try:
            yield
        finally:
            self._work.release()

    def _take_work(self, context: grpc.ServicerContext) -> bool:
        while not self._work.acquire(timeout=0.2):
            if not context.is_active():
                return False
        return True

    def _admit(self, context: grpc.ServicerContext, name: str, untimed: bool) -> bool:
        """Count the call against its peer's share and the daemon's; False if it already ended."""
        peer = peer_host(context.peer())
        with self._watch_lock:
            held, limit = (self.untimed, self._config.max_untimed) if untimed else (self.calls, self._config.max_calls)
            if held < limit:
                self._count(untimed, 1)
        if held >= limit:
            flag = "--max-followers" if untimed else "--max-concurrent-calls"
            what = f"{name} calls" if untimed else "calls"
            busy = f"this daemon already serves {held} {what}, its limit ({flag}): retry shortly"
            self._refuse(context, name, ResourceExhaustedError(busy, retry_after_s=BUSY_RETRY_MS / 1000))
        try:
            self.peers.acquire(peer)
        except ResourceExhaustedError as exc:
            self._count(untimed, -1)
            self._refuse(context, name, exc)

        def ended() -> None:
            self.peers.release(peer)
            self._count(untimed, -1)

        if not context.add_callback(ended):
            ended()
            return False
        return True

    def _count(self, untimed: bool, step: int) -> None:
        with self._watch_lock if step < 0 else contextlib.nullcontext():
            if untimed:
                self.untimed += step
            else:
                self.calls += step

    def _refuse(self, context: grpc.ServicerContext, name: str, exc: MemstoreError) -> None:
        """Count the refusal, tell gRPC's retry policy when to repeat it (-1: never), abort the call."""
        self._on_refused(name, exc)
        if isinstance(exc, ResourceExhaustedError):
            pushback = -1 if exc.retry_after_s is None else round(exc.retry_after_s * 1000)
            context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(pushback)),))
        context.abort(exc.code, str(exc))

    def _admit_watch(self, context: grpc.ServicerContext) -> bool:
        with self._watch_lock:
            full = self.watch_streams >= self._config.max_watch_streams
            if not full:
                self.watch_streams += 1
        if full:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this daemon already serves {self._config.max_watch_streams} health Watch streams; "
                "use health Check, or share one channel's Watch",
            )
        if not context.add_callback(self._watch_ended):
            self._watch_ended()
            return False
        return True

    def _watch_ended(self) -> None:
        with self._watch_lock:
            self.watch_streams -= 1


def _behavior(handler: Any) -> Callable:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _make(handler: Any, serve: Callable) -> Any:
    """A request-streaming handler of `handler`'s response kind running `serve` (requests unparsed
    for unary methods: `serve` parses them; as they were for streaming ones)."""
    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    parse = handler.request_deserializer if handler.request_streaming else None
    return make(serve, request_deserializer=parse, response_serializer=handler.response_serializer)


class StreamSlots:
    """Streams that never end on their own (each holds a worker thread), at most `limit` at once."""

    def __init__(self, limit: int, refusal: Callable[[str, int], str], retry_after_s: float | None = None) -> None:
        """`refusal(who, limit)` is the message of the ResourceExhaustedError past the limit."""
        self.limit = limit
        self._refusal = refusal
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._active = 0

    def acquire(self, who: str) -> None:
        """Take a slot, or raise ResourceExhaustedError when all are taken."""
        with self._lock:
            if self._active >= self.limit:
                raise ResourceExhaustedError(self._refusal(who, self.limit), retry_after_s=self._retry_after_s)
            self._active += 1

    def release(self) -> None:
        """Give back a slot taken by `acquire` (when its stream ends)."""
        with self._lock:
            self._active -= 1

    @property
    def active(self) -> int:
        """Streams in progress now."""
        return self._active
