"""SameHostReader without a daemon: the rows, versions and errors a client gets from the daemon's mapped files
are the daemon's own, on the fast path (a plain mapped table) and through the table (a shard, a lazy table)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from memstore.create import create_sharded, create_table
from memstore.errors import InvalidArgumentError
from memstore.same_host import SameHostReader, advertise, open_if_same_host
from memstore.table import Table
from memstore.tabledir.manifest import Init, Manifest
from memstore.tabledir.seqlock import SeqLock
from tests.helpers import SMALL_LAYOUT, make_table

LAYER = 4


def _reader(table: Table, seqlock: SeqLock | None = None, version: int = 0) -> SameHostReader:
    reader = open_if_same_host(advertise(table, seqlock), table.manifest.fingerprint, version, 100)
    assert reader is not None
    return reader


@pytest.fixture(params=["plain", "shard", "lazy"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Table, SameHostReader]]:
    """A table as its daemon would open it, and a reader of it as a same-host client would."""
    manifest = Manifest(layout=SMALL_LAYOUT, seed=3)
    if request.param == "plain":
        path = make_table(tmp_path / "plain", seed=3)
    elif request.param == "shard":
        path = create_sharded(tmp_path / "sharded", manifest, num_shards=2, num_partitions=8)[1]
    else:
        path = create_table(tmp_path / "lazy", replace(manifest, init=Init.LAZY))
    table = Table.open(path)
    reader = _reader(table)
    try:
        yield table, reader
    finally:
        reader.close()
        table.close()


def _held(table: Table, here: bool = True) -> np.ndarray:
    """Ids of the layer's rows `table` holds (a shard holds some partitions), or of those it does not."""
    every = np.arange(table.manifest.layout.num_rows(LAYER))
    sharding = table.manifest.sharding
    held = np.ones(len(every), dtype=bool) if sharding is None else sharding.shard_of(every) == sharding.shard
    return every[held == here]


def _servable_ids(table: Table, count: int, seed: int) -> np.ndarray:
    """`count` random ids of rows `table` holds, with duplicates."""
    return np.random.default_rng(seed).choice(_held(table), count)


@pytest.mark.parametrize("count", [0, 1, 37, 600])
def test_rows_are_the_daemons(served, count: int) -> None:
    table, reader = served
    ids = _servable_ids(table, count, seed=count)
    rows, version = reader.gather(LAYER, ids)
    np.testing.assert_array_equal(rows, table.gather(LAYER, ids))
    assert rows.shape == (count, SMALL_LAYOUT.dim) and version == 0
    out = np.full((count, SMALL_LAYOUT.dim), np.nan, dtype=table.manifest.dtype.numpy)
    into, _ = reader.gather(LAYER, ids, out)
    assert into is out
    np.testing.assert_array_equal(out, table.gather(LAYER, ids))
    # A client's ids arrive as int64; other integer arrays and lists are checked the daemon's way.
    np.testing.assert_array_equal(reader.gather(LAYER, ids.astype(np.int32))[0], rows)
    np.testing.assert_array_equal(reader.gather(LAYER, ids.tolist())[0], rows)


@pytest.mark.parametrize(
    "ids",
    [[-1], [0, 1, 10**6], ["rows"], [5, -(2**63)], [2**63 - 1], [3, 2], [[0, 1]], [0.5]],
    ids=[
        "negative",
        "far-past-the-end",
        "just-past-the-end",
        "most-negative",
        "largest-int64",
        "other-shard",
        "2-d",
        "float",
    ],
)
def test_bad_ids_fail_with_the_daemons_error(served, ids) -> None:
    table, reader = served
    if ids == ["rows"]:
        ids = [0, SMALL_LAYOUT.num_rows(LAYER)]
    row_ids = np.array(ids, dtype=np.float64 if ids == [0.5] else np.int64)
    if ids == [3, 2]:  # ids of rows the table holds are no error: look for ones it does not
        if table.manifest.sharding is None:
            pytest.skip("every row is the table's")
        row_ids = _held(table, here=False)[:2]
    with pytest.raises(Exception) as daemon_says:
        table.local_ids(LAYER, row_ids)
    with pytest.raises(type(daemon_says.value), match=f"^{_escaped(daemon_says.value)}$"):
        reader.gather(LAYER, row_ids)


def test_an_unknown_layer_or_unfit_out_fails_as_the_daemons(served) -> None:
    table, reader = served
    with pytest.raises(InvalidArgumentError) as daemon_says:
        table.store(2)
    with pytest.raises(InvalidArgumentError, match=f"^{_escaped(daemon_says.value)}$"):
        reader.gather(2, np.array([0]))
    ids = _servable_ids(table, 3, seed=1)
    with pytest.raises(InvalidArgumentError, match="out must be a C-contiguous"):
        reader.gather(LAYER, ids, np.empty((4, SMALL_LAYOUT.dim), dtype=table.manifest.dtype.numpy))
    read_only = np.empty((3, SMALL_LAYOUT.dim), dtype=table.manifest.dtype.numpy)
    read_only.flags.writeable = False
    with pytest.raises(InvalidArgumentError, match="read-only"):
        reader.gather(LAYER, ids, read_only)
    assert reader.gather(LAYER, ids)[0].shape == (3, SMALL_LAYOUT.dim)  # still reads


def test_a_trained_table_is_read_under_its_sequence_lock(tmp_path: Path) -> None:
    table = Table.open(make_table(tmp_path / "t", seed=3))
    seqlock = SeqLock(tmp_path / "seqlock", create=True)
    reader = _reader(table, seqlock)
    try:
        ids = np.array([5, 7, 5])
        seqlock.set(14)  # version 7, no push writing
        rows, version = reader.gather(LAYER, ids)
        assert version == 7
        np.testing.assert_array_equal(rows, table.gather(LAYER, ids))
        seqlock.set(15)  # a push is writing rows (and, here, never ends): the reader gives up
        assert reader.gather(LAYER, ids) is None
        assert reader.max_rows_per_request == 100
    finally:
        reader.close()
        seqlock.close()
        table.close()


def _escaped(error: BaseException) -> str:
    return re.escape(str(error))
