"""LiveTable without gRPC: optimizer pushes, versions, bad input, recovery, snapshots, torn reads."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, ReadOnlyError, TableFormatError, UnavailableError
from memstore.layout import EngramLayout
from memstore.live import LiveConfig, LiveTable
from memstore.optim import apply_update
from memstore.table import Table, open_store
from memstore.tabledir.manifest import Backend, Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from tests.helpers import CREATABLE_DTYPES, DEADLINE_S, SMALL_LAYOUT, join_all

LAYER = SMALL_LAYOUT.layer_ids[0]
DIM = SMALL_LAYOUT.dim
FAST = LiveConfig(durability=Durability.OS)


@pytest.fixture(params=list(Backend), ids=lambda b: b.value)
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


def _trainable(
    path: Path,
    kind: OptimizerKind = OptimizerKind.ADAM,
    dtype: DType = DType.FLOAT32,
    backend: Backend = Backend.MMAP,
) -> Path:
    optimizer = OptimizerConfig(kind=kind, lr=0.1)
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=dtype, seed=3, optimizer=optimizer, backend=backend)
    return create_table(path, manifest)


def _push_args(i: int, count: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The i-th push of a deterministic sequence: distinct ids (overlapping across pushes), gradients."""
    rng = np.random.default_rng(i)
    ids = rng.choice(200, size=count, replace=False)
    return ids, rng.standard_normal((count, DIM)).astype(np.float32)


def _files(path: Path, live: LiveTable | None = None) -> dict[str, bytes]:
    """Every row and optimizer-state value of a table, per store, whatever the backend (through
    `live`'s own stores when it has the table open: LMDB allows one open per process)."""
    if live is not None:
        return {
            name: store.gather(np.arange(store.num_rows)).tobytes() for name, store in live._stores_by_name().items()
        }
    manifest = Manifest.read(path)
    contents = {}
    for layer in manifest.layout.layer_ids:
        num_rows = manifest.layout.num_rows(layer)
        stores = {manifest.layer_file(layer): (manifest.layout.dim, manifest.dtype)}
        stores |= {name: (width, DType.FLOAT32) for name, width in manifest.state_files(layer).values()}
        for name, (width, dtype) in stores.items():
            store = open_store(manifest.backend, path / name, num_rows, width, dtype, read_only=True)
            contents[name] = store.gather(np.arange(num_rows)).tobytes()
            store.close()
    return contents


@pytest.mark.parametrize("kind", list(OptimizerKind))
@pytest.mark.parametrize("dtype", CREATABLE_DTYPES)
def test_pushes_apply_the_optimizer_and_count_versions(tmp_path, kind: OptimizerKind, dtype: DType, backend) -> None:
    path = _trainable(tmp_path / "t", kind, dtype, backend)
    with Table.open(path) as table:
        expected = {
            layer: dtype.to_float32(table.gather(layer, np.arange(table.manifest.layout.num_rows(layer))))
            for layer in SMALL_LAYOUT.layer_ids
        }
    manifest = Manifest.read(path)
    state = manifest.optimizer.initial_state(SMALL_LAYOUT.num_rows(LAYER), DIM)
    with LiveTable.open(path, config=FAST) as live:
        for i in range(1, 6):
            ids, grads = _push_args(i)
            result = live.push(LAYER, ids, grads, lr_scale=0.5)
            assert (result.version, result.layer_step, result.rows) == (i, i, len(ids))
            optimizer = OptimizerConfig(kind=kind, lr=0.1 * 0.5)
            rows, new_state = apply_update(
                optimizer, expected[LAYER][ids], {k: v[ids] for k, v in state.items()}, grads, i
            )
            expected[LAYER][ids] = dtype.to_float32(dtype.from_float64(rows))  # stored in the table's dtype
            for slot, values in new_state.items():
                state[slot][ids] = values
            got, version = live.gather(LAYER, ids)
            assert version == i
            np.testing.assert_array_equal(dtype.to_float32(got), expected[LAYER][ids])
        other = SMALL_LAYOUT.layer_ids[1]
        assert live.layer_steps == {LAYER: 5, other: 0}
        everything, _ = live.gather(other, np.arange(SMALL_LAYOUT.num_rows(other)))
        np.testing.assert_array_equal(dtype.to_float32(everything), expected[other])  # untouched layer


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda ids, g: (np.r_[ids, ids[:1]], np.r_[g, g[:1]]), InvalidArgumentError, "distinct"),
        (
            lambda ids, g: (ids, np.where(np.arange(len(ids))[:, None] == 3, np.nan, g).astype(np.float32)),
            InvalidArgumentError,
            "not finite",
        ),
        (lambda ids, g: (ids, g[:, :-1]), InvalidArgumentError, "float32"),
        (lambda ids, g: (ids, g.astype(np.float64)), InvalidArgumentError, "float32"),
        (lambda ids, g: (np.r_[ids[:-1], 10**9], g), InvalidArgumentError, "out of range"),
    ],
    ids=["repeated-ids", "nan", "width", "float64", "range"],
)
def test_bad_pushes_change_nothing(tmp_path, mutate, error, message, backend) -> None:
    path = _trainable(tmp_path / "t", backend=backend)
    with LiveTable.open(path, config=FAST) as live:
        live.push(LAYER, *_push_args(1))
        before = _files(path, live)
        with pytest.raises(error, match=message):
            live.push(LAYER, *mutate(*_push_args(2)))
        with pytest.raises(InvalidArgumentError, match="lr_scale"):
            live.push(LAYER, *_push_args(2), lr_scale=0.0)
        with pytest.raises(InvalidArgumentError, match="not a layer|layer"):
            live.push(99, *_push_args(2))
        assert live.version == 1 and live.layer_steps[LAYER] == 1
        assert _files(path, live) == before


def test_frozen_and_read_only_tables_refuse_pushes(tmp_path, table_path) -> None:
    with LiveTable.open(table_path) as frozen, pytest.raises(ReadOnlyError, match="no optimizer"):
        frozen.push(LAYER, *_push_args(1))
    with LiveTable.open(_trainable(tmp_path / "t"), read_only=True) as read_only:
        with pytest.raises(ReadOnlyError, match="read-only"):
            read_only.push(LAYER, *_push_args(1))


def test_one_writer_per_table(tmp_path) -> None:
    path = _trainable(tmp_path / "t")
    with LiveTable.open(path, config=FAST):
        with pytest.raises(UnavailableError, match="another process"):
            LiveTable.open(path, config=FAST)
        # A read-only reader would serve rows changing under it at a stale version: refused, saying what works.
        with pytest.raises(UnavailableError, match=r"open for writing.*serve a snapshot of it read-only"):
            LiveTable.open(path, read_only=True)
    with LiveTable.open(path, read_only=True) as reader:  # once the writer is gone
        assert not reader.trainable
        with pytest.raises(UnavailableError, match="served read-only .* a writer would change its rows"):
            LiveTable.open(path, config=FAST)


def test_a_retried_step_is_answered_without_applying_it_again(tmp_path) -> None:
    with LiveTable.open(_trainable(tmp_path / "t"), config=FAST) as live:
        first = live.push(LAYER, *_push_args(1), step_id=7, client_id="replica-0")
        rows = live.gather(LAYER, np.arange(200))[0].copy()
        again = live.push(LAYER, *_push_args(1), step_id=7, client_id="replica-0")
        assert again == first and live.version == 1
        np.testing.assert_array_equal(live.gather(LAYER, np.arange(200))[0], rows)
        assert live.push(LAYER, *_push_args(1), step_id=7, client_id="replica-1").version == 2  # another client
    with LiveTable.open(tmp_path / "t", config=FAST) as reopened:  # the checkpoint remembers the last steps
        assert reopened.push(LAYER, *_push_args(1), step_id=7, client_id="replica-0") == first
        assert reopened.version == 2


def _expected_after(path: Path, pushes: int, dest: Path) -> dict[str, bytes]:
    """The contents of a fresh copy of the table after the first `pushes` pushes of the sequence."""
    _trainable(dest, backend=Manifest.read(path).backend)
    with LiveTable.open(dest, config=FAST) as live:
        for i in range(1, pushes + 1):
            live.push(LAYER, *_push_args(i))
    return _files(dest)


def test_recovery_replays_the_log_over_lost_writes(tmp_path, backend) -> None:
    path = _trainable(tmp_path / "t", backend=backend)
    pristine = shutil.copytree(path, tmp_path / "pristine")
    live = LiveTable.open(path, config=LiveConfig(durability=Durability.FSYNC, checkpoint_every=0))
    for i in range(1, 9):
        live.push(LAYER, *_push_args(i))
    live._close_files()  # a crash: no checkpoint
    for name in _files(pristine):  # and every write to the stores was lost
        (shutil.rmtree if (path / name).is_dir() else Path.unlink)(path / name)
        (shutil.copytree if (pristine / name).is_dir() else shutil.copyfile)(pristine / name, path / name)
    with LiveTable.open(path, config=FAST) as recovered:
        assert recovered.version == 8 and recovered.layer_steps[LAYER] == 8
    assert _files(path) == _expected_after(path, 8, tmp_path / "expected")


def test_a_checkpoint_drops_the_log_and_a_reopen_continues(tmp_path, backend) -> None:
    path = _trainable(tmp_path / "t", backend=backend)
    with LiveTable.open(path, config=LiveConfig(durability=Durability.OS, checkpoint_every=3)) as live:
        for i in range(1, 8):
            live.push(LAYER, *_push_args(i))
    with LiveTable.open(path, config=FAST) as live:
        assert live.version == 7
        live.push(LAYER, *_push_args(8))
    assert _files(path) == _expected_after(path, 8, tmp_path / "expected")
    assert sum(f.stat().st_size for f in (path / "wal").iterdir()) < 1024  # checkpointed on close


def test_read_only_open_refuses_an_unrecovered_table(tmp_path) -> None:
    path = _trainable(tmp_path / "t")
    live = LiveTable.open(path, config=LiveConfig(durability=Durability.OS, checkpoint_every=0))
    live.push(LAYER, *_push_args(1))
    live._close_files()  # crashed writer
    with pytest.raises(TableFormatError, match="recover"):
        LiveTable.open(path, read_only=True)


def test_a_snapshot_taken_while_pushing_is_the_table_at_one_version(tmp_path, backend) -> None:
    path = _trainable(tmp_path / "t", backend=backend)
    with LiveTable.open(path, config=FAST) as live:
        stop = threading.Event()
        five = threading.Event()  # set after the fifth push, or when the writer failed
        failures: list[BaseException] = []

        def keep_pushing() -> None:
            i = 0
            try:
                while not stop.is_set() and i < 400:
                    i += 1
                    live.push(LAYER, *_push_args(i))
                    if i == 5:
                        five.set()
            except BaseException as exc:  # reported below
                failures.append(exc)
                five.set()

        writer = threading.Thread(target=keep_pushing)
        writer.start()
        try:
            assert five.wait(DEADLINE_S), "the writer did not push 5 times"
            assert not failures, failures
            version = live.snapshot(tmp_path / "snap")
        finally:
            stop.set()
            join_all([writer])
    assert not failures
    assert version >= 5
    snapshot = _files(tmp_path / "snap")
    assert snapshot == _expected_after(path, version, tmp_path / "expected")
    with LiveTable.open(tmp_path / "snap", read_only=True) as served:  # a snapshot serves as is
        assert served.version == version
    with LiveTable.open(path, read_only=True) as reader, pytest.raises(InvalidArgumentError, match="exists"):
        reader.snapshot(tmp_path / "snap")


def test_readers_never_see_a_torn_row(tmp_path) -> None:
    # Every push adds the same amount to every value of a row (SGD, lr 1, gradient -k), so a row
    # read half before and half after a push has values that moved by different amounts.
    layout = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(60, 60), max_ngram=3, heads_per_ngram=1, dim=512)
    optimizer = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)
    path = create_table(tmp_path / "t", Manifest(layout=layout, dtype=DType.FLOAT32, optimizer=optimizer, init_std=0.0))
    ids = np.arange(layout.num_rows(1))
    with LiveTable.open(path, config=FAST) as live:
        stop = threading.Event()
        failures: list[BaseException] = []

        def keep_pushing() -> None:
            k = 0
            try:
                while not stop.is_set():
                    k += 1
                    live.push(1, ids, np.full((len(ids), 512), -float(k % 7 + 1), dtype=np.float32))
            except BaseException as exc:  # reported below
                failures.append(exc)

        writer = threading.Thread(target=keep_pushing)
        writer.start()
        try:
            # At least 300 reads, and reads of several versions: reads that all came before (or all
            # after) the pushes would prove nothing.
            reads, versions = 0, set()
            deadline = time.monotonic() + DEADLINE_S
            while reads < 300 or len(versions) < 100:
                assert time.monotonic() < deadline, f"{reads} reads saw versions {sorted(versions)}: {failures}"
                rows, version = live.gather(1, ids)
                assert (rows == rows[:, :1]).all(), "a row mixes values of two versions"
                versions.add(version)
                reads += 1
        finally:
            stop.set()
            join_all([writer])
        assert not failures


def test_snapshot_copies_keep_the_original_untouched(tmp_path) -> None:
    path = _trainable(tmp_path / "t")
    with LiveTable.open(path, config=FAST) as live:
        live.push(LAYER, *_push_args(1))
        live.snapshot(tmp_path / "snap")
        live.push(LAYER, *_push_args(2))
    shutil.rmtree(tmp_path / "snap")
    with LiveTable.open(path, config=FAST) as live:
        assert live.version == 2


def test_concurrent_pushes_that_each_find_a_checkpoint_due_all_succeed(tmp_path: Path) -> None:
    """Two pushes crossing --checkpoint-every together used to run two checkpoints at once, sharing
    the temp file: one push failed with an internal error after it had been applied."""
    path = _trainable(tmp_path / "t", OptimizerKind.SGD)
    failures: list[BaseException] = []
    with LiveTable.open(path, config=LiveConfig(durability=Durability.OS, checkpoint_every=1)) as live:

        def pusher(seed: int) -> None:
            for i in range(50):
                try:
                    live.push(LAYER, *_push_args(1000 * seed + i, count=8))
                except BaseException as exc:  # noqa: BLE001 - any failure fails the test below
                    failures.append(exc)

        threads = [threading.Thread(target=pusher, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        join_all(threads)
        assert failures == [] and live.version == 400
    with LiveTable.open(path, config=FAST) as reopened:
        assert reopened.version == 400
