"""The push record (memstore.tabledir.record): its pinned bytes, both formats, and logs of format 1 replaying."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.create import create_table
from memstore.dtypes import DType
from memstore.errors import DataLossError, InvalidArgumentError
from memstore.layout import EngramLayout
from memstore.live import LiveConfig, LiveTable
from memstore.optim import OptimizerConfig, OptimizerKind
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import WAL_DIR
from memstore.tabledir.record import FORMAT, MAX_CLIENT_ID_BYTES, PREFIX_SIZE, PushRecord
from memstore.wal import Durability, WriteAheadLog
from tests.helpers import SMALL_LAYOUT

# One layer (id 3) of 23 rows of dim 2, float16 rows, Adam (state slots exp_avg and exp_avg_sq, 2 wide).
TINY = Manifest(
    EngramLayout(layer_ids=(3,), vocab_size_per_ngram=(20,), max_ngram=2, heads_per_ngram=1, dim=2),
    dtype=DType.FLOAT16,
    optimizer=OptimizerConfig(OptimizerKind.ADAM),
)
EXPECTED = PushRecord(
    layer_id=3,
    layer_step=12,
    step_id=40,
    client_id="tr-é",
    ids=np.array([5, 7], dtype=np.int64),
    rows=np.array([[1.0, -2.0], [0.5, 3.0]], dtype="<f2"),
    state={
        "exp_avg": np.array([[0.25, 0.5], [1, 2]], dtype="<f4"),
        "exp_avg_sq": np.array([[4, 8], [16, 0.125]], dtype="<f4"),
    },
)
# EXPECTED as memstore wrote it before records had a format (format 1), from memstore.live._Record.encode:
# header (layer 3, step 12, step id 40, 2 rows, client id of 5 bytes), "tr-é", ids, float16 rows, then
# exp_avg and exp_avg_sq as float32.
FORMAT_1 = bytes.fromhex(
    "03000000" "0c00000000000000" "2800000000000000" "0200000000000000" "0500"
    "74722dc3a9"
    "0500000000000000" "0700000000000000"
    "003c00c0" "00380042"
    "0000803e0000003f" "0000803f00000040"
    "0000804000000041" "000080410000003e"
)  # fmt: skip
# And as this memstore writes it: the format (2) and eight zero bytes, then format 1's bytes.
FORMAT_2 = bytes.fromhex("02000000" "0000000000000000") + FORMAT_1  # fmt: skip


def _same(a: PushRecord, b: PushRecord) -> bool:
    return (
        (a.layer_id, a.layer_step, a.step_id, a.client_id) == (b.layer_id, b.layer_step, b.step_id, b.client_id)
        and np.array_equal(a.ids, b.ids)
        and a.rows.tobytes() == b.rows.tobytes()  # bit for bit (NaN payloads and -0.0 included)
        and a.rows.shape == b.rows.shape
        and sorted(a.state) == sorted(b.state)
        and all(a.state[s].tobytes() == b.state[s].tobytes() and a.state[s].shape == b.state[s].shape for s in a.state)
    )


@pytest.mark.parametrize("payload", [FORMAT_1, FORMAT_2], ids=["format 1", "format 2"])
def test_pinned_bytes_decode_to_their_fields(payload: bytes) -> None:
    assert len(FORMAT_1) == 30 + 5 + 2 * 8 + 2 * 2 * 2 + 2 * (2 * 2 * 4)
    assert _same(PushRecord.decode(payload, TINY), EXPECTED)


def test_encode_writes_the_pinned_bytes_of_the_current_format() -> None:
    assert FORMAT == 2 and PREFIX_SIZE == 12
    assert EXPECTED.encode() == FORMAT_2


def test_a_format_1_record_of_any_layer_id_is_not_taken_for_a_prefix() -> None:
    """Any u32 is a valid layer id, so format 1's first four bytes may read as any format number: what
    tells the formats apart is format 1's layer step (at least 1) where a prefix has eight zero bytes."""
    layout = EngramLayout(layer_ids=(2,), vocab_size_per_ngram=(20,), max_ngram=2, heads_per_ngram=1, dim=2)
    manifest = replace(TINY, layout=layout)  # layer 2: format 1's first bytes read as "format 2"
    old = (2).to_bytes(4, "little") + FORMAT_1[4:]
    record = PushRecord.decode(old, manifest)
    assert (record.layer_id, record.layer_step, record.client_id) == (2, 12, "tr-é")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (bytes.fromhex("030000000000000000000000") + FORMAT_1, "format 3, which this memstore does not read"),
        (bytes.fromhex("010000000000000000000000") + FORMAT_1, "format 1, which has no such prefix"),
        (FORMAT_2[:-1], "malformed"),
        (FORMAT_1[:-4], "malformed"),
        (FORMAT_1[:33], "malformed"),  # cut inside the client id
        (FORMAT_2 + b"\0", "1 unexpected bytes"),
        (FORMAT_1[:-4] + b"\xff" * 4 + b"\0", "1 unexpected bytes"),
        (b"\x04" + FORMAT_1[1:], "malformed.*unknown Engram layer 4"),
        (FORMAT_1[:30] + b"\xff" * 5 + FORMAT_1[35:], "malformed.*utf-8"),
        (b"", "malformed"),
    ],
)
def test_a_record_that_is_not_whole_is_refused(payload: bytes, match: str) -> None:
    with pytest.raises(DataLossError, match=match):
        PushRecord.decode(payload, TINY)


@pytest.mark.parametrize("row", [-1, 23, 2**63 - 1])
def test_a_record_writing_rows_outside_its_layer_is_refused(row: int) -> None:
    """Its log frame's CRC can be right (a record built by a faulty or hostile primary): decoding checks
    the ids against the table, so neither a replica nor a replay writes outside the layer's 23 rows."""
    assert PushRecord.decode(replace(EXPECTED, ids=np.array([5, 22])).encode(), TINY).ids.tolist() == [5, 22]
    with pytest.raises(DataLossError, match="outside layer 3's 23 rows"):
        PushRecord.decode(replace(EXPECTED, ids=np.array([5, row])).encode(), TINY)


def test_a_client_id_over_the_header_s_16_bits_is_refused_not_cut() -> None:
    """Cut, it could end inside a UTF-8 character and the record could never be read back."""
    longest = "x" + "é" * (MAX_CLIENT_ID_BYTES // 2)  # 65535 bytes of UTF-8
    assert PushRecord.decode(replace(EXPECTED, client_id=longest).encode(), TINY).client_id == longest
    with pytest.raises(InvalidArgumentError, match="65537 bytes of UTF-8; at most 65535"):
        replace(EXPECTED, client_id="é" + longest).encode()


_DTYPES = [DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.INT8_ROWSCALE]
_KINDS = [OptimizerKind.SGD, OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD, OptimizerKind.ADAM]


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(_DTYPES),
    kind=st.sampled_from(_KINDS),
    layer_id=st.integers(0, 2**32 - 1),
    dim=st.integers(1, 6),
    layer_step=st.integers(1, 2**64 - 1),
    step_id=st.integers(-(2**63), 2**63 - 1),
    client_id=st.text(max_size=12),
    count=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_record_decodes_to_what_was_encoded(
    dtype: DType,
    kind: OptimizerKind,
    layer_id: int,
    dim: int,
    layer_step: int,
    step_id: int,
    client_id: str,
    count: int,
    seed: int,
) -> None:
    layout = EngramLayout(layer_ids=(layer_id,), vocab_size_per_ngram=(20,), max_ngram=2, heads_per_ngram=1, dim=dim)
    manifest = Manifest(layout, dtype=dtype, optimizer=OptimizerConfig(kind))
    rng = np.random.default_rng(seed)
    width = dtype.stored_width(dim)
    record = PushRecord(
        layer_id,
        layer_step,
        step_id,
        client_id,
        ids=rng.integers(0, manifest.stored_rows(layer_id), size=count, dtype=np.int64),
        rows=rng.integers(0, 256, size=(count, width * dtype.itemsize), dtype=np.uint8).view(dtype.numpy),
        state={
            slot: rng.integers(0, 2**32, size=(count, w), dtype=np.uint32).view("<f4")  # any bits, NaNs included
            for slot, (_, w) in manifest.state_files(layer_id).items()
        },
    )
    payload = record.encode()
    assert payload[:PREFIX_SIZE] == FORMAT.to_bytes(4, "little") + bytes(8)
    assert _same(PushRecord.decode(payload, manifest), record)
    # The same record in format 1 (its bytes after the prefix) decodes alike.
    assert _same(PushRecord.decode(payload[PREFIX_SIZE:], manifest), record)


TRAINABLE = Manifest(
    layout=SMALL_LAYOUT, dtype=DType.FLOAT16, seed=3, optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.05)
)
FAST = LiveConfig(durability=Durability.OS, checkpoint_every=0)


def _push_all(live: LiveTable, pushes: int) -> None:
    for i in range(1, pushes + 1):
        rng = np.random.default_rng(i)
        layer = SMALL_LAYOUT.layer_ids[i % 2]
        ids = rng.choice(SMALL_LAYOUT.num_rows(layer), size=32, replace=False)
        live.push(layer, ids, rng.standard_normal((32, SMALL_LAYOUT.dim)).astype(np.float32), step_id=i, client_id="t")


def _state(live: LiveTable) -> tuple[int, dict[int, int], dict, dict[str, bytes]]:
    stores = {name: s.gather(np.arange(s.num_rows)).tobytes() for name, s in live._stores_by_name().items()}
    return live.version, dict(live.layer_steps), dict(live._last_push), stores


def test_a_log_of_format_1_records_replays_as_its_format_2_twin(tmp_path: Path) -> None:
    """A table left by an earlier memstore with pushes in its log (stopped uncleanly) recovers them: the
    same pushes logged in format 1 and in format 2 bring the same files, steps and clients' last steps."""
    pristine = create_table(tmp_path / "pristine", TRAINABLE)
    path = shutil.copytree(pristine, tmp_path / "t")
    live = LiveTable.open(path, config=FAST)
    _push_all(live, 6)
    logged = [(r.version, r.payload) for r in live._wal.records()]
    live._close_files()  # a crash: nothing checkpointed, only the log holds the pushes
    twins = {}
    for fmt in (1, 2):
        copy = shutil.copytree(pristine, tmp_path / f"format{fmt}")  # files as created: the log must redo it all
        shutil.copyfile(path / "seqlock", copy / "seqlock")  # the writer acknowledged version 6
        with WriteAheadLog(copy / WAL_DIR, Durability.OS) as wal:
            for version, payload in logged:
                wal.append(version, payload if fmt == 2 else payload[PREFIX_SIZE:])
        with LiveTable.open(copy, config=FAST) as recovered:
            twins[fmt] = _state(recovered)
    with LiveTable.open(path, config=FAST) as recovered:
        assert _state(recovered) == twins[1] == twins[2]
    assert twins[1][0] == 6 and twins[1][2][("t", SMALL_LAYOUT.layer_ids[0])][0] == 6


def test_a_replica_applies_format_1_records_of_an_earlier_primary(tmp_path: Path) -> None:
    pristine = create_table(tmp_path / "pristine", TRAINABLE)
    replica_path = shutil.copytree(pristine, tmp_path / "replica")
    with LiveTable.open(pristine, config=FAST) as primary:
        _push_all(primary, 4)
        records = primary.records_after(0, 1 << 30, 0)
        with LiveTable.open(replica_path, config=FAST, primary="127.0.0.1:1") as replica:
            for record in records:
                replica.apply_replicated(record.version, record.payload[PREFIX_SIZE:])
            assert _state(replica) == _state(primary)
