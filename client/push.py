"""Pushing a training step's row gradients: synchronously, or asynchronously with bounded staleness.

Synchronous (`PushConfig(max_in_flight_steps=0)`): `push_step` returns once every layer's push
is acknowledged, so the next step's lookups see this step's updates: training through the
memstore then matches training the table in process.

Asynchronous (`max_in_flight_steps=k >= 1`): `push_step` returns at once while at most k steps
of pushes are unacknowledged; the (k+1)-th waits for the oldest. Lookups of the next step may
then miss the updates of up to k steps (and, with prefetch one step ahead, one more), the usual
trade of asynchronous embedding training. Pushes of one layer go out in step order (one worker
per layer), so the daemon can recognise a retried step by its id.

An error of a push surfaces in the next `push_step` or in `flush`, as the project's exception
naming the step and layer; the steps after it are not pushed on top of a failure silently.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from client import metrics
from client.client import PushAck
from client.protocol import RowWriter
from memstore.errors import InternalError, InvalidArgumentError, MemstoreError


@dataclass(frozen=True)
class PushConfig:
    """How many steps of pushes may be unacknowledged while training goes on (0: synchronous)."""

    max_in_flight_steps: int = 0

    def __post_init__(self) -> None:
        if self.max_in_flight_steps < 0:
            raise InvalidArgumentError(f"max_in_flight_steps must be >= 0; got {self.max_in_flight_steps}")

    @property
    def synchronous(self) -> bool:
        return self.max_in_flight_steps == 0


@dataclass
class PushStats:
    """Pushes sent and what they cost the training loop."""

    steps: int = 0
    rows: int = 0
    wait_s: float = 0.0  # time push_step/flush blocked the caller
    max_in_flight_seen: int = 0
    last_version: int = 0


class Pusher:
    """Sends each step's gradients for every Engram layer; use as a context manager (flushes on exit)."""

    def __init__(self, target: RowWriter, layer_ids: tuple[int, ...] | list[int], config: PushConfig | None = None):
        self.target = target
        self.layer_ids = tuple(layer_ids)
        self.config = config or PushConfig()
        self.stats = PushStats()
        self._lock = threading.Lock()
        # One worker per layer keeps each layer's pushes in step order.
        self._workers = {
            layer: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engram-push-{layer}")
            for layer in self.layer_ids
        }
        self._in_flight: deque[tuple[int, dict[int, Future]]] = deque()
        self._last_step = 0

    def push_step(
        self, step: int, grads: dict[int, tuple[np.ndarray, np.ndarray]], lr_scale: float | None = None
    ) -> None:
        """Push {layer: (row ids [N], gradients [N, dim])} of training step `step` (>= 1, increasing).

        Synchronous: returns when all are acknowledged. Asynchronous: returns once at most
        `max_in_flight_steps` steps are unacknowledged. Raises the first failed push's error.
        """
        if step < 1:
            raise InvalidArgumentError(f"step ids start at 1 (the daemon recognises retries by them); got {step}")
        if step <= self._last_step:
            # The daemon would answer it as a retry of the step it last applied and drop these gradients.
            raise InvalidArgumentError(
                f"step ids must increase: step {step} after step {self._last_step} would be taken for a retry "
                "of an applied step and not applied"
            )
        unknown = sorted(set(grads) - set(self.layer_ids))
        if unknown:  # checked before any layer is sent: a step is pushed whole or not at all
            raise InvalidArgumentError(
                f"step {step} has gradients for layers {unknown}; this pusher pushes layers {list(self.layer_ids)}"
            )
        self._last_step = step
        futures = {
            layer: self._workers[layer].submit(self._push_layer, step, layer, ids, values, lr_scale)
            for layer, (ids, values) in grads.items()
        }
        with self._lock:
            self._in_flight.append((step, futures))
            self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, len(self._in_flight))
            self.stats.steps += 1
        self._wait_until(self.config.max_in_flight_steps)

    def flush(self) -> None:
        """Wait for every push sent so far; raises the first failure."""
        self._wait_until(0)

    def _wait_until(self, in_flight: int) -> None:
        start = time.perf_counter()
        try:
            while len(self._in_flight) > in_flight:
                step, futures = self._in_flight[0]
                for layer, future in futures.items():
                    try:
                        ack: PushAck = future.result()
                    except MemstoreError as exc:
                        self._in_flight.popleft()
                        named = type(exc)(f"push of step {step}, layer {layer}: {exc}")
                        named.code = exc.code
                        raise named from exc
                    except Exception as exc:
                        self._in_flight.popleft()
                        raise InternalError(f"push of step {step}, layer {layer} failed: {exc!r}") from exc
                    with self._lock:
                        self.stats.rows += ack.rows
                        self.stats.last_version = max(self.stats.last_version, ack.version)
                self._in_flight.popleft()
        finally:
            waited = time.perf_counter() - start
            metrics.observe_push_wait(waited)
            self.stats.wait_s += waited

    def _push_layer(
        self, step: int, layer: int, ids: np.ndarray, values: np.ndarray, lr_scale: float | None
    ) -> PushAck:
        return self.target.push(layer, ids, values, step_id=step, lr_scale=lr_scale)

    def close(self) -> None:
        """Flush, then stop the workers."""
        try:
            self.flush()
        finally:
            for worker in self._workers.values():
                worker.shutdown(wait=True)

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
