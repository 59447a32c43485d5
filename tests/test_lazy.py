"""Lazy tables: no rows written at create, never-written rows read as an eager table's, disk grows with writes."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import pytest

from memstore.cli import main
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.layout import EngramLayout
from memstore.live import LiveConfig, LiveTable
from memstore.table import Table
from memstore.tabledir.manifest import Init, Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from tests.helpers import FLOAT_DTYPES, SMALL_LAYOUT

# rows x dim = 1.0e11 parameters: 200 GB of float16 if written.
HUNDRED_BILLION = EngramLayout(
    layer_ids=(2, 15), vocab_size_per_ngram=(97_700_000, 97_700_000), max_ngram=3, heads_per_ngram=8, dim=32
)


def _pair(tmp_path, dtype: DType, **kw) -> tuple[Table, Table]:
    eager = Manifest(layout=SMALL_LAYOUT, dtype=dtype, seed=4, init_std=0.5, **kw)
    lazy = replace(eager, init=Init.LAZY)
    return Table.open(create_table(tmp_path / "eager", eager)), Table.open(create_table(tmp_path / "lazy", lazy))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_lazy_table_reads_as_the_eager_table(tmp_path, dtype: DType) -> None:
    eager, lazy = _pair(tmp_path, dtype)
    with eager, lazy:
        for layer in SMALL_LAYOUT.layer_ids:
            ids = np.arange(SMALL_LAYOUT.num_rows(layer))
            assert lazy.gather(layer, ids).tobytes() == eager.gather(layer, ids).tobytes()
            shuffled = np.random.default_rng(layer).permutation(ids)[:500].repeat(2)
            assert lazy.gather(layer, shuffled).tobytes() == eager.gather(layer, shuffled).tobytes()
    assert os.stat(tmp_path / "lazy" / "layer_1.rows").st_blocks == 0  # nothing on disk


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_updated_rows_read_updated_and_the_rest_unchanged(tmp_path, dtype: DType) -> None:
    eager_manifest = Manifest(layout=SMALL_LAYOUT, dtype=dtype, seed=4)
    eager = Table.open(create_table(tmp_path / "eager", eager_manifest), read_only=False)
    lazy = Table.open(create_table(tmp_path / "lazy", replace(eager_manifest, init=Init.LAZY)), read_only=False)
    ids = np.array([0, 17, 999, 1000])
    new = dtype.from_float64(np.random.default_rng(0).standard_normal((4, SMALL_LAYOUT.dim)))
    new[1] = 0  # an all-zero row stays written (stored as -0.0 first), never read back as initial
    with eager, lazy:
        for table in (eager, lazy):
            table.update(1, ids, new)
        everything = np.arange(SMALL_LAYOUT.num_rows(1))
        got, expected = lazy.gather(1, everything), eager.gather(1, everything)
        mask = np.ones(len(everything), bool)
        mask[ids] = False
        assert got[mask].tobytes() == expected[mask].tobytes()
        assert (dtype.to_float32(got[ids]) == dtype.to_float32(new)).all()  # -0.0 == 0.0


def test_a_lazy_table_trains_and_recovers(tmp_path) -> None:
    optimizer = OptimizerConfig(OptimizerKind.ADAM, lr=0.1)
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT32, optimizer=optimizer, init=Init.LAZY)
    eager_path = create_table(tmp_path / "eager", replace(manifest, init=Init.EAGER))
    lazy_path = create_table(tmp_path / "lazy", manifest)
    rng = np.random.default_rng(1)
    pushes = [(rng.choice(300, 40, replace=False), rng.standard_normal((40, 16)).astype(np.float32)) for _ in range(5)]
    results = []
    for path in (eager_path, lazy_path):
        with LiveTable.open(path, config=LiveConfig(Durability.OS)) as live:
            for ids, grads in pushes:
                live.push(1, ids, grads)
        with LiveTable.open(path, read_only=True) as reopened:
            results.append(reopened.gather(1, np.arange(SMALL_LAYOUT.num_rows(1)))[0])
    np.testing.assert_array_equal(results[1], results[0])


def test_a_hundred_billion_parameter_table_in_seconds(tmp_path, capsys) -> None:
    assert HUNDRED_BILLION.num_params >= 10**11
    start = time.perf_counter()
    path = create_table(tmp_path / "big", Manifest(layout=HUNDRED_BILLION, dtype=DType.FLOAT16, init=Init.LAZY))
    assert time.perf_counter() - start < 30  # prime search and sparse files only
    on_disk = sum(f.stat().st_blocks * 512 for f in path.iterdir())
    assert on_disk < 1 << 20
    with Table.open(path, read_only=False) as table:
        layer = 15
        ids = np.random.default_rng(0).integers(0, HUNDRED_BILLION.num_rows(layer), 4096)
        rows = table.gather(layer, ids)  # the deterministic init (checked bit for bit on small tables above)
        assert rows.shape == (4096, 32) and np.isfinite(rows.astype(np.float32)).all()
        written = np.unique(ids)[:10]
        table.update(layer, written, np.ones((10, 32), np.float16))
        assert (table.gather(layer, written) == 1).all()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lazy init" in out and f"{HUNDRED_BILLION.num_params:,} logical parameters" in out


def test_a_reopened_lazy_table_finds_its_written_rows(tmp_path) -> None:
    manifest = Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT16, seed=2, init=Init.LAZY)
    path = create_table(tmp_path / "lazy", manifest)
    eager = Table.open(create_table(tmp_path / "eager", replace(manifest, init=Init.EAGER)))
    written = np.array([3, 250, 251, 1100])
    values = np.full((4, SMALL_LAYOUT.dim), 2.5, np.float16)
    with Table.open(path, read_only=False) as table:
        table.update(1, written, values)
    with Table.open(path) as reopened, eager:  # frozen: the store learns the data pages from the file
        ids = np.arange(SMALL_LAYOUT.num_rows(1))
        got, expected = reopened.gather(1, ids), eager.gather(1, ids)
        expected[written] = values
        assert got.tobytes() == expected.tobytes()


def test_quantized_tables_are_not_lazy() -> None:
    from memstore.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="lazy tables store float rows"):
        Manifest(layout=SMALL_LAYOUT, dtype=DType.INT8_ROWSCALE, init=Init.LAZY)
