"""The model and strategies of tests/test_fuzz.py: a small trainable table served on loopback,
a reference model (`Fuzzed`) that predicts every call's answer and the exact bytes it leaves in the
table directory, and hypothesis strategies for well-formed, broken and hostile requests."""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from memstore.create import create_table
from memstore.daemon_config import ServerConfig
from memstore.dataplane.tickets import TICKET_BYTES
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, MemstoreError
from memstore.layout import EngramLayout
from memstore.live import LiveConfig, LiveTable
from memstore.optim import apply_update
from memstore.replica import manifest_differences
from memstore.service import MAX_REPLICA_ID_CHARS, SERVICE_NAME
from memstore.tabledir.manifest import CHECKSUMS_KEY, Manifest
from memstore.tabledir.names import SUMS_SUFFIX
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.tabledir.sums import BLOCK_ROWS, row_checksums
from memstore.wal import Durability
from memstore.wire import memstore_pb2 as pb

EXAMPLES = int(os.environ.get("MEMSTORE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: CI is reproducible
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one daemon per test, its model carried across examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# Cases that each stream a 3.2 MB response or wait for a push that may never land: a quarter as many.
FUZZ_SLOW = settings(FUZZ, max_examples=max(4, EXAMPLES // 4))

# A few hundred rows per layer: every check can read the whole table directory.
LAYOUT = EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(50, 70), max_ngram=3, heads_per_ngram=2, dim=8)
LAYERS = LAYOUT.layer_ids
DIM = LAYOUT.dim
NUM_ROWS = {layer: LAYOUT.num_rows(layer) for layer in LAYERS}
MAX_ROWS = 16  # the daemon's max_rows_per_request: oversized batches stay cheap
# Lookups stream 2 float32 rows a message, so even small batches span several messages.
CONFIG = ServerConfig(max_rows_per_request=MAX_ROWS, chunk_bytes=64, follow_heartbeat_s=0.05)
# A second daemon on the same table for the streams cut short: big batches, small messages, and a
# flow-control window far below one response, so a reader that stops leaves the daemon mid-call.
STREAM_CONFIG = ServerConfig(max_rows_per_request=1 << 17, chunk_bytes=256, window_bytes=64 << 10)
BIG_BATCH = 100_000  # rows of a lookup to the stream daemon: 3.2 MB in 12,500 messages

UNKNOWN_LAYERS = [0, 2, 3, 5, 1 << 31, (1 << 32) - 1]
EXTREME_IDS = [-1, -(1 << 62), -(1 << 63), 1 << 62, (1 << 63) - 1]
# Finite float32 gradients that overflow somewhere: g*g (Adagrad sums, Adam's second moment),
# lr*g, or a 16-bit storage type.
HUGE_GRADS = [3e38, -3.4e38, 1e20, -1e19, 1e10, 7e4]
LR_SCALES = [0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 5e-324, 1e-320, 1e-30, 1e30, 1e40, 1e300]

OK = grpc.StatusCode.OK
IA = grpc.StatusCode.INVALID_ARGUMENT
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
FP = grpc.StatusCode.FAILED_PRECONDITION
DE = grpc.StatusCode.DEADLINE_EXCEEDED
CANCELLED = grpc.StatusCode.CANCELLED

MEMSTORE = pb.DESCRIPTOR.services_by_name["Memstore"]
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# Every RPC of the contract, by full path (a method added to the proto is fuzzed too), and the
# daemon's health check.
PATHS = [f"/{MEMSTORE.full_name}/{method.name}" for method in MEMSTORE.methods] + [HEALTH_CHECK]
REQUEST_TYPES: dict[str, type] = {
    f"/{MEMSTORE.full_name}/{method.name}": getattr(pb, method.input_type.name) for method in MEMSTORE.methods
}
REQUEST_TYPES[HEALTH_CHECK] = health_pb2.HealthCheckRequest
STREAMING = {f"/{MEMSTORE.full_name}/{method.name}" for method in MEMSTORE.methods if method.server_streaming}


@dataclass(frozen=True)
class Kind:
    """A trainable table: its optimizer and storage dtype."""

    optimizer: OptimizerConfig
    dtype: DType

    def __str__(self) -> str:
        return f"{self.optimizer.kind.value}-{self.dtype.value}"


ADAM_F32 = Kind(OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.05), DType.FLOAT32)
KINDS = [
    ADAM_F32,
    Kind(OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1), DType.BFLOAT16),
    Kind(OptimizerConfig(kind=OptimizerKind.SGD, lr=0.01), DType.FLOAT16),  # lr*g past 65504 at g ~ 7e6
    Kind(OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1), DType.FLOAT32),
]

# -- counting the cases -------------------------------------------------------------------------

CASES: collections.Counter[str] = collections.Counter()
UNPARSEABLE: collections.Counter[str] = collections.Counter()  # raw messages that do not parse, per RPC
ANSWERS: collections.Counter[str] = collections.Counter()  # status codes of the checked calls


def count(request: pytest.FixtureRequest) -> None:
    """Count one case of the running test (a hypothesis example, or one round of a fixed test)."""
    CASES[request.node.name] += 1


# -- the daemon and its model -------------------------------------------------------------------


@dataclass
class Reply:
    """How a call ended: its status, details and the raw response messages received."""

    code: grpc.StatusCode
    details: str
    messages: list[bytes]


@dataclass
class Expect:
    """What a call may get: failures (a code and a pattern its details must match) and, when OK is
    acceptable, the check of the response messages (which also moves the model forward)."""

    errors: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    ok: Callable[[list[bytes]], None] | None = None


def _predict_sums(files: dict[str, bytes], store: str, ids: np.ndarray, rows: np.ndarray, version: int) -> None:
    """The store's checksum sidecar after a push wrote `rows` at `ids` (memstore.integrity's format: a
    64-byte header, a u32 checksum per row padded to 8 bytes, a u64 version per block of rows)."""
    name = store + SUMS_SUFFIX
    data = bytearray(files[name])
    num_rows = int.from_bytes(data[16:24], "little")
    sums = np.frombuffer(data, dtype="<u4", count=num_rows, offset=64)
    versions = np.frombuffer(data, dtype="<u8", offset=64 + -(-4 * num_rows // 8) * 8)
    sums[ids] = row_checksums(np.ascontiguousarray(rows))
    versions[ids // BLOCK_ROWS] = np.maximum(versions[ids // BLOCK_ROWS], version)
    files[name] = bytes(data)


class Fuzzed:
    """A trainable table served on loopback, a channel to it, and the model of what it holds."""

    def __init__(self, root: Path, kind: Kind, daemon_factory: Callable) -> None:
        manifest = Manifest(layout=LAYOUT, dtype=kind.dtype, seed=3, optimizer=kind.optimizer)
        path = create_table(root / "table", manifest)
        self.pristine = shutil.copytree(path, root / "pristine")  # the table as created, for the replay check
        # No checkpoint while a test runs: the log keeps every push, from version 0.
        self.live = LiveTable.open(path, config=LiveConfig(durability=Durability.OS, checkpoint_every=0))
        self.manifest = self.live.manifest
        self.root = root
        self.snapshot_dir = root / "snapshots"
        self.daemon = daemon_factory(self.live, replace(CONFIG, snapshot_dir=self.snapshot_dir))
        self._daemon_factory = daemon_factory
        self._stream_daemon = None
        self.channel = grpc.insecure_channel(self.daemon.address, options=[("grpc.max_receive_message_length", -1)])
        self.expected = self.disk()  # the bytes every file of the table directory must hold
        self.version = 0
        self.layer_steps = {layer: 0 for layer in LAYERS}
        self.acks: dict[tuple[str, int], tuple[int, pb.PushResponse]] = {}  # (client, layer) -> last step, its ack

    @property
    def stream_daemon(self):
        """A second daemon on the same LiveTable with STREAM_CONFIG (started on first use)."""
        if self._stream_daemon is None:
            self._stream_daemon = self._daemon_factory(
                self.live, replace(STREAM_CONFIG, snapshot_dir=self.snapshot_dir)
            )
        return self._stream_daemon

    # -- what is on disk --

    def disk(self) -> dict[str, bytes]:
        """Every file of the table directory (write-ahead log included) by relative path."""
        path = self.live.path
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

    def rows(self, layer: int) -> np.ndarray:
        """The rows of a layer as the model holds them (storage dtype, [num_rows, stored width])."""
        dtype = self.manifest.dtype
        data = self.expected[self.manifest.layer_file(layer)]
        return np.frombuffer(data, dtype=dtype.numpy).reshape(NUM_ROWS[layer], dtype.stored_width(DIM))

    def state(self, layer: int) -> dict[str, np.ndarray]:
        """The optimizer state of a layer as the model holds it: slot -> float32 [num_rows, width]."""
        return {
            slot: np.frombuffer(self.expected[name], dtype="<f4").reshape(NUM_ROWS[layer], width)
            for slot, (name, width) in self.manifest.state_files(layer).items()
        }

    def assert_unchanged(self) -> None:
        """The directory holds the model's bytes, the daemon its version, and it answers a lookup."""
        got = self.disk()
        changed = sorted(name for name in got.keys() | self.expected.keys() if got.get(name) != self.expected.get(name))
        assert not changed, f"files changed by calls that should not have changed them: {changed}"
        assert self.live.version == self.version and self.live.layer_steps == self.layer_steps
        self.assert_serving()

    def assert_serving(self) -> None:
        """Describe reports the model's version and a valid lookup returns the model's rows."""
        describe = self.call(f"/{MEMSTORE.full_name}/Describe", b"")
        assert describe.code is OK, describe
        assert pb.DescribeResponse.FromString(describe.messages[0]).version == self.version
        for layer in LAYERS:
            ids = np.array([0, 5, NUM_ROWS[layer] - 1, 5], dtype="<i8")
            request = pb.LookupRequest(layer_id=layer, row_ids=ids.tobytes()).SerializeToString()
            reply = self.call(f"/{MEMSTORE.full_name}/Lookup", request)
            assert reply.code is OK, reply
            self._check_lookup(reply.messages, layer, ids)

    # -- calls --

    def call(self, path: str, data: bytes, timeout: float = 20.0, max_messages: int | None = None) -> Reply:
        """One call with `data` as the raw request (identity serializers: bytes in, bytes out)."""
        if path not in STREAMING:
            try:
                return Reply(OK, "", [self.channel.unary_unary(path)(data, timeout=timeout)])
            except grpc.RpcError as exc:
                return Reply(exc.code(), exc.details() or "", [])
        stream = self.channel.unary_stream(path)(data, timeout=timeout)
        messages: list[bytes] = []
        try:
            for message in stream:
                messages.append(message)
                if max_messages is not None and len(messages) >= max_messages:
                    stream.cancel()  # a Follow stream never ends on its own
                    return Reply(OK, "", messages)
        except grpc.RpcError as exc:
            return Reply(exc.code(), exc.details() or "", messages)
        return Reply(OK, "", messages)

    def check(self, path: str, data: bytes) -> Reply:
        """Send raw `data` to `path`; the reply must be one the model allows, and nothing else changes."""
        expect = self.expect(path, data)
        never_ends = path.endswith(("/Follow", "/WatchRows"))  # streams that never end on their own
        reply = self.call(path, data, max_messages=1 if never_ends else None)
        ANSWERS[reply.code.name] += 1
        if reply.code is OK:
            assert expect.ok is not None, f"{path} accepted {data[:200]!r}; expected one of {expect.errors}"
            expect.ok(reply.messages)
        else:
            assert not reply.messages or path.endswith("/Follow"), f"{path} sent data before failing: {reply}"
            assert any(reply.code == code and re.search(pattern, reply.details) for code, pattern in expect.errors), (
                f"{path} with {data[:200]!r} got {reply.code.name} {reply.details!r}; expected {expect}"
            )
        self.assert_unchanged()
        return reply

    # -- the model: what each request must get --

    def expect(self, path: str, data: bytes) -> Expect:
        request_type = REQUEST_TYPES[path]
        try:
            request = request_type.FromString(data)
        except DecodeError:
            UNPARSEABLE[path] += 1
            return Expect([(IA, "is not a valid")])
        method = path.rsplit("/", 1)[1]
        if path == HEALTH_CHECK:
            return self.expect_health(request)
        model = getattr(self, f"expect_{method.lower()}", None)
        if model is not None:
            return model(request)
        if not request_type.DESCRIPTOR.fields:  # an RPC added later, taking no arguments (Stats)
            return Expect(ok=lambda messages: None)
        raise AssertionError(f"no model for {path}: add one to Fuzzed")

    def expect_health(self, request: health_pb2.HealthCheckRequest) -> Expect:
        if request.service not in ("", SERVICE_NAME):
            return Expect([(grpc.StatusCode.NOT_FOUND, "")])  # gRPC's health servicer sends no details

        def ok(messages: list[bytes]) -> None:
            status = health_pb2.HealthCheckResponse.FromString(messages[0]).status
            assert status == health_pb2.HealthCheckResponse.SERVING

        return Expect(ok=ok)

    def expect_describe(self, request: pb.DescribeRequest) -> Expect:
        def ok(messages: list[bytes]) -> None:
            response = pb.DescribeResponse.FromString(messages[0])
            assert response.version == self.version and response.trainable
            assert Manifest.from_json(response.manifest_json) == self.manifest
            assert response.limits.max_rows_per_request == MAX_ROWS

        return Expect(ok=ok)

    def expect_lookup(self, request: pb.LookupRequest) -> Expect:
        errors = []
        ids = None
        if len(request.row_ids) % 8:
            errors.append((IA, "not a multiple of 8"))
        else:
            ids = np.frombuffer(request.row_ids, dtype="<i8")
            if len(ids) > MAX_ROWS:
                errors.append((RE, f"at most {MAX_ROWS}"))
        if request.layer_id not in LAYERS:
            errors.append((IA, f"unknown Engram layer {request.layer_id}"))
        elif ids is not None and len(ids) and not (ids.min() >= 0 and ids.max() < NUM_ROWS[request.layer_id]):
            errors.append((IA, "out of range"))
        if errors:
            return Expect(errors)
        return Expect(ok=lambda messages: self._check_lookup(messages, request.layer_id, ids))

    def _check_lookup(self, messages: list[bytes], layer: int, ids: np.ndarray) -> None:
        """The messages of a Lookup carry exactly the model's rows of `ids`, in order, in chunks."""
        dtype = self.manifest.dtype
        decoded = [pb.LookupResponse.FromString(message) for message in messages]
        assert decoded, "a Lookup answered no message at all"
        offset = 0
        for message in decoded:
            assert (message.dtype, message.dim, message.num_rows) == (dtype.wire, DIM, len(ids))
            assert message.row_offset == offset and message.version == self.version
            assert len(message.rows) <= max(CONFIG.chunk_bytes, dtype.row_bytes(DIM))
            offset += len(message.rows) // dtype.row_bytes(DIM)
        assert offset == len(ids)
        rows = b"".join(message.rows for message in decoded)
        assert rows == self.rows(layer)[ids].tobytes(), f"layer {layer}: the rows served differ from the table's"

    def expect_push(self, request: pb.PushRequest) -> Expect:
        errors = []
        layer, ids, grads = request.layer_id, None, None
        if len(request.row_ids) % 8:
            errors.append((IA, "not a multiple of 8"))
        else:
            ids = np.frombuffer(request.row_ids, dtype="<i8")
            if len(ids) > MAX_ROWS:
                errors.append((RE, f"at most {MAX_ROWS}"))
            if len(request.grads) != len(ids) * DIM * 4:
                errors.append((IA, f"grads holds {len(request.grads)} bytes"))
            else:
                grads = np.frombuffer(request.grads, dtype="<f4").reshape(len(ids), DIM)
        if layer not in LAYERS:
            errors.append((IA, f"unknown Engram layer {layer}"))
        elif ids is not None and len(ids):
            if not (ids.min() >= 0 and ids.max() < NUM_ROWS[layer]):
                errors.append((IA, "out of range"))
            elif len(np.unique(ids)) != len(ids):
                errors.append((IA, "must be distinct"))
        optimizer = self.manifest.optimizer
        if request.HasField("lr_scale") and request.lr_scale != 1.0:
            scale = request.lr_scale
            if not (math.isfinite(scale) and scale > 0):
                errors.append((IA, "lr_scale must be a positive finite number"))
            else:
                try:
                    optimizer = replace(optimizer, lr=optimizer.lr * scale)
                except InvalidArgumentError:
                    errors.append((IA, "lr_scale .* is not a positive finite float32"))
        if len(request.client_id.encode()) > 65535:
            errors.append((IA, "client_id is .* bytes"))
        if errors or grads is None:
            assert errors
            return Expect(errors)
        repeat = self.acks.get((request.client_id, layer)) if request.step_id > 0 else None
        if repeat is not None and request.step_id <= repeat[0]:
            # A retried step: answered with its first ack, applied once. Even with NaN gradients.
            return Expect(ok=lambda messages: self._check_ack(messages, repeat[1]))
        step = self.layer_steps[layer] + 1
        dtype = self.manifest.dtype
        try:
            new_rows, new_state = apply_update(
                optimizer, dtype.to_float32(self.rows(layer)[ids]), _take(self.state(layer), ids), grads, step
            )
        except InvalidArgumentError:
            return Expect([(IA, "not finite|overflows float32")])
        assert np.isfinite(new_rows).all() and all(np.isfinite(v).all() for v in new_state.values())
        with np.errstate(over="ignore"):
            stored = dtype.from_float64(new_rows)
        if not np.isfinite(dtype.to_float32(stored)).all():
            return Expect([(IA, f"exceed the range of the table's {dtype.value} storage")])
        return Expect(ok=lambda messages: self._applied(messages, request, ids, stored, new_state, step))

    def _check_ack(self, messages: list[bytes], ack: pb.PushResponse) -> None:
        assert pb.PushResponse.FromString(messages[0]) == ack

    def _applied(
        self,
        messages: list[bytes],
        request: pb.PushRequest,
        ids: np.ndarray,
        stored: np.ndarray,
        new_state: dict[str, np.ndarray],
        step: int,
    ) -> None:
        """An accepted push: the ack, then the model's after-image in the files; the model moves on."""
        layer = request.layer_id
        ack = pb.PushResponse.FromString(messages[0])
        assert (ack.version, ack.layer_step) == (self.version + 1, step)
        self.expect_applied(layer, ids, stored, new_state, step, request.step_id, request.client_id, ack)

    def expect_applied(
        self,
        layer: int,
        ids: np.ndarray,
        stored: np.ndarray,
        new_state: dict[str, np.ndarray],
        step: int,
        step_id: int,
        client_id: str,
        ack: pb.PushResponse,
    ) -> None:
        """Check the files hold the push's after-image (and nothing else changed); adopt them."""
        predicted = dict(self.expected)
        rows = self.rows(layer).copy()
        rows[ids] = stored
        predicted[self.manifest.layer_file(layer)] = rows.tobytes()
        _predict_sums(predicted, self.manifest.layer_file(layer), ids, rows[ids], self.version + 1)
        for slot, values in self.state(layer).items():
            values = values.copy()
            values[ids] = new_state[slot]
            name = self.manifest.state_files(layer)[slot][0]
            predicted[name] = values.tobytes()
            _predict_sums(predicted, name, ids, values[ids], self.version + 1)
        predicted["seqlock"] = (2 * (self.version + 1)).to_bytes(8, "little")
        got = self.disk()
        logged = {name for name in got.keys() | predicted.keys() if name.startswith("wal/")}
        changed = sorted(
            name for name in (got.keys() | predicted.keys()) - logged if got.get(name) != predicted.get(name)
        )
        assert not changed, f"a push wrote other bytes than its after-image: {changed}"
        assert any(got.get(name) != self.expected.get(name) for name in logged), "an accepted push logged nothing"
        self.expected = got
        self.version += 1
        self.layer_steps[layer] = step
        if step_id > 0:
            self.acks[(client_id, layer)] = (step_id, ack)

    def predict_push(self, request: pb.PushRequest) -> Callable[[pb.PushResponse], None]:
        """For a push the model accepts: the function that adopts its effect once it is known applied."""
        expect = self.expect_push(request)
        assert expect.ok is not None and not expect.errors, f"not a valid push: {expect}"

        def adopt(ack: pb.PushResponse) -> None:
            expect.ok([ack.SerializeToString()])

        return adopt

    def expect_snapshot(self, request: pb.SnapshotRequest) -> Expect:
        name = request.name
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", name):  # no separators, dots, control characters
            return Expect([(IA, "a plain directory name of 1 to 100 characters, each a letter, a digit")])
        kept = sum(1 for p in self.snapshot_dir.glob("*") if not p.name.startswith("."))
        if kept >= CONFIG.max_snapshots:
            return Expect([(RE, "--max-snapshots")])
        if (self.snapshot_dir / name).exists():
            return Expect([(IA, "exists; snapshots never overwrite")])

        def ok(messages: list[bytes]) -> None:
            response = pb.SnapshotResponse.FromString(messages[0])
            dest = self.snapshot_dir / name
            assert response.version == self.version and response.path == str(dest.resolve())
            for file_name in [self.manifest.layer_file(layer) for layer in LAYERS] + [
                state for layer in LAYERS for state, _ in self.manifest.state_files(layer).values()
            ]:
                assert (dest / file_name).read_bytes() == self.expected[file_name], f"snapshot {file_name} differs"
            shutil.rmtree(dest)
            dest.mkdir()  # the name stays taken (and counts): a later request for it must get "exists"

        return Expect([], ok)

    def expect_follow(self, request: pb.FollowRequest) -> Expect:
        # The daemon compares the raw JSON fields with its own before it builds anything: junk is the
        # caller's INVALID_ARGUMENT, another layout is refused unparsed, only our layout is parsed.
        try:
            raw = json.loads(request.manifest_json)
        except (ValueError, RecursionError):
            return Expect([(IA, "not JSON")])
        if not isinstance(raw, dict):
            return Expect([(IA, "not a JSON object")])
        ours = json.loads(self.manifest.to_json())
        differing = {key for key in set(ours) | set(raw) if ours.get(key) != raw.get(key)}
        differing -= {"rows_sha256", CHECKSUMS_KEY}
        if "layout" in differing:
            return Expect([(FP, "cannot follow")])
        if differing:
            try:
                theirs = Manifest.from_json(request.manifest_json)
            except MemstoreError:
                return Expect([(FP, "manifest|table format|generator")])
            if manifest_differences(theirs, self.manifest):
                return Expect([(FP, "cannot follow")])
        heartbeat_s = request.heartbeat_s or CONFIG.follow_heartbeat_s
        if not 0.01 <= heartbeat_s <= 60:
            return Expect([(IA, "heartbeat_s must be in")])
        if request.from_version > self.version:
            return Expect([(FP, "past this table's version")])
        assert heartbeat_s < 10, "a valid Follow waits for its heartbeat: keep heartbeat_s small here"

        def ok(messages: list[bytes]) -> None:
            response = pb.FollowResponse.FromString(messages[0])
            assert response.primary_version == self.version
            versions = [record.version for record in response.records]
            start = request.from_version + 1
            assert versions == list(range(start, start + len(versions)))
            assert bool(versions) == (request.from_version < self.version)  # a heartbeat only when up to date
            self.await_no_followers()  # the stream was cancelled: its slot must come back

        return Expect(ok=ok)

    def expect_watchrows(self, request: pb.WatchRowsRequest) -> Expect:
        if set(request.layer_ids) - set(LAYERS):
            return Expect([(IA, "WatchRows asks for layers")])
        heartbeat_s = request.heartbeat_s or CONFIG.follow_heartbeat_s
        if not 0.01 <= heartbeat_s <= 60:
            return Expect([(IA, "heartbeat_s must be in")])
        if request.from_version > self.version:
            return Expect([(FP, "cannot catch up")])
        # Up to date, a valid watch answers after its heartbeat: past the call's deadline for the longest.
        errors = [(DE, "")] if request.from_version == self.version and heartbeat_s >= 10 else []

        def ok(messages: list[bytes]) -> None:
            response = pb.WatchRowsResponse.FromString(messages[0])
            assert response.table_version == self.version
            wanted = set(request.layer_ids) or set(LAYERS)
            versions = [change.version for change in response.changes]
            assert versions == sorted(versions) and all(change.layer_id in wanted for change in response.changes)
            assert all(request.from_version < v <= response.through_version for v in versions)
            # A heartbeat (through the watcher's own version) only when it is up to date.
            assert (response.through_version > request.from_version) == (request.from_version < self.version)

        return Expect(errors, ok=ok)

    def expect_confirmdurable(self, request: pb.ConfirmDurableRequest) -> Expect:
        if not request.replica_id or len(request.replica_id) > MAX_REPLICA_ID_CHARS:
            return Expect([(IA, "needs a replica_id")])
        if request.fingerprint != self.manifest.fingerprint:
            return Expect([(FP, "reports on a table of fingerprint")])
        if request.durable_version > self.version:
            return Expect([(FP, "past this daemon's version")])

        def ok(messages: list[bytes]) -> None:  # a report changes no row: only what pushes wait for
            assert pb.ConfirmDurableResponse.FromString(messages[0]).version == self.version

        return Expect(ok=ok)

    def expect_streamsnapshot(self, request: pb.StreamSnapshotRequest) -> Expect:
        # Any name and chunk size is served (the chunk size is clamped): the table as it is, header first.
        def ok(messages: list[bytes]) -> None:
            chunks = [pb.SnapshotChunk.FromString(message) for message in messages]
            assert chunks[0].WhichOneof("part") == "header"
            assert chunks[0].header.version == self.version
            assert chunks[0].header.fingerprint == self.manifest.fingerprint
            assert all(chunk.WhichOneof("part") != "header" for chunk in chunks[1:])
            self.await_no_followers()  # the stream ended: its follower slot must come back

        return Expect(ok=ok)

    def expect_opendataplane(self, request: pb.OpenDataPlaneRequest) -> Expect:
        def ok(messages: list[bytes]) -> None:  # a ticket for the data plane this daemon offers
            response = pb.OpenDataPlaneResponse.FromString(messages[0])
            assert len(response.ticket) == TICKET_BYTES and response.expires_in_s > 0

        return Expect(ok=ok)

    def await_no_followers(self, timeout_s: float = 10.0) -> None:
        """Wait until the daemon reports no follower streaming (slots come back as cancelled streams end)."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.call(path_of("Describe"), b"")
            if pb.DescribeResponse.FromString(reply.messages[0]).replication.followers == 0:
                return
            assert time.monotonic() < deadline, "a follower that left still holds its slot"
            time.sleep(0.01)

    # -- the end of a test --

    def assert_replays(self) -> None:
        """The log replayed onto the table as created rebuilds the same rows and state."""
        copy = self.root / "replay"
        shutil.copytree(self.pristine, copy)
        shutil.copytree(self.live.path / "wal", copy / "wal")
        with LiveTable.open(copy, config=LiveConfig(durability=Durability.OS)) as replayed:
            assert replayed.version == self.version and replayed.layer_steps == self.layer_steps
        for layer in LAYERS:
            names = [self.manifest.layer_file(layer)] + [name for name, _ in self.manifest.state_files(layer).values()]
            for name in names:
                assert (copy / name).read_bytes() == self.expected[name], f"replaying the log gives another {name}"

    def close(self) -> None:
        self.channel.close()
        for daemon in (self.daemon, self._stream_daemon):
            if daemon is not None:
                daemon.stop()
        self.live.close()


def _take(state: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The optimizer state of rows `ids`, slot by slot."""
    return {slot: values[ids] for slot, values in state.items()}


def path_of(method: str) -> str:
    """The full gRPC path of a Memstore method."""
    return f"/{MEMSTORE.full_name}/{method}"


# -- strategies ---------------------------------------------------------------------------------


def _resize(data: bytes, draw: Callable, fault: bool) -> bytes:
    """`data` with 1..7 bytes cut off or appended when `fault`: a length no decoder should accept."""
    if not fault:
        return data
    change = draw(st.integers(1, 7))
    return (
        data[:-change]
        if data and draw(st.booleans())
        else data + bytes(draw(st.binary(min_size=change, max_size=change)))
    )


LOOKUP_FAULTS = ["id_bytes", "negative_id", "id_past_end", "extreme_id", "unknown_layer", "oversized", "empty"]


def _spoil_ids(draw: Callable, ids: np.ndarray, faults: set[str], rows: int) -> int:
    """Put the id faults drawn (negative, past the layer, extreme) at one drawn position of `ids`,
    in place; returns that position (0 for no ids)."""
    if not len(ids):
        return 0
    at = draw(st.integers(0, len(ids) - 1))
    if "negative_id" in faults:
        ids[at] = draw(st.integers(-(1 << 63), -1))
    if "id_past_end" in faults:
        ids[at] = draw(st.one_of(st.just(rows), st.integers(rows, (1 << 63) - 1)))
    if "extreme_id" in faults:
        ids[at] = draw(st.sampled_from(EXTREME_IDS))
    return at


@st.composite
def lookup_requests(draw: Callable) -> pb.LookupRequest:
    """Lookups, valid or with up to two faults; repeated ids are valid in a lookup."""
    faults = draw(st.sets(st.sampled_from(LOOKUP_FAULTS), max_size=2))
    layer = draw(st.sampled_from(UNKNOWN_LAYERS if "unknown_layer" in faults else LAYERS))
    rows = NUM_ROWS.get(layer, 300)
    if "empty" in faults:
        size = 0
    elif "oversized" in faults:
        size = draw(st.integers(MAX_ROWS + 1, MAX_ROWS + 4))
    else:
        size = draw(st.integers(1, MAX_ROWS))
    ids = draw(arrays(np.int64, size, elements=st.integers(0, rows - 1)))
    _spoil_ids(draw, ids, faults, rows)
    return pb.LookupRequest(layer_id=layer, row_ids=_resize(ids.astype("<i8").tobytes(), draw, "id_bytes" in faults))


PUSH_FAULTS = [
    "id_bytes",
    "negative_id",
    "id_past_end",
    "extreme_id",
    "duplicate_id",
    "unknown_layer",
    "oversized",
    "grad_bytes",
    "grad_dim",
    "grad_rows",
    "nan",
    "inf",
    "-inf",
    "huge",
    "wild_grads",
    "lr_scale",
    "client_id",
]


@st.composite
def push_requests(draw: Callable, faults_max: int = 2) -> pb.PushRequest:
    """Pushes, valid or with up to `faults_max` faults. Step and client ids come from small sets, so
    retried steps (answered, not applied again) turn up as well."""
    faults = draw(st.sets(st.sampled_from(PUSH_FAULTS), max_size=faults_max))
    layer = draw(st.sampled_from(UNKNOWN_LAYERS if "unknown_layer" in faults else LAYERS))
    rows = NUM_ROWS.get(layer, 300)
    size = draw(st.integers(MAX_ROWS + 1, MAX_ROWS + 4) if "oversized" in faults else st.integers(0, MAX_ROWS))
    ids = draw(arrays(np.int64, size, elements=st.integers(0, rows - 1), unique=True))
    at = _spoil_ids(draw, ids, faults, rows)
    if "duplicate_id" in faults and size > 1:
        ids[(at + 1) % size] = ids[at]
    grad_rows = max(0, size + (draw(st.sampled_from([-1, 1])) if "grad_rows" in faults else 0))
    grad_dim = DIM + (draw(st.sampled_from([-1, 1])) if "grad_dim" in faults else 0)
    values = st.floats(width=32) if "wild_grads" in faults else st.floats(-4, 4, width=32)
    grads = draw(arrays(np.float32, (grad_rows, grad_dim), elements=values))
    for fault, value in [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]:
        if fault in faults and grads.size:
            grads.flat[draw(st.integers(0, grads.size - 1))] = value
    if "huge" in faults and grads.size:
        grads.flat[draw(st.integers(0, grads.size - 1))] = draw(st.sampled_from(HUGE_GRADS))
    request = pb.PushRequest(
        layer_id=layer,
        row_ids=_resize(ids.astype("<i8").tobytes(), draw, "id_bytes" in faults),
        grads=_resize(grads.astype("<f4").tobytes(), draw, "grad_bytes" in faults),
        step_id=draw(st.integers(-1, 3)),
        client_id=draw(st.sampled_from(["", "trainer-a", "trainer-b"])),
    )
    if "client_id" in faults:  # longer than the log record's 16-bit length: once cut inside a character
        request.client_id = "é" * 32768 + draw(st.sampled_from(["", "x"]))
    if "lr_scale" in faults:
        request.lr_scale = draw(st.sampled_from(LR_SCALES))
    elif draw(st.booleans()):
        request.lr_scale = draw(st.floats(0.05, 20))
    return request


SNAPSHOT_NAMES = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=60, max_size=140),  # past 255 bytes at times
    st.text(alphabet="abcXYZ019_-", min_size=1, max_size=8),  # valid ones, often enough to reach --max-snapshots
    st.sampled_from(["", ".", "..", ".hidden", "a/b", "a\\b", "a\0b", "a\nb", "x" * 100, "x" * 101, "é" * 128, "s"]),
)


@st.composite
def follow_requests(draw: Callable, manifest_json: str) -> pb.FollowRequest:
    """Follow requests: the table's own manifest (as sent, reformatted or edited) or junk, and
    heartbeats in and out of range (only small valid ones: a valid stream waits for its first one)."""
    data = json.loads(manifest_json)
    choice = draw(st.sampled_from(["same", "reformatted", "edited", "junk", "text"]))
    if choice == "same":
        text = manifest_json
    elif choice == "reformatted":
        text = json.dumps(data, indent=draw(st.sampled_from([None, 1, 4])), sort_keys=True)
    elif choice == "edited":
        key = draw(st.sampled_from(sorted(data)))
        data[key] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.just([]), st.just({})))
        text = json.dumps(data)
    elif choice == "junk":
        text = draw(st.sampled_from(["", "null", "[]", "{}", "1e999", '{"format_version": 1}', "{" * 50]))
    else:
        text = draw(st.text(max_size=40))
    return pb.FollowRequest(
        from_version=draw(st.one_of(st.integers(0, 4), st.sampled_from([1 << 40, (1 << 64) - 1]))),
        fingerprint=draw(st.text(max_size=8)),
        manifest_json=text,
        follower_id=draw(st.text(max_size=8)),
        heartbeat_s=draw(st.sampled_from([0.0, -0.0, 0.01, 0.05, 0.2, 0.009, -1.0, 60.5, 1e308, math.nan, math.inf])),
    )


def structured(path: str, fz: Fuzzed) -> st.SearchStrategy:
    """Well-formed requests for `path` (what the raw-bytes fuzz mutates)."""
    method = path.rsplit("/", 1)[1]
    if method == "Lookup":
        return lookup_requests()
    if method == "Push":
        return push_requests()
    if method == "Snapshot":
        return SNAPSHOT_NAMES.map(lambda name: pb.SnapshotRequest(name=name))
    if method == "Follow":
        return follow_requests(fz.manifest.to_json())
    if method == "ConfirmDurable":
        return st.builds(
            pb.ConfirmDurableRequest,
            replica_id=st.sampled_from(["", "host:/table", "r" * (MAX_REPLICA_ID_CHARS + 1)]),
            durable_version=st.integers(0, 20),
            fingerprint=st.sampled_from([fz.manifest.fingerprint, "", "other"]),
        )
    if path == HEALTH_CHECK:
        return st.sampled_from(["", SERVICE_NAME, "nope"]).map(lambda s: health_pb2.HealthCheckRequest(service=s))
    return st.just(REQUEST_TYPES[path]())


@st.composite
def mutated(draw: Callable, base: bytes) -> bytes:
    """`base` with a few bytes flipped, cut, inserted or appended."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "append"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            data += draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


def raw_messages(path: str, fz: Fuzzed) -> st.SearchStrategy[bytes]:
    """Random bytes, well-formed requests, and well-formed requests with a few bytes damaged."""
    requests = structured(path, fz).map(lambda message: message.SerializeToString())
    return st.one_of(st.binary(max_size=200), requests, requests.flatmap(mutated))
