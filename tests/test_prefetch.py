"""The prefetcher: overlap, identical results, bounded buffers, errors per step and layer, decoding."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import torch

import client.prefetch as prefetch_module
from client import MemstoreClient, PrefetchConfig, Prefetcher, PrefetchStats, TableFetcher
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from model.train import TableSource, TrainConfig, build_model, train
from tests.helpers import DEADLINE_S, SMALL_ENGRAM, SMALL_LAYOUT, small_lm_config, wait_until

LAYERS = SMALL_LAYOUT.layer_ids  # (1, 4)
DIM = SMALL_LAYOUT.dim


def _expected_rows(layer: int, ids: np.ndarray) -> np.ndarray:
    """The fake store's row for (layer, id): distinct for every pair, exact in float32."""
    return (ids[..., None] * 8 + layer + np.arange(DIM) / 16).astype(np.float32)  # [*shape, dim]


class FakeStore:
    """A RowReader with a controlled latency per lookup and failures injected by (layer, call number)."""

    def __init__(self, latency_s: float = 0.0, fail: dict[tuple[int, int], Exception] | None = None) -> None:
        self.manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, seed=0)
        self.latency_s = latency_s
        self.fail = fail or {}
        self.calls: dict[int, int] = defaultdict(int)
        self._lock = threading.Lock()

    def describe(self, timeout: float | None = None) -> Manifest:
        return self.manifest

    def lookup(self, layer_id, row_ids, *, timeout=None, out=None) -> torch.Tensor:
        with self._lock:
            call = self.calls[layer_id]
            self.calls[layer_id] += 1
        time.sleep(self.latency_s)
        if (layer_id, call) in self.fail:
            raise self.fail[layer_id, call]
        rows = torch.from_numpy(_expected_rows(layer_id, np.asarray(row_ids)))
        if out is None:
            return rows
        out.copy_(rows.reshape(out.shape))
        return out


def _ids(step: int, shape: tuple[int, ...] = (2, 8, 8)) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(step)
    return {layer: rng.integers(0, SMALL_LAYOUT.num_rows(layer), shape) for layer in LAYERS}


def _prefetcher(store, config: PrefetchConfig | None = None) -> Prefetcher:
    return Prefetcher(store, row_ids_fn=lambda step: _ids(step), layer_ids=LAYERS, config=config)


_MAX_STEPS = 16  # the steps a GatedStore recognises


class GatedStore(FakeStore):
    """A FakeStore whose lookups of step n (the ids `_ids(n)`) finish only once `open(n)` is
    called: the test decides when a fetch ends, rather than a latency racing a sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[int, threading.Event] = defaultdict(threading.Event)
        self.finished: dict[int, int] = defaultdict(int)  # step -> lookups done

    def open(self, step: int) -> None:
        self.gates[step].set()

    def lookup(self, layer_id, row_ids, *, timeout=None, out=None) -> torch.Tensor:
        # The step is told by the ids themselves (_ids(step)), not by call order: the lookups of two
        # steps in flight at once may reach the store in either order.
        step = next(s for s in range(_MAX_STEPS) if np.array_equal(np.asarray(row_ids), _ids(s)[layer_id]))
        with self._lock:
            gate = self.gates[step]
        assert gate.wait(DEADLINE_S), f"step {step} was never let through"
        rows = super().lookup(layer_id, row_ids, timeout=timeout, out=out)
        with self._lock:
            self.finished[step] += 1
        return rows


def test_rows_arrive_before_they_are_needed_when_compute_exceeds_latency() -> None:
    store = GatedStore()
    with _prefetcher(store) as prefetcher:
        handle = prefetcher.submit(0)
        store.open(0)
        for step in range(1, 6):
            upcoming = prefetcher.submit(step)  # returns with its lookups still waiting: fetched behind the step
            assert store.finished[step] == 0
            store.open(step)  # this step's "compute" lasts until the next step's rows are in
            wait_until(lambda: all(f.done() for f in upcoming._futures.values()), f"step {step}'s rows arrived")
            for layer in LAYERS:
                np.testing.assert_array_equal(handle.rows(layer).numpy(), _expected_rows(layer, _ids(step - 1)[layer]))
            handle.release()
            handle = upcoming
        handle.release()
        stats = prefetcher.stats
    assert store.finished == {step: len(LAYERS) for step in range(6)}
    assert stats.requests == 10 and stats.ready_on_request == 10  # every layer's rows were there when asked


def test_without_overlap_the_whole_fetch_is_stall() -> None:
    latency = 0.02
    with _prefetcher(FakeStore(latency_s=latency), PrefetchConfig(overlap=False)) as prefetcher:
        for step in range(3):
            with prefetcher.submit(step) as handle:
                for layer in LAYERS:
                    handle.rows(layer)
        assert prefetcher.stats.total_stall_s >= 3 * len(LAYERS) * latency


def test_buffers_are_reused_over_100_steps() -> None:
    seen: dict[int, set[int]] = defaultdict(set)
    with _prefetcher(FakeStore()) as prefetcher:
        handle = prefetcher.submit(0)
        allocations_after_warmup = None
        for step in range(1, 101):
            upcoming = prefetcher.submit(step)
            for layer in LAYERS:
                seen[layer].add(handle.rows(layer).data_ptr())
            handle.release()
            handle = upcoming
            if step == 2:
                allocations_after_warmup = prefetcher.stats.buffer_allocations
        handle.release()
        assert prefetcher.stats.buffer_allocations == allocations_after_warmup == 2 * len(LAYERS)
    assert all(len(pointers) == 2 for pointers in seen.values())  # depth 2: two buffers per layer, alternating


def test_a_larger_step_grows_the_buffer_once() -> None:
    shapes = iter([(2, 8, 8), (4, 8, 8), (4, 8, 8), (1, 8, 8)])
    with Prefetcher(FakeStore(), lambda _: _ids(0, next(shapes)), LAYERS, PrefetchConfig(depth=1)) as prefetcher:
        for _ in range(4):
            with prefetcher.submit(None) as handle:
                assert handle.rows(1).shape == (*handle.row_ids[1].shape, DIM)
        assert prefetcher.stats.buffer_allocations == 2 * len(LAYERS)


def test_an_error_in_one_layer_raises_in_that_step_and_not_the_next() -> None:
    store = FakeStore(fail={(4, 2): UnavailableError("daemon gone")})
    with _prefetcher(store) as prefetcher:
        for step in range(2):
            with prefetcher.submit(step) as handle:
                handle.rows(1), handle.rows(4)
        with prefetcher.submit(2) as failing:
            np.testing.assert_array_equal(failing.rows(1).numpy(), _expected_rows(1, _ids(2)[1]))
            for _ in range(2):  # asking again fails again: never the buffer's stale rows of step 0
                with pytest.raises(UnavailableError, match="step 2, layer 4: daemon gone"):
                    failing.rows(4)
        with prefetcher.submit(3) as handle:
            np.testing.assert_array_equal(handle.rows(4).numpy(), _expected_rows(4, _ids(3)[4]))


def test_a_deadline_keeps_its_type_and_a_foreign_error_becomes_internal() -> None:
    store = FakeStore(fail={(1, 0): DeadlineExceededError("too slow"), (1, 1): RuntimeError("bug")})
    with _prefetcher(store) as prefetcher:
        with prefetcher.submit(0) as handle, pytest.raises(DeadlineExceededError, match="step 0, layer 1"):
            handle.rows(1)
        with prefetcher.submit(1) as handle, pytest.raises(Exception, match="step 1, layer 1 failed") as caught:
            handle.rows(1)
        assert type(caught.value).__name__ == "InternalError"


def test_submit_waits_for_a_released_buffer_set() -> None:
    with _prefetcher(FakeStore(), PrefetchConfig(depth=1, acquire_timeout_s=0.1)) as prefetcher:
        held = prefetcher.submit(0)
        with pytest.raises(ResourceExhaustedError, match="release"):
            prefetcher.submit(1)
        held.release()
        held.release()  # idempotent
        with pytest.raises(InvalidArgumentError, match="released"):
            held.rows(1)
        with prefetcher.submit(1) as handle:
            handle.rows(1)


def test_bad_layers_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="cannot serve layers \\[3\\]"):
        Prefetcher(FakeStore(), _ids, (1, 3))
    with _prefetcher(FakeStore()) as prefetcher:
        with pytest.raises(InvalidArgumentError, match="expected"):
            prefetcher.submit_row_ids({1: np.zeros(3, dtype=np.int64)})
        with prefetcher.submit(0) as handle, pytest.raises(InvalidArgumentError, match="not 2"):
            handle.rows(2)


def test_prefetched_rows_equal_client_lookups(client: MemstoreClient, table: Table) -> None:
    with Prefetcher(client, _ids, LAYERS) as prefetcher:
        for step in range(3):
            with prefetcher.submit(step) as handle:
                for layer in LAYERS:
                    ids = _ids(step)[layer]
                    expected = table.gather(layer, ids.reshape(-1)).reshape(*ids.shape, DIM)
                    np.testing.assert_array_equal(handle.rows(layer).numpy(), expected)


def test_table_fetcher_reads_in_process(table: Table) -> None:
    with Prefetcher(TableFetcher(table), _ids, LAYERS) as prefetcher, prefetcher.submit(7) as handle:
        ids = _ids(7)[4]
        np.testing.assert_array_equal(handle.rows(4).numpy(), table.gather(4, ids.reshape(-1)).reshape(*ids.shape, DIM))


@pytest.fixture
def engram_client(tmp_path, daemon_factory):
    """A client of a daemon serving a float32 table for SMALL_ENGRAM."""
    manifest = Manifest(layout=SMALL_ENGRAM.layout(), dtype=DType.FLOAT32, seed=SMALL_ENGRAM.seed)
    with Table.open(create_table(tmp_path / "engram", manifest)) as table:
        with MemstoreClient(daemon_factory(table).address) as client:
            yield client


def test_training_with_prefetch_equals_training_without(lm_data, engram_client) -> None:
    config = TrainConfig(steps=6, batch_size=4, eval_every=3, eval_batches=1)
    losses = {}
    for prefetch in (False, True):
        torch.manual_seed(0)
        model = build_model(small_lm_config(lm_data.vocab_size), lm_data, TableSource.MEMSTORE, engram_client)
        if prefetch:
            with Prefetcher(engram_client, model.row_ids, SMALL_ENGRAM.layer_ids) as prefetcher:
                result = train(model, lm_data, config, progress=False, prefetcher=prefetcher)
        else:
            result = train(model, lm_data, config, progress=False)
        losses[prefetch] = result.train_loss + result.val_loss
        assert result.prefetched is prefetch and set(result.stall_seconds) == {1}
        assert result.rows_fetched >= config.steps * config.batch_size * 32 * SMALL_ENGRAM.num_heads
    assert losses[True] == losses[False]


def test_prefetched_generation_equals_plain_generation_and_fetches_only_new_positions(lm_data, engram_client) -> None:
    torch.manual_seed(0)
    model = build_model(small_lm_config(lm_data.vocab_size), lm_data, TableSource.MEMSTORE, engram_client).eval()
    prompt = torch.from_numpy(np.stack([lm_data.val[:5], lm_data.val[40:45]]).astype(np.int64))  # [2, 5]
    new_tokens = 40  # past max_seq_len 32: the window slides, the cached rows follow it
    torch.manual_seed(1)
    plain = model.generate(prompt, new_tokens)
    with Prefetcher(engram_client, model.row_ids, SMALL_ENGRAM.layer_ids) as prefetcher:
        torch.manual_seed(1)
        prefetched = model.generate(prompt, new_tokens, prefetcher=prefetcher)
        heads = SMALL_ENGRAM.num_heads
        assert prefetcher.stats.rows == 2 * heads * (5 + new_tokens - 1)  # each position fetched once
    assert torch.equal(prefetched, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_land_on_the_device_after_their_event() -> None:
    with _prefetcher(FakeStore(latency_s=0.01), PrefetchConfig(device="cuda")) as prefetcher:
        handle = prefetcher.submit(0)
        for step in range(1, 4):
            upcoming = prefetcher.submit(step)
            for layer in LAYERS:
                rows = handle.rows(layer)
                assert rows.is_cuda
                expected = _expected_rows(layer, _ids(step - 1)[layer])
                np.testing.assert_array_equal((rows * 1).cpu().numpy(), expected)  # a kernel on the compute stream
            handle.release()
            handle = upcoming
        handle.release()
        assert all(buffers.host[1].is_pinned() for buffers in list(prefetcher._free.queue))


@pytest.mark.parametrize("dtype", [DType.FLOAT8_E4M3_ROWSCALE, DType.INT8_ROWSCALE], ids=lambda d: d.value)
def test_quantized_rows_reach_the_model_decoded(tmp_path, daemon_factory, dtype: DType) -> None:
    from client import RemoteEmbedding
    from model.sources import MappedTable

    path = create_table(tmp_path / "q", Manifest(layout=SMALL_LAYOUT, dtype=dtype, seed=0))
    ids = _ids(3)[1]  # [2, 8, 8]
    with Table.open(path) as table, MemstoreClient(daemon_factory(table).address) as client:
        expected = dtype.to_float32(table.gather(1, ids.reshape(-1))).reshape(*ids.shape, DIM)  # [2, 8, 8, dim]
        raw = client.lookup(1, ids)
        assert raw.dtype == torch.uint8 and raw.shape == (*ids.shape, DIM + 4)  # a quarter of float32's bytes
        for source in (RemoteEmbedding(client, 1), MappedTable(table, 1)):
            np.testing.assert_array_equal(source(torch.from_numpy(ids)).numpy(), expected)
        with Prefetcher(client, _ids, LAYERS) as prefetcher, prefetcher.submit(3) as handle:
            rows = handle.rows(1)
            assert rows.dtype == torch.float32
            np.testing.assert_array_equal(rows.numpy(), expected)


def _closed_with_a_step_pending() -> tuple[Prefetcher, GatedStore, object, object]:
    """A prefetcher closed while step 0's lookups ran and step 1's were still queued (so cancelled)."""
    store = GatedStore()
    prefetcher = _prefetcher(store)
    running = prefetcher.submit(0)  # both workers block on step 0's gate
    pending = prefetcher.submit(1)  # queued behind them
    closer = threading.Thread(target=prefetcher.close)
    closer.start()
    wait_until(lambda: all(f.cancelled() for f in pending._futures.values()), "step 1's lookups were cancelled")
    store.open(0)
    closer.join(DEADLINE_S)
    assert not closer.is_alive()
    return prefetcher, store, running, pending


def test_release_after_close_keeps_the_original_error() -> None:
    prefetcher, _, running, pending = _closed_with_a_step_pending()
    with pytest.raises(ValueError, match="the step's own failure"):
        try:
            raise ValueError("the step's own failure")
        finally:  # what a training loop's cleanup does once the prefetcher's `with` has closed it
            pending.release()
            running.release()
    assert prefetcher._free.qsize() == 0  # a no-op: nothing goes back to a closed prefetcher


def test_rows_of_a_step_cancelled_by_close_say_so() -> None:
    _, _, _, pending = _closed_with_a_step_pending()
    with pytest.raises(InvalidArgumentError, match="closed before step 1, layer 1 was fetched"):
        pending.rows(1)


def test_submit_after_close_is_refused_clearly() -> None:
    prefetcher = _prefetcher(FakeStore())
    prefetcher.close()
    prefetcher.close()  # idempotent
    with pytest.raises(InvalidArgumentError, match="closed"):
        prefetcher.submit(0)
    assert prefetcher.stats.steps == 0


def test_a_failed_buffer_allocation_returns_the_set_to_the_pool() -> None:
    huge = np.broadcast_to(np.int64(0), (2**38,))  # 2^38 ids in no memory; their rows need 32 TiB
    with _prefetcher(FakeStore(), PrefetchConfig(depth=1, acquire_timeout_s=1.0)) as prefetcher:
        with pytest.raises(RuntimeError):
            prefetcher.submit_row_ids({layer: huge for layer in LAYERS})
        assert prefetcher.stats.steps == 0 and prefetcher.stats.rows == 0
        with prefetcher.submit(0) as handle:  # the only set is back: no ResourceExhaustedError
            np.testing.assert_array_equal(handle.rows(4).numpy(), _expected_rows(4, _ids(0)[4]))


def test_a_handle_released_by_many_threads_returns_its_set_once() -> None:
    with _prefetcher(FakeStore(), PrefetchConfig(depth=2)) as prefetcher:
        for step in range(50):
            handle = prefetcher.submit(step)
            barrier = threading.Barrier(8)
            threads = [threading.Thread(target=lambda: (barrier.wait(DEADLINE_S), handle.release())) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(DEADLINE_S)
            assert prefetcher._free.qsize() == 2


def test_submit_and_rows_refuse_cuda_graph_capture(monkeypatch) -> None:
    with _prefetcher(FakeStore()) as prefetcher:
        handle = prefetcher.submit(0)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        for call in (lambda: prefetcher.submit(1), lambda: prefetcher.submit_row_ids(_ids(1)), lambda: handle.rows(1)):
            with pytest.raises(InvalidArgumentError, match="CUDA graph capture.*static input"):
                call()
        monkeypatch.undo()
        assert prefetcher.stats.steps == 1
        np.testing.assert_array_equal(handle.rows(1).numpy(), _expected_rows(1, _ids(0)[1]))
        handle.release()


def test_summary_reports_the_gpu_stall_beside_the_host_stall() -> None:
    stats = PrefetchStats(steps=2, stall_s={1: 0.5}, gpu_stall_s={1: 0.25, 4: 0.125})
    assert stats.total_gpu_stall_s == 0.375
    assert "exposed stall 0.500 s" in stats.summary() and "GPU stall 0.375 s" in stats.summary()
    assert "GPU" not in PrefetchStats(stall_s={1: 0.5}).summary()  # no CUDA, no GPU figure


def test_the_module_docstring_states_the_stream_discipline() -> None:
    doc = prefetch_module.__doc__
    for contract in ("copy stream's pool", "Event.synchronize", "wait_event", "record_stream", "released", "capture"):
        assert contract in doc


# CUDA probes: the compute (or copy) stream is held back by torch.cuda._sleep and nothing syncs the host,
# so a missing ordering shows as wrong rows. Every step's rows are compared bit for bit with the table.
_CYCLES = 50_000_000  # tens of milliseconds of GPU time at any clock rate
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _assert_steps_equal_the_table(got: list[dict[int, torch.Tensor]]) -> None:
    for step, rows in enumerate(got):
        for layer in LAYERS:
            np.testing.assert_array_equal(rows[layer].cpu().numpy(), _expected_rows(layer, _ids(step)[layer]))


@needs_cuda
def test_cuda_a_pinned_buffer_is_not_overwritten_while_its_copy_is_queued() -> None:
    steps, got = 8, []
    with _prefetcher(FakeStore(), PrefetchConfig(device="cuda")) as prefetcher:
        handle = prefetcher.submit(0)
        for step in range(steps):
            upcoming = prefetcher.submit(step + 1) if step + 1 < steps else None
            torch.cuda._sleep(_CYCLES)  # the compute stream falls behind the host
            got.append({layer: handle.rows(layer) * 1 for layer in LAYERS})
            handle.release()
            handle = upcoming
        torch.cuda.synchronize()
    _assert_steps_equal_the_table(got)


@needs_cuda
def test_cuda_device_buffers_never_take_a_block_queued_kernels_still_read() -> None:
    count = _ids(0)[LAYERS[0]].size
    with _prefetcher(FakeStore(), PrefetchConfig(device="cuda", depth=1)) as prefetcher:
        sentinel = torch.full((count, DIM), -1.0, device=prefetcher.device)  # the size of a layer's buffer
        torch.cuda._sleep(_CYCLES)
        later = sentinel * 1  # queued behind the sleep: reads sentinel's block
        del sentinel  # the block is free for the compute stream's next allocation at once
        with prefetcher.submit(0) as handle:
            got = [{layer: handle.rows(layer) * 1 for layer in LAYERS}]
        torch.cuda.synchronize()
    assert torch.equal(later, torch.full_like(later, -1.0))
    _assert_steps_equal_the_table(got)


@needs_cuda
def test_cuda_release_orders_the_next_copy_after_the_consuming_stream() -> None:
    steps, got, side = 6, [], torch.cuda.Stream()
    with _prefetcher(FakeStore(), PrefetchConfig(device="cuda")) as prefetcher:
        handle = prefetcher.submit(0)
        for step in range(steps):
            upcoming = prefetcher.submit(step + 1) if step + 1 < steps else None
            with torch.cuda.stream(side):  # the step runs on a stream of its own
                views = {layer: handle.rows(layer) for layer in LAYERS}
                torch.cuda._sleep(_CYCLES)
                got.append({layer: views[layer] * 1 for layer in LAYERS})
            handle.release()  # outside: the current stream is the idle default one
            handle = upcoming
        side.synchronize()
    _assert_steps_equal_the_table(got)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_the_device_is_resolved_once_at_construction() -> None:
    previous = torch.cuda.current_device()
    try:
        torch.cuda.set_device(0)
        with _prefetcher(FakeStore(), PrefetchConfig(device="cuda")) as prefetcher:
            torch.cuda.set_device(1)  # as DDP does after the prefetcher was built
            got = []
            for step in range(3):
                with prefetcher.submit(step) as handle:
                    rows = {layer: handle.rows(layer) for layer in LAYERS}
                    assert all(r.device == torch.device("cuda", 0) for r in rows.values())
                    got.append({layer: r * 1 for layer, r in rows.items()})
            torch.cuda.synchronize(0)
    finally:
        torch.cuda.set_device(previous)
    _assert_steps_equal_the_table(got)


@needs_cuda
def test_cuda_the_consumer_streams_wait_for_copies_is_counted() -> None:
    from prometheus_client import REGISTRY

    def observed() -> float:
        return REGISTRY.get_sample_value("memstore_client_prefetch_gpu_stall_seconds_count", {"layer": "1"}) or 0.0

    before = observed()
    with _prefetcher(FakeStore(), PrefetchConfig(device="cuda")) as prefetcher:
        with torch.cuda.stream(prefetcher._copy_stream):
            torch.cuda._sleep(_CYCLES)  # the copies queue behind this; the compute stream is idle
        with prefetcher.submit(0) as handle:
            got = [{layer: handle.rows(layer) * 1 for layer in LAYERS}]
    assert set(prefetcher.stats.gpu_stall_s) == set(LAYERS) and prefetcher.stats.total_gpu_stall_s > 0
    assert "GPU stall" in prefetcher.stats.summary()
    assert observed() == before + 1  # one wait of layer 1, collected by release() or close()
    _assert_steps_equal_the_table(got)


@needs_cuda
def test_cuda_graphs_take_rows_copied_into_static_inputs_and_refuse_capture() -> None:
    count = _ids(0)[1].size
    with _prefetcher(FakeStore(), PrefetchConfig(device="cuda")) as prefetcher:
        static = torch.zeros(count, DIM, device=prefetcher.device)
        warmup = torch.cuda.Stream()
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup):
            static * 2
        torch.cuda.current_stream().wait_stream(warmup)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = static * 2
        handle = prefetcher.submit(0)
        with pytest.raises(InvalidArgumentError, match="capture"), torch.cuda.graph(torch.cuda.CUDAGraph()):
            handle.rows(1)
        handle.release()
        got = []
        for step in range(4):
            with prefetcher.submit(step) as handle:
                static.copy_(handle.rows(1).reshape(count, DIM))  # outside capture, on the replaying stream
                graph.replay()
                got.append((out / 2).reshape(*_ids(step)[1].shape, DIM))
        torch.cuda.synchronize()
    for step, rows in enumerate(got):
        np.testing.assert_array_equal(rows.cpu().numpy(), _expected_rows(1, _ids(step)[1]))
