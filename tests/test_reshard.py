"""reshard: rows and optimizer state move between shard counts intact, the checksum proves it, and an
online, half-recovered, lazy or inconsistent source is refused with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import memstore.reshard as reshard_module
from memstore.cli import main
from memstore.create import create_sharded, create_table
from memstore.dtypes import DType
from memstore.errors import DataLossError, InvalidArgumentError, TableFormatError, UnavailableError
from memstore.live import LiveConfig, LiveTable
from memstore.reshard import reshard, table_checksum
from memstore.rowgen import initial_rows_at
from memstore.sharding import DEFAULT_PARTITIONS, Sharding
from memstore.table import Table, open_store
from memstore.tabledir.checkpoint import Checkpoint
from memstore.tabledir.manifest import Backend, Init, Manifest
from memstore.tabledir.names import CHECKPOINT_NAME, WAL_DIR, shard_dirs
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from tests.helpers import SMALL_LAYOUT, make_table

DIM = SMALL_LAYOUT.dim
PUSHES = 3  # per layer and shard: every source shard ends at this optimizer step
FAST = LiveConfig(durability=Durability.OS, checkpoint_every=0)


def _manifest(backend: Backend = Backend.MMAP, init: Init = Init.EAGER) -> Manifest:
    adam = OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.05)
    return Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT16, seed=7, optimizer=adam, backend=backend, init=init)


def _dirs(path: Path) -> list[Path]:
    return shard_dirs(path) or [path]


def _push(live: LiveTable, layer: int, seed: int) -> None:
    """One Adam push of random gradients to distinct rows of `layer` that this table holds."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, SMALL_LAYOUT.num_rows(layer), 400))
    sharding = live.manifest.sharding
    if sharding is not None:
        ids = ids[sharding.shard_of(ids) == sharding.shard]
    live.push(layer, ids, rng.standard_normal((len(ids), DIM)).astype(np.float32))


def _trained(path: Path, shards: int, partitions: int = DEFAULT_PARTITIONS, backend: Backend = Backend.MMAP) -> Path:
    """An Adam table on `shards` shards (plain when 1), each shard pushed PUSHES times per layer."""
    if shards == 1:
        create_table(path, _manifest(backend))
    else:
        create_sharded(path, _manifest(backend), shards, partitions)
    for index, shard in enumerate(_dirs(path)):
        with LiveTable.open(shard, config=FAST) as live:
            for step in range(PUSHES):
                for layer in SMALL_LAYOUT.layer_ids:
                    _push(live, layer, seed=1000 * index + 10 * step + layer)
    return path


def _read(path: Path, layer: int, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows and optimizer state of global ids, each read from the shard that holds it (routed by
    the manifest's assignment), without memstore.reshard's own reader."""
    rows = np.zeros((len(ids), DIM), dtype=np.float16)
    state: dict[str, np.ndarray] = {}
    for shard in _dirs(path):
        manifest = Manifest.read(shard)
        sharding = manifest.sharding
        mine = np.ones(len(ids), bool) if sharding is None else sharding.shard_of(ids) == sharding.shard
        with Table.open(shard) as table:
            local = table.local_ids(layer, ids[mine])
            rows[mine] = table.gather(layer, ids[mine])
            for slot, (name, width) in manifest.state_files(layer).items():
                store = open_store(
                    manifest.backend, shard / name, manifest.stored_rows(layer), width, DType.FLOAT32, True
                )
                state.setdefault(slot, np.zeros((len(ids), width), dtype=np.float32))[mine] = store.gather(local)
                store.close()
    return rows, state


@pytest.mark.parametrize(
    ("before", "partitions", "after", "new_partitions", "backend"),
    [
        (2, 16, 3, None, Backend.MMAP),
        (2, 16, 3, None, Backend.LMDB),
        (3, 16, 1, None, Backend.MMAP),
        (1, DEFAULT_PARTITIONS, 2, None, Backend.MMAP),
        (2, 16, 2, 8, Backend.MMAP),
    ],
    ids=["2to3", "2to3-lmdb", "3to1", "1to2", "2to2-8-partitions"],
)
def test_reshard_moves_every_row_and_its_optimizer_state(
    tmp_path: Path, before: int, partitions: int, after: int, new_partitions: int | None, backend: Backend
) -> None:
    source = _trained(tmp_path / "source", before, partitions, backend)
    report = reshard(source, tmp_path / "dest", after, new_partitions)
    dest = tmp_path / "dest"
    expected_partitions = partitions if new_partitions is None else new_partitions

    rng = np.random.default_rng(0)
    for layer in SMALL_LAYOUT.layer_ids:
        ids = rng.permutation(SMALL_LAYOUT.num_rows(layer))[:500]
        rows, state = _read(source, layer, ids)
        initial = initial_rows_at(7, layer, ids, DIM, 1.0, DType.FLOAT16)
        assert (rows != initial).any(axis=1).sum() > 50  # trained rows: a misplaced row would show
        assert (state["exp_avg"] != 0).any(axis=1).sum() > 50
        new_rows, new_state = _read(dest, layer, ids)
        assert new_rows.tobytes() == rows.tobytes()
        assert new_state.keys() == state.keys() == {"exp_avg", "exp_avg_sq"}
        for slot in state:
            assert new_state[slot].tobytes() == state[slot].tobytes()

    assert report.source_checksum == report.dest_checksum
    assert report.dest_checksum == table_checksum(dest, expected_partitions)
    assert report.source_checksum == table_checksum(source, expected_partitions)
    assert report.dest_checksum.state is not None
    assert report.rows_moved == SMALL_LAYOUT.total_rows == sum(report.shard_rows)
    assert len(report.shard_rows) == after and report.num_partitions == expected_partitions

    shards = _dirs(dest)
    assert len(shards) == after and (after == 1) == (shards == [dest])
    for index, shard in enumerate(shards):
        manifest = Manifest.read(shard)
        assert manifest.backend is backend
        expected = None if after == 1 else Sharding.spread(after, index, expected_partitions)
        assert manifest.sharding == expected
        checkpoint = Checkpoint.read(shard)
        assert checkpoint.version == 0 and checkpoint.last_push == {}
        assert checkpoint.layer_steps == {layer: PUSHES for layer in SMALL_LAYOUT.layer_ids}
        assert not (shard / WAL_DIR).exists()
        assert main(["verify", str(shard), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "source"]  # no staging directory left

    with LiveTable.open(shards[-1], config=FAST) as live:  # the optimizer continues from the carried step
        ids = np.flatnonzero(np.arange(SMALL_LAYOUT.num_rows(4)) % expected_partitions == expected_partitions - 1)
        result = live.push(4, ids[:5], np.ones((5, DIM), dtype=np.float32))
        assert (result.version, result.layer_step) == (1, PUSHES + 1)


def test_a_frozen_table_reshards_without_optimizer_state(tmp_path: Path) -> None:
    source = make_table(tmp_path / "plain")
    report = reshard(source, tmp_path / "dest", 3)
    assert report.dest_checksum.state is None and report.layer_steps == {}
    ids = np.arange(SMALL_LAYOUT.num_rows(1))
    with Table.open(source) as table:
        expected = table.gather(1, ids)
    assert _read(tmp_path / "dest", 1, ids)[0].tobytes() == expected.tobytes()
    assert not any((shard / CHECKPOINT_NAME).exists() for shard in shard_dirs(tmp_path / "dest"))
    assert table_checksum(tmp_path / "dest") == table_checksum(source) == report.source_checksum


def test_the_checksum_sees_one_changed_value(tmp_path: Path) -> None:
    source = _trained(tmp_path / "source", 2, 16)
    before = table_checksum(source)
    state = source / "shard-1" / "layer_4.exp_avg_sq.f32"
    data = bytearray(state.read_bytes())
    data[-1] ^= 1
    state.write_bytes(bytes(data))
    after = table_checksum(source)
    assert after.rows == before.rows and after.state != before.state


# --------------------------------------------------------------------------- refusals


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_an_existing_destination_is_refused(tmp_path: Path) -> None:
    source = _trained(tmp_path / "source", 2, 16)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="already exists"):
        reshard(source, tmp_path / "dest", 3)
    assert _entries(tmp_path / "dest") == ["keep.txt"]


def test_a_source_open_for_writing_is_refused(tmp_path: Path) -> None:
    source = _trained(tmp_path / "source", 2, 16)
    with LiveTable.open(source / "shard-1", config=FAST):  # what a writable daemon holds
        with pytest.raises(UnavailableError, match=r"shard-1 is open for writing.*stop that daemon"):
            reshard(source, tmp_path / "dest", 3)
    assert _entries(tmp_path) == ["source"]
    reshard(source, tmp_path / "dest", 3)  # once the writer is gone


def test_a_lazy_source_is_refused(tmp_path: Path) -> None:
    create_sharded(tmp_path / "lazy", _manifest(init=Init.LAZY), 2, 16)
    with pytest.raises(InvalidArgumentError, match="lazy table"):
        reshard(tmp_path / "lazy", tmp_path / "dest", 3)
    assert _entries(tmp_path) == ["lazy"]


def test_shards_at_different_optimizer_steps_are_refused(tmp_path: Path) -> None:
    source = _trained(tmp_path / "source", 2, 16)
    with LiveTable.open(source / "shard-0", config=FAST) as live:
        _push(live, 4, seed=99)
    with pytest.raises(InvalidArgumentError, match=rf"layer 4's optimizer step: .*shard-0 is at step {PUSHES + 1}"):
        reshard(source, tmp_path / "dest", 3)
    assert _entries(tmp_path) == ["source"]


def test_a_source_with_unreplayed_pushes_is_refused_until_recovered(tmp_path: Path) -> None:
    source = _trained(tmp_path / "source", 1)
    live = LiveTable.open(source, config=FAST)
    _push(live, 1, seed=5)
    _push(live, 4, seed=6)
    live._close_files()  # a crashed daemon: the pushes are in the log, past the checkpoint
    with pytest.raises(TableFormatError, match="past its checkpoint.*Start its daemon"):
        reshard(source, tmp_path / "dest", 2)
    assert _entries(tmp_path) == ["source"]
    LiveTable.open(source, config=FAST).close()  # recovery replays the log and checkpoints
    report = reshard(source, tmp_path / "dest", 2)
    assert report.layer_steps == {layer: PUSHES + 1 for layer in SMALL_LAYOUT.layer_ids}


def test_one_shard_of_several_is_refused(tmp_path: Path) -> None:
    source = _trained(tmp_path / "source", 2, 16)
    with pytest.raises(InvalidArgumentError, match="shard 1 of 2; give the directory holding all 2 shards"):
        reshard(source / "shard-1", tmp_path / "dest", 1)


@pytest.mark.parametrize(
    ("shards", "partitions", "message"),
    [(0, None, "num_shards is 0"), (17, None, "17 shards need 1..16"), (2, 10**5, "fewer than 100000 partitions")],
)
def test_impossible_shardings_are_refused(tmp_path: Path, shards: int, partitions: int | None, message: str) -> None:
    source = _trained(tmp_path / "source", 2, 16)
    with pytest.raises(InvalidArgumentError, match=message):
        reshard(source, tmp_path / "dest", shards, partitions)
    assert _entries(tmp_path) == ["source"]


@pytest.mark.parametrize(("name", "what"), [("layer_4.rows", "rows"), ("layer_1.exp_avg.f32", "optimizer state")])
def test_a_write_damaged_before_verification_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, what: str
) -> None:
    source = _trained(tmp_path / "source", 2, 16)
    write_store = reshard_module.write_store

    def damaging(backend, path, num_rows, width, dtype, chunks):  # one flipped bit in one file of shard-2
        if path.parent.name == "shard-2" and path.name == name:
            chunks = list(chunks)
            chunks[0] = chunks[0].copy()
            chunks[0].view(np.uint8).reshape(-1)[3] ^= 1
        write_store(backend, path, num_rows, width, dtype, chunks)

    monkeypatch.setattr(reshard_module, "write_store", damaging)
    with pytest.raises(DataLossError, match=f"the {what} read back from the new files"):
        reshard(source, tmp_path / "dest", 3)
    assert _entries(tmp_path) == ["source"]  # neither the destination nor its staging directory
