"""Fuzzing a live trainable daemon: every bad request gets a precise status code and changes nothing.

Each test serves a small trainable table with a real daemon on loopback (`create_server` over a
`LiveTable`, never a mock) and sends what a broken or hostile client might: random bytes as
messages, ids of the wrong byte length, negative, huge or past the layer, unknown layers, batches
over the row limit, NaN/Inf and overflowing gradients, bad lr_scale values, odd snapshot names and
follower requests, streams cut short and clients that vanish mid-call.

A reference model (`Fuzzed`, in tests/fuzzing.py with the strategies) predicts every call from the
request alone: the status codes it may get (with the words its message must contain) or, for a
valid call, exactly what it answers and, for a valid push, the bytes it writes (the optimizer
applied to the rows the model holds). After every case the table directory must hold exactly the
predicted bytes (rows, optimizer state, sequence word, write-ahead log: a rejected call writes
nothing at all), the daemon must report the predicted version and still answer a lookup correctly.
When a test ends, the write-ahead log it left is replayed onto the table as created and must
rebuild the very same files.

`MEMSTORE_FUZZ_EXAMPLES` sets the examples per property test (default 40: the file runs in about
30 s on 2 cores); the cases run are printed when the module ends, e.g.

    MEMSTORE_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from memstore.dtypes import DType
from memstore.tabledir.manifest import Manifest
from memstore.wire import memstore_pb2 as pb
from tests.fuzzing import (
    ADAM_F32,
    ANSWERS,
    BIG_BATCH,
    CANCELLED,
    CASES,
    CONFIG,
    DE,
    DIM,
    EXAMPLES,
    FP,
    FUZZ,
    FUZZ_SLOW,
    IA,
    KINDS,
    LAYERS,
    LAYOUT,
    MAX_ROWS,
    MEMSTORE,
    NUM_ROWS,
    OK,
    PATHS,
    RE,
    REQUEST_TYPES,
    SNAPSHOT_NAMES,
    UNPARSEABLE,
    Fuzzed,
    count,
    follow_requests,
    lookup_requests,
    path_of,
    push_requests,
    raw_messages,
)


@pytest.fixture(scope="module", autouse=True)
def case_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the cases run by this module when it ends (on the terminal, with or without -s)."""
    start = time.monotonic()
    yield
    lines = [
        f"memstore fuzz: {sum(CASES.values())} cases in {time.monotonic() - start:.1f} s "
        f"(MEMSTORE_FUZZ_EXAMPLES={EXAMPLES}); unparseable raw messages: {sum(UNPARSEABLE.values())}",
        *(f"  {count:7d}  {name}" for name, count in sorted(CASES.items())),
        "  status codes of the checked calls: " + ", ".join(f"{code} {n}" for code, n in ANSWERS.most_common()),
    ]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        for line in lines:
            if reporter is not None:
                reporter.write_line(line)
            else:
                print(line)


@pytest.fixture
def fuzzed(request: pytest.FixtureRequest, tmp_path: Path, daemon_factory) -> Iterator[Fuzzed]:
    """A trainable table (Adam, float32 unless parametrized with a Kind) served on loopback, and its model.

    After the test: the daemon still serves what the model holds, and the log replays to it.
    """
    fz = Fuzzed(tmp_path, getattr(request, "param", ADAM_F32), daemon_factory)
    try:
        yield fz
        fz.assert_unchanged()
        fz.assert_replays()
    finally:
        fz.close()


# -- 1. random bytes as messages ------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=[path.rsplit("/", 1)[1] for path in PATHS])
def test_random_bytes_as_any_request_get_a_precise_status_and_change_nothing(fuzzed, request, path) -> None:
    @FUZZ
    @given(data=raw_messages(path, fuzzed))
    def case(data: bytes) -> None:
        count(request)
        fuzzed.check(path, data)

    case()


def test_an_unknown_method_is_unimplemented(fuzzed, request) -> None:
    count(request)
    reply = fuzzed.call(f"/{MEMSTORE.full_name}/Drop", b"\x08\x01")
    assert reply.code is grpc.StatusCode.UNIMPLEMENTED
    fuzzed.assert_unchanged()


@pytest.mark.parametrize("method", [method.name for method in MEMSTORE.methods])
def test_unparseable_messages_get_invalid_argument(fuzzed, method) -> None:
    for data in [
        b"\xff",
        b"\x0a\x05ab",
        b"\x12\xff\xff\xff\xff\x0f",
        b"\x0b",
    ]:  # bad tag, short field, huge length, group
        with pytest.raises(DecodeError):
            REQUEST_TYPES[path_of(method)].FromString(data)
        reply = fuzzed.call(path_of(method), data, max_messages=1)
        assert reply.code is IA, f"{method} with unparseable {data!r}: {reply.code.name} {reply.details!r}"
    fuzzed.assert_unchanged()


def test_a_request_over_the_message_limit_is_resource_exhausted(fuzzed, request) -> None:
    count(request)
    limit = dict(CONFIG.grpc_options())["grpc.max_receive_message_length"]
    ids = np.zeros(limit // 8 + 1, dtype="<i8")
    for method in ("Lookup", "Push"):
        message = pb.LookupRequest if method == "Lookup" else pb.PushRequest
        reply = fuzzed.call(path_of(method), message(layer_id=1, row_ids=ids.tobytes()).SerializeToString())
        assert reply.code is RE, reply
    fuzzed.assert_unchanged()


# -- 2. well-formed requests with bad contents ----------------------------------------------------


@FUZZ
@given(lookup=lookup_requests())
def test_lookups_with_bad_ids_layers_or_sizes_get_precise_codes(fuzzed, request, lookup) -> None:
    count(request)
    fuzzed.check(path_of("Lookup"), lookup.SerializeToString())


@pytest.mark.parametrize("fuzzed", KINDS, ids=str, indirect=True)
@FUZZ
@given(push=push_requests())
def test_pushes_are_applied_exactly_or_rejected_changing_nothing(fuzzed, request, push) -> None:
    count(request)
    fuzzed.check(path_of("Push"), push.SerializeToString())


@st.composite
def non_finite_pushes(draw: Callable) -> pb.PushRequest:
    """Otherwise valid pushes with at least one NaN, +Inf or -Inf among their gradients."""
    layer = draw(st.sampled_from(LAYERS))
    size = draw(st.integers(1, MAX_ROWS))
    ids = draw(arrays(np.int64, size, elements=st.integers(0, NUM_ROWS[layer] - 1), unique=True))
    grads = draw(arrays(np.float32, (size, DIM), elements=st.floats(width=32)))
    for _ in range(draw(st.integers(1, 3))):
        grads.flat[draw(st.integers(0, grads.size - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    request = pb.PushRequest(layer_id=layer, row_ids=ids.astype("<i8").tobytes(), grads=grads.tobytes())
    if draw(st.booleans()):
        request.lr_scale = draw(st.floats(0.05, 20))
    return request


@pytest.mark.parametrize("fuzzed", KINDS, ids=str, indirect=True)
@FUZZ
@given(push=non_finite_pushes())
def test_nan_and_inf_gradients_are_rejected_and_never_applied(fuzzed, request, push) -> None:
    count(request)
    expect = fuzzed.expect_push(push)
    assert expect.ok is None and expect.errors == [(IA, "not finite|overflows float32")]
    reply = fuzzed.check(path_of("Push"), push.SerializeToString())
    assert "not finite" in reply.details and "nothing changed" in reply.details


# Finite gradients (or learning rates) whose update overflows: rejected, nothing written.
OVERFLOWS = [
    (ADAM_F32, 1e20, None, "state 'exp_avg_sq'"),  # g*g = 1e40
    (ADAM_F32, 3e38, None, "state 'exp_avg_sq'"),
    (KINDS[1], 2e19, None, "state 'sum'"),  # adagrad
    (KINDS[3], -2e19, None, "state 'sum'"),  # rowwise adagrad
    (KINDS[2], 1e7, None, "float16 storage"),  # sgd: 0.01 * 1e7 past float16's 65504
    (KINDS[2], 1.0, 1e38, "rows"),  # sgd: lr 1e36 * g 1e3 (below) past float32
    (KINDS[1], 1.0, 3.4e39, "bfloat16 storage"),  # adagrad: g/std = 1, lr 3.4e38 rounds past bfloat16's max
]


@pytest.mark.parametrize(
    ("fuzzed", "grad", "lr_scale", "where"),
    OVERFLOWS,
    ids=[f"{k}-{g:g}-{s}" for k, g, s, _ in OVERFLOWS],
    indirect=["fuzzed"],
)
def test_finite_gradients_that_overflow_the_update_are_rejected_and_change_nothing(
    fuzzed, request, grad: float, lr_scale: float | None, where: str
) -> None:
    count(request)
    ids = np.array([3, 17, 40], dtype="<i8")
    grads = np.full((3, DIM), grad, dtype=np.float32)
    grads[1] = 0.5  # a harmless row in the same push is not applied either
    if lr_scale is not None:
        grads[0] = 1e3
    push = pb.PushRequest(layer_id=1, row_ids=ids.tobytes(), grads=grads.tobytes())
    if lr_scale is not None:
        push.lr_scale = lr_scale
    reply = fuzzed.check(path_of("Push"), push.SerializeToString())
    assert reply.code is IA and re.search(where, reply.details) and "nothing changed" in reply.details, reply
    # A valid push afterwards is applied as if the rejected one never came (Adam's step count included).
    good = pb.PushRequest(layer_id=1, row_ids=ids.tobytes(), grads=np.ones((3, DIM), np.float32).tobytes())
    assert fuzzed.check(path_of("Push"), good.SerializeToString()).code is OK
    assert fuzzed.version == 1 and fuzzed.layer_steps[1] == 1


def test_a_client_id_longer_than_the_log_can_hold_is_rejected(fuzzed, request) -> None:
    count(request)
    # 65537 bytes: the log record's 16-bit length would cut it inside an "é", and the record could
    # never be decoded again (recovery, snapshots and replicas would fail on it).
    ids = np.array([1, 2], dtype="<i8")
    grads = np.ones((2, DIM), np.float32).tobytes()
    long_id = pb.PushRequest(layer_id=1, row_ids=ids.tobytes(), grads=grads, step_id=1, client_id="é" * 32768 + "x")
    assert fuzzed.check(path_of("Push"), long_id.SerializeToString()).code is IA
    longest = pb.PushRequest(layer_id=1, row_ids=ids.tobytes(), grads=grads, step_id=1, client_id="é" * 32767 + "x")
    assert fuzzed.check(path_of("Push"), longest.SerializeToString()).code is OK  # replayed at teardown


@FUZZ
@given(name=SNAPSHOT_NAMES)
def test_snapshot_names_are_checked_and_valid_ones_copy_the_table(fuzzed, request, name) -> None:
    count(request)
    fuzzed.check(path_of("Snapshot"), pb.SnapshotRequest(name=name).SerializeToString())


@FUZZ
@given(data=st.data())
def test_follow_requests_are_checked_and_valid_ones_stream_the_log(fuzzed, request, data) -> None:
    count(request)
    if data.draw(st.booleans(), label="push first"):  # something to stream
        ids = np.array([data.draw(st.integers(0, 20), label="row")], dtype="<i8")
        push = pb.PushRequest(layer_id=1, row_ids=ids.tobytes(), grads=np.ones((1, DIM), np.float32).tobytes())
        fuzzed.check(path_of("Push"), push.SerializeToString())
    follow = data.draw(follow_requests(fuzzed.manifest.to_json()), label="follow")
    fuzzed.check(path_of("Follow"), follow.SerializeToString())


def _manifest_with_layout(layout: object) -> str:
    data = json.loads(Manifest(layout=LAYOUT, dtype=DType.FLOAT32, seed=3, optimizer=ADAM_F32.optimizer).to_json())
    data["layout"] = layout
    return json.dumps(data)


@pytest.mark.parametrize(
    ("manifest_json", "code"),
    [(_manifest_with_layout(""), FP), (_manifest_with_layout(["dim"]), FP), ("[" * 100_000, IA)],
    ids=["layout-string", "layout-list", "deeply-nested"],
)
def test_a_malformed_follower_manifest_is_refused_and_changes_nothing(fuzzed, manifest_json: str, code) -> None:
    """Another table's layout, however malformed, is FAILED_PRECONDITION (it cannot follow this one);
    bytes that are not a JSON object at all are the caller's INVALID_ARGUMENT."""
    follow = pb.FollowRequest(manifest_json=manifest_json, heartbeat_s=0.05)
    reply = fuzzed.call(path_of("Follow"), follow.SerializeToString(), max_messages=1)
    fuzzed.assert_unchanged()
    assert reply.code is code, f"{reply.code.name} {reply.details!r}"


# -- 4. streams cut short and clients that vanish ---------------------------------------------------


def _big_lookup(layer: int = 4) -> tuple[np.ndarray, bytes]:
    ids = np.random.default_rng(0).integers(0, NUM_ROWS[layer], BIG_BATCH).astype("<i8")
    return ids, pb.LookupRequest(layer_id=layer, row_ids=ids.tobytes()).SerializeToString()


@FUZZ_SLOW
@given(read=st.integers(1, 40), how=st.sampled_from(["cancel", "close channel", "deadline"]))
def test_a_lookup_stream_cut_short_leaves_the_daemon_serving_and_the_table_unchanged(
    fuzzed, request, read: int, how: str
) -> None:
    count(request)
    ids, data = _big_lookup()
    channel = grpc.insecure_channel(fuzzed.stream_daemon.address)
    try:
        stream = channel.unary_stream(path_of("Lookup"))(data, timeout=0.3 if how == "deadline" else 30)
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for message in stream:
                got.append(pb.LookupResponse.FromString(message))
                if len(got) == read and how == "cancel":
                    stream.cancel()
                elif len(got) == read and how == "close channel":
                    channel.close()
                elif how == "deadline":
                    time.sleep(0.01)  # a slow reader: the deadline passes mid-stream
        assert info.value.code() in (CANCELLED, DE), info.value
        rows = b"".join(message.rows for message in got)
        assert rows == fuzzed.rows(4)[ids[: len(rows) // (4 * DIM)]].tobytes()  # what came is right
    finally:
        channel.close()
    fuzzed.assert_unchanged()


@FUZZ_SLOW
@given(timeout=st.sampled_from([0.0, 1e-5, 1e-4, 5e-4, 1e-3, 3e-3]), retry=st.booleans(), row=st.integers(0, 200))
def test_a_push_cut_off_by_its_deadline_is_applied_once_or_not_at_all(fuzzed, request, timeout, retry, row) -> None:
    count(request)
    client = f"deadline-{row}"
    step = fuzzed.version + 1  # increasing per client and layer
    ids = np.array([row, row + 1], dtype="<i8")
    push = pb.PushRequest(
        layer_id=1,
        row_ids=ids.tobytes(),
        grads=np.full((2, DIM), 0.25, np.float32).tobytes(),
        step_id=step if retry else 0,
        client_id=client,
    )
    adopt = fuzzed.predict_push(push)
    before = fuzzed.version
    try:
        ack = pb.PushResponse.FromString(
            fuzzed.channel.unary_unary(path_of("Push"))(push.SerializeToString(), timeout=timeout)
        )
    except grpc.RpcError as exc:
        assert exc.code() is DE, exc
        ack = None
    if retry:  # the same step again, with time to spare: applied exactly once in all
        ack = pb.PushResponse.FromString(
            fuzzed.channel.unary_unary(path_of("Push"))(push.SerializeToString(), timeout=20)
        )
    else:
        ack = ack or _settled_ack(fuzzed, before, push.layer_id)
    if ack is not None:
        assert ack.version == before + 1
        adopt(ack)
    fuzzed.assert_unchanged()


def _settled_ack(fuzzed: Fuzzed, before: int, layer: int) -> pb.PushResponse | None:
    """The ack a push that lost its caller would have had, once it landed (None: it never did)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if fuzzed.live.version > before:
            return pb.PushResponse(version=fuzzed.live.version, layer_step=fuzzed.live.layer_steps[layer])
        time.sleep(0.01)
    return None


def test_a_cancelled_push_is_applied_fully_or_not_at_all(fuzzed, request) -> None:
    for row in range(0, 60, 3):
        count(request)
        ids = np.array([row, row + 1], dtype="<i8")
        push = pb.PushRequest(layer_id=4, row_ids=ids.tobytes(), grads=np.full((2, DIM), -1.5, np.float32).tobytes())
        adopt = fuzzed.predict_push(push)
        before = fuzzed.version
        future = fuzzed.channel.unary_unary(path_of("Push")).future(push.SerializeToString(), timeout=20)
        if row % 2:
            time.sleep(0.0005 * row)
        future.cancel()
        ack = _settled_ack(fuzzed, before, push.layer_id)
        if ack is not None:
            adopt(ack)
        fuzzed.assert_unchanged()


_CHILD = """
import sys, time, grpc
address, path, request_file = sys.argv[1:4]
data = open(request_file, "rb").read()
channel = grpc.insecure_channel(address)
if path.endswith("/Lookup"):
    stream = channel.unary_stream(path)(data, timeout=60)
    next(stream)  # the daemon is mid-stream now; stop reading and wait to be killed
    print("streaming", flush=True)
else:
    future = channel.unary_unary(path).future(data, timeout=60)
    print("sent", flush=True)
time.sleep(60)
"""


def _run_and_kill(fuzzed: Fuzzed, path: str, data: bytes, delay_s: float) -> None:
    """A client process that starts `path` with `data` and is SIGKILLed mid-call."""
    request_file = fuzzed.root / "request.bin"
    request_file.write_bytes(data)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, fuzzed.stream_daemon.address, path, str(request_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(child.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert line and line[0].strip() in ("streaming", "sent"), f"the client never started: {line}"
        time.sleep(delay_s)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()


def test_a_client_process_killed_mid_lookup_or_mid_push_leaves_the_daemon_serving(fuzzed, request) -> None:
    _, lookup = _big_lookup()
    for attempt in range(3):
        count(request)
        _run_and_kill(fuzzed, path_of("Lookup"), lookup, delay_s=0.05 * attempt)
        fuzzed.assert_unchanged()
        ids = np.arange(10 * attempt, 10 * attempt + 8, dtype="<i8")
        push = pb.PushRequest(layer_id=1, row_ids=ids.tobytes(), grads=np.full((8, DIM), 2.0, np.float32).tobytes())
        adopt = fuzzed.predict_push(push)
        before = fuzzed.version
        count(request)
        _run_and_kill(fuzzed, path_of("Push"), push.SerializeToString(), delay_s=[0.0, 0.001, 0.2][attempt])
        ack = _settled_ack(fuzzed, before, push.layer_id)
        if ack is not None:
            adopt(ack)
        fuzzed.assert_unchanged()


def test_followers_that_vanish_give_their_slots_back(fuzzed, request) -> None:
    follow = pb.FollowRequest(
        manifest_json=fuzzed.manifest.to_json(), heartbeat_s=0.05, follower_id="f"
    ).SerializeToString()
    limit = CONFIG.max_followers
    for how in ("cancel", "close channel"):
        count(request)
        channels = [grpc.insecure_channel(fuzzed.daemon.address) for _ in range(limit)]
        streams = [channel.unary_stream(path_of("Follow"))(follow, timeout=30) for channel in channels]
        for stream in streams:
            assert pb.FollowResponse.FromString(next(stream)).primary_version == fuzzed.version
        extra = fuzzed.call(path_of("Follow"), follow, max_messages=1)
        assert extra.code is RE and "already streams" in extra.details, extra
        for stream, channel in zip(streams, channels):
            stream.cancel() if how == "cancel" else channel.close()
        for channel in channels:
            channel.close()
        # The daemon notices each vanished follower and frees its slot.
        deadline = time.monotonic() + 10
        while (reply := fuzzed.call(path_of("Follow"), follow, max_messages=1)).code is RE:
            assert time.monotonic() < deadline, "slots of vanished followers were never given back"
            time.sleep(0.05)
        assert reply.code is OK, reply
    fuzzed.assert_unchanged()
