"""Limits: the in-flight byte budget, concurrent calls and message size, refused with
RESOURCE_EXHAUSTED; requests over a limit are not retried, calls refused for load are."""

from __future__ import annotations

import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest

from client import MemstoreClient
from memstore.daemon_config import ServerConfig
from memstore.errors import RETRY_PUSHBACK_KEY, ResourceExhaustedError
from memstore.limits import BUSY_RETRY_MS, InFlightBudget, lookup_cost
from memstore.table import Table
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc
from tests.helpers import DEADLINE_S, FAST_FAIL, InProcessDaemon, join_all, wait_until

LAYER = 1
# These limits are the gRPC path's (message sizes, its retry policy); test_dataplane.py checks the data plane's.
GRPC = replace(FAST_FAIL, same_host=False, data_plane=False, max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.2)


def test_budget_reserves_and_releases() -> None:
    budget = InFlightBudget(100)
    with budget.reserve(60, "a"):
        assert budget.reserved == 60
        with budget.reserve(40, "b"):
            assert budget.reserved == 100
    assert budget.reserved == 0


def test_budget_refuses_a_busy_daemon_with_a_retry_hint() -> None:
    budget = InFlightBudget(100)
    with budget.reserve(60, "a"):
        with pytest.raises(ResourceExhaustedError, match="retry shortly") as caught:
            with budget.reserve(41, "a lookup"):
                pass
    assert caught.value.retry_after_s == BUSY_RETRY_MS / 1000
    assert budget.reserved == 0


def test_budget_refuses_what_can_never_fit_without_a_retry_hint() -> None:
    budget = InFlightBudget(100)
    with pytest.raises(ResourceExhaustedError, match="split it") as caught:
        with budget.reserve(101, "a push"):
            pass
    assert caught.value.retry_after_s is None
    assert budget.reserved == 0


def test_budget_is_released_when_the_call_fails() -> None:
    budget = InFlightBudget(100)
    with pytest.raises(KeyError):
        with budget.reserve(80, "a"):
            raise KeyError("the call failed")
    assert budget.reserved == 0


@pytest.fixture
def served(table: Table):
    started: list[InProcessDaemon] = []

    def start(**limits: int) -> InProcessDaemon:
        started.append(InProcessDaemon(table, ServerConfig(same_host=False, **limits)))
        return started[-1]

    yield start
    for daemon in started:
        assert daemon.server.stop(None).wait(DEADLINE_S)


def _row_bytes(table: Table) -> int:
    return table.manifest.dtype.row_bytes(table.manifest.layout.dim)


def _held_ids(table: Table) -> np.ndarray:
    """Every row of the layer, 8 times over (1.2 MB of rows): a response no buffer swallows whole."""
    return np.tile(np.arange(table.manifest.layout.num_rows(LAYER), dtype=np.int64), 8)


def _request_bytes(ids: np.ndarray) -> int:
    """Bytes of a Lookup request for `ids` on the wire (the daemon counts them in its budget)."""
    return pb.LookupRequest(layer_id=LAYER, row_ids=ids.tobytes()).ByteSize()


def _held_lookup(address: str, ids: np.ndarray) -> tuple[grpc.Channel, object]:
    """A lookup whose stream nobody reads: flow control stops the daemon mid-stream, so the call
    (and its reservation) stays in progress until cancelled. Without BDP probing: it grows the
    window as data arrives, and the daemon then sends a small table's whole response and is done."""
    options = [("grpc.http2.lookahead_bytes", 1 << 16), ("grpc.http2.bdp_probe", 0)]
    channel = grpc.insecure_channel(address, options=options)
    stream = pb_grpc.MemstoreStub(channel).Lookup(pb.LookupRequest(layer_id=LAYER, row_ids=ids.tobytes()))
    next(stream)  # the daemon has reserved its bytes and sent the first chunk
    return channel, stream


def test_a_lookup_larger_than_the_whole_budget_is_refused_once(served, table: Table) -> None:
    ids = np.arange(400, dtype=np.int64)
    daemon = served(
        max_in_flight_bytes=lookup_cost(len(ids), _row_bytes(table), 10**6, 16 << 20, _request_bytes(ids)) - 1
    )
    with MemstoreClient(daemon.address, GRPC) as client:
        with pytest.raises(ResourceExhaustedError, match="more than this daemon's whole in-flight budget") as caught:
            client.lookup(LAYER, ids)
        assert caught.value.retry_after_s is None
        assert daemon.calls("Lookup", "RESOURCE_EXHAUSTED") == 1  # pushback -1: gRPC did not retry it
        assert daemon.metrics.total("memstore_rejected_total", reason="too_large") == 1
        assert client.lookup(LAYER, ids[:10]).shape == (10, table.manifest.layout.dim)  # still serving


@pytest.mark.parametrize("attempts", [1, 5], ids=["client-loop", "grpc-retry-policy"])
def test_a_busy_daemon_refuses_and_the_client_retries_once_it_has_room(served, table: Table, attempts: int) -> None:
    """Backpressure: while one big lookup holds most of the budget, another is refused; it is repeated
    (by gRPC's retry policy after the daemon's pushback, then by the client until its deadline) and
    succeeds once the first is gone."""
    held_ids = _held_ids(table)
    row_bytes = _row_bytes(table)
    config = ServerConfig(same_host=False, chunk_bytes=4096)
    chunk_rows = config.chunk_bytes // row_bytes
    held = lookup_cost(len(held_ids), row_bytes, chunk_rows, config.window_bytes, _request_bytes(held_ids))
    ids = np.arange(50, dtype=np.int64)
    daemon = served(
        chunk_bytes=4096,
        max_in_flight_bytes=held + lookup_cost(len(ids), row_bytes, chunk_rows, 0, _request_bytes(ids)),
    )
    channel, stream = _held_lookup(daemon.address, held_ids)
    result: dict[str, object] = {}
    try:

        def lookup() -> None:
            try:
                with MemstoreClient(daemon.address, replace(GRPC, max_attempts=attempts)) as client:
                    result["rows"] = client.lookup(LAYER, ids)
            except BaseException as exc:  # reported below
                result["error"] = exc

        worker = threading.Thread(target=lookup)
        worker.start()

        def busy() -> float:
            return daemon.metrics.total("memstore_rejected_total", reason="busy")

        wait_until(lambda: busy() >= 1 or not worker.is_alive(), "the daemon refused the lookup as busy")
        assert daemon.calls("Lookup", "OK") == 0  # refused while the held lookup holds the budget
        stream.cancel()  # the held lookup ends: its bytes come back, the retry gets in
        join_all([worker])
    finally:
        channel.close()
    assert "error" not in result, result["error"]
    assert np.array_equal(result["rows"].numpy(), table.gather(LAYER, ids))
    assert busy() >= 1 and daemon.calls("Lookup", "RESOURCE_EXHAUSTED") == busy()  # refused, then retried
    assert daemon.calls("Lookup", "OK") == 1  # once it had room
    # The held lookup held its bytes until cancelled (counted just after it released them).
    wait_until(lambda: daemon.calls("Lookup", "CANCELLED") == 1, "the held lookup was counted as cancelled")


def test_busy_refusals_carry_a_pushback_and_oversized_ones_say_never(served, table: Table) -> None:
    row_bytes = _row_bytes(table)
    chunk_rows = 4096 // row_bytes
    held_ids = _held_ids(table)
    held = lookup_cost(len(held_ids), row_bytes, chunk_rows, ServerConfig().window_bytes, _request_bytes(held_ids))
    ids = np.arange(100, dtype=np.int64)
    cost = lookup_cost(len(ids), row_bytes, chunk_rows, ServerConfig().window_bytes, _request_bytes(ids))
    daemon = served(chunk_bytes=4096, max_in_flight_bytes=held + cost - 1)  # each fits alone, not both at once

    def refusal(row_ids: np.ndarray) -> grpc.RpcError:
        """A lookup's refusal through a channel without retries (so the pushback comes back to us)."""
        with grpc.insecure_channel(daemon.address) as channel:
            request = pb.LookupRequest(layer_id=LAYER, row_ids=row_ids.tobytes())
            with pytest.raises(grpc.RpcError) as caught:
                list(pb_grpc.MemstoreStub(channel).Lookup(request, timeout=10))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        return caught.value

    never = refusal(np.tile(held_ids, 2))  # more than the whole budget
    assert (RETRY_PUSHBACK_KEY, "-1") in tuple(never.trailing_metadata())
    channel, stream = _held_lookup(daemon.address, held_ids)
    try:
        busy = refusal(ids)  # fits the budget, but not while the held lookup holds its share
    finally:
        stream.cancel()
        channel.close()
    assert (RETRY_PUSHBACK_KEY, str(BUSY_RETRY_MS)) in tuple(busy.trailing_metadata())
    assert daemon.metrics.total("memstore_rejected_total", reason="busy") == 1
    assert daemon.metrics.total("memstore_rejected_total", reason="too_large") == 1


def test_the_request_message_counts_in_the_budget(served, table: Table) -> None:
    """A lookup holds its request as received too (8 bytes an id): a budget that fits everything
    but the request refuses it, where it once admitted it and held more than the budget."""
    ids = np.arange(20_000, dtype=np.int64) % table.manifest.layout.num_rows(LAYER)
    without_request = lookup_cost(len(ids), _row_bytes(table), 10**6, 16 << 20)
    daemon = served(max_in_flight_bytes=without_request + _request_bytes(ids) // 2)
    with grpc.insecure_channel(daemon.address) as channel:  # the client would split the lookup to fit
        request = pb.LookupRequest(layer_id=LAYER, row_ids=ids.tobytes())
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.MemstoreStub(channel).Lookup(request, timeout=DEADLINE_S))
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than this daemon's whole in-flight budget" in caught.value.details()


def test_rows_over_the_request_limit_are_not_retried(served) -> None:
    daemon = served(max_rows_per_request=10)
    with MemstoreClient(daemon.address, GRPC) as client:
        with pytest.raises(ResourceExhaustedError, match="10"):
            client.lookup(LAYER, np.arange(11))
    assert daemon.calls("Lookup", "RESOURCE_EXHAUSTED") == 1


def test_a_message_over_the_size_limit_is_refused_before_decoding(served) -> None:
    daemon = served(max_message_bytes=1024)
    with MemstoreClient(daemon.address, replace(GRPC, max_attempts=1)) as client:
        with pytest.raises(ResourceExhaustedError, match="larger than max"):
            client.lookup(LAYER, np.arange(1000))  # 8,000 bytes of ids
        assert daemon.calls("Lookup") == 0  # gRPC refused it: no handler parsed or counted it
        assert client.lookup(LAYER, np.arange(100)).shape[0] == 100
        assert daemon.calls("Lookup", "OK") == daemon.calls("Lookup") == 1


def test_calls_past_the_concurrency_limit_are_refused_at_once(served, table: Table) -> None:
    daemon = served(max_concurrent_calls=1, max_followers=0, chunk_bytes=4096)
    channel, stream = _held_lookup(daemon.address, _held_ids(table))
    try:
        with MemstoreClient(daemon.address, replace(GRPC, max_attempts=1)) as client:
            with pytest.raises(ResourceExhaustedError, match="max-concurrent-calls") as caught:
                client.version()
            assert caught.value.retry_after_s == BUSY_RETRY_MS / 1000  # load, not the request: worth retrying
            stream.cancel()
            channel.close()
            for _ in range(100):  # the slot frees once the cancelled call is cleaned up
                try:
                    assert client.version() == 0
                    break
                except ResourceExhaustedError:
                    threading.Event().wait(0.02)
            else:
                pytest.fail("the daemon never served again after the held call ended")
    finally:
        channel.close()
