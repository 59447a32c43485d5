"""Talking to etcd (3.4's v3 gRPC API, stubs generated here from its vendored protos): the only module that does.

Keys and values are bytes; every call has a deadline and raises the project's exceptions
(memstore.errors), never grpc.RpcError. Light on purpose (grpc and the stubs only): the daemon
registers itself through it and the client discovers the cluster through it.

- `EtcdClient`: put, get (one key or a prefix), delete, transactions, leases (grant, keep alive
  once, revoke), and `watch_prefix`;
- `Watch`: a thread delivering a prefix's events, reconnecting after etcd comes back and resuming
  from the revision after the last one it delivered (or from a fresh listing, when etcd compacted
  those revisions away).

Why not a PyPI client: python-etcd3 is unmaintained and fails to import with protobuf 4 and later;
the generated stubs follow whatever protobuf and grpcio this project pins.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from memstore.errors import InvalidArgumentError, MemstoreError, UnavailableError, error_from_rpc
from memstore.wire.etcd import kv_pb2, rpc_pb2, rpc_pb2_grpc

log = logging.getLogger("memstore.etcd")

DEFAULT_TIMEOUT_S = 5.0
# Seconds between reconnection attempts of a watch or a keep-alive whose etcd went away.
RETRY_S = 0.5


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it."""

    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """A change under a watched prefix (a DELETE carries the key only; its value is empty)."""

    kind: EventKind
    kv: KeyValue


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    """HOST:PORT endpoints from "a:2379,b:2379" or a list; an `http://` prefix (etcdctl's spelling) is dropped.
    InvalidArgumentError for an empty list or a malformed address."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        address = item.removeprefix("http://")
        if address.startswith("https://"):
            raise InvalidArgumentError(f"etcd endpoint {item!r}: TLS to etcd is not supported yet; use http://")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgumentError(f"etcd endpoint {item!r} is not HOST:PORT (e.g. 127.0.0.1:2379)")
        parsed.append(address)
    if not parsed:
        raise InvalidArgumentError("no etcd endpoint given: expected HOST:PORT[,HOST:PORT...]")
    return tuple(parsed)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with `prefix` (etcd's convention)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


class EtcdClient:
    """A connection to an etcd cluster. Thread-safe; a context manager."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoints = parse_endpoints(endpoints)
        if not 0 < timeout_s <= 3600:
            raise InvalidArgumentError(f"the etcd timeout must be in (0, 3600] seconds; got {timeout_s}")
        self.timeout_s = timeout_s
        options = [
            # Reconnect soon after etcd comes back: gRPC's default backoff grows to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # A watch is a long-lived stream without a deadline: pings find a hung etcd or a dead
            # connection (15 s), and the watch reconnects. Not under etcd's 5 s minimum ping interval.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        self._channel = grpc.insecure_channel(_target(self.endpoints), options=options)
        self._kv = rpc_pb2_grpc.KVStub(self._channel)
        self._lease = rpc_pb2_grpc.LeaseStub(self._channel)
        self._watch = rpc_pb2_grpc.WatchStub(self._channel)

    # -- keys -----------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Set `key` (attached to `lease`, when not 0); the store's revision after it."""
        reply = self._call(self._kv.Put, rpc_pb2.PutRequest(key=key, value=value, lease=lease))
        return reply.header.revision

    def get(self, key: bytes) -> KeyValue | None:
        """The key, or None."""
        reply = self._call(self._kv.Range, rpc_pb2.RangeRequest(key=key))
        return _kv(reply.kvs[0]) if reply.kvs else None

    def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` in key order, and the revision they show (a watch resumes after it)."""
        reply = self._call(self._kv.Range, rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix)))
        return [_kv(kv) for kv in reply.kvs], reply.header.revision

    def delete(self, key: bytes) -> int:
        """Remove the key; how many were removed (0 or 1)."""
        return self._call(self._kv.DeleteRange, rpc_pb2.DeleteRangeRequest(key=key)).deleted

    def delete_prefix(self, prefix: bytes) -> int:
        """Remove every key under `prefix`; how many were removed."""
        request = rpc_pb2.DeleteRangeRequest(key=prefix, range_end=prefix_end(prefix))
        return self._call(self._kv.DeleteRange, request).deleted

    def txn(
        self,
        compare: Sequence[rpc_pb2.Compare],
        success: Sequence[rpc_pb2.RequestOp],
        failure: Sequence[rpc_pb2.RequestOp] = (),
    ) -> tuple[bool, rpc_pb2.TxnResponse]:
        """One atomic transaction: `success` if every comparison holds, else `failure`. (succeeded, response)."""
        request = rpc_pb2.TxnRequest(compare=compare, success=success, failure=failure)
        reply = self._call(self._kv.Txn, request)
        return reply.succeeded, reply

    def create(self, key: bytes, value: bytes, *, lease: int = 0) -> tuple[bool, KeyValue | None]:
        """Put `key` only if it does not exist (the building block of an election). (created, the
        existing key when it was not created)."""
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        put = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))
        get = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))
        created, reply = self.txn([absent], [put], [get])
        if created:
            return True, None
        kvs = reply.responses[0].response_range.kvs
        return False, (_kv(kvs[0]) if kvs else None)

    # -- leases ---------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> int:
        """A new lease of `ttl_s` seconds; its id."""
        if ttl_s < 1:
            raise InvalidArgumentError(f"a lease needs a TTL of at least 1 second; got {ttl_s}")
        reply = self._call(self._lease.LeaseGrant, rpc_pb2.LeaseGrantRequest(TTL=ttl_s))
        if reply.error:
            raise UnavailableError(f"etcd refused a lease: {reply.error}")
        return reply.ID

    def keep_alive_once(self, lease: int) -> int:
        """Renew the lease; its TTL in seconds, 0 when it has expired (its keys are gone)."""

        def requests() -> Iterator[rpc_pb2.LeaseKeepAliveRequest]:
            yield rpc_pb2.LeaseKeepAliveRequest(ID=lease)

        try:
            stream = self._lease.LeaseKeepAlive(requests(), timeout=self.timeout_s)
            for reply in stream:
                stream.cancel()
                return max(0, reply.TTL)
        except grpc.RpcError as exc:
            raise _error(exc, self.endpoints) from None
        raise UnavailableError(f"etcd at {','.join(self.endpoints)} closed the keep-alive stream without an answer")

    def revoke(self, lease: int, *, timeout_s: float | None = None) -> None:
        """End the lease now: its keys are deleted. A lease that already expired is not an error."""
        try:
            self._lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease), timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise _error(exc, self.endpoints) from None

    # -- watches --------------------------------------------------------------------------

    def watch_prefix(
        self, prefix: bytes, on_events: Callable[[list[WatchEvent]], None], *, start_revision: int
    ) -> Watch:
        """A started thread calling `on_events` with the changes under `prefix` from `start_revision` on,
        in order; see `Watch`."""
        watch = Watch(self, prefix, on_events, start_revision)
        watch.start()
        return watch

    # -- internals ------------------------------------------------------------------------

    def _call(self, method: Callable, request: object) -> object:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc, self.endpoints) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watch:
    """Delivers the changes under a prefix to `on_events` from a thread of its own, in revision order.

    When the stream breaks (etcd restarted, a network cut) it reconnects and resumes from the
    revision after the last one delivered, so no change is skipped or repeated. When etcd has
    compacted those revisions away, or it lost its data (its revision went back), it calls `on_reset`
    (if given) to let the owner list the prefix anew, and resumes after that listing's revision.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: bytes,
        on_events: Callable[[list[WatchEvent]], None],
        start_revision: int,
        on_reset: Callable[[], int] | None = None,
    ) -> None:
        self.client, self.prefix, self._on_events, self._on_reset = client, prefix, on_events, on_reset
        self.next_revision = start_revision
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._broken = False  # an outage is said once, not at every retry
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._stream()
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                (log.debug if self._broken else log.info)(
                    "etcd watch on %r broke (%s); resuming from revision %d",
                    self.prefix,
                    exc.code(),
                    self.next_revision,
                )
                self._broken = True
            except Exception:  # noqa: BLE001 - the owner's callback failed: keep watching, say so
                log.exception("etcd watch on %r: handling events failed", self.prefix)
            self._stop.wait(RETRY_S)

    def _stream(self) -> None:
        requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
        requests.put(
            rpc_pb2.WatchRequest(
                create_request=rpc_pb2.WatchCreateRequest(
                    key=self.prefix, range_end=prefix_end(self.prefix), start_revision=self.next_revision
                )
            )
        )
        call = self.client._watch.Watch(iter(requests.get, None))
        with self._lock:
            if self._stop.is_set():
                call.cancel()
                return
            self._call = call
        try:
            for reply in call:
                self._broken = False  # etcd answers
                if reply.created and reply.header.revision < self.next_revision - 1:
                    # History went back: an etcd that lost its data (restored, or wiped) answers.
                    log.warning("etcd's revision went back to %d: listing %r anew", reply.header.revision, self.prefix)
                    self.next_revision = reply.header.revision + 1 if self._on_reset is None else self._on_reset() + 1
                    return
                if reply.compact_revision and reply.compact_revision > self.next_revision - 1:
                    log.warning("etcd compacted %r past revision %d: listing it anew", self.prefix, self.next_revision)
                    if self._on_reset is None:
                        self.next_revision = reply.compact_revision
                    else:
                        self.next_revision = self._on_reset() + 1
                    return  # a new stream from the new revision
                if reply.canceled:
                    raise UnavailableError(f"etcd cancelled the watch on {self.prefix!r}: {reply.cancel_reason}")
                if reply.events:
                    events = [
                        WatchEvent(EventKind.DELETE if e.type == kv_pb2.Event.DELETE else EventKind.PUT, _kv(e.kv))
                        for e in reply.events
                    ]
                    self._on_events(events)
                    self.next_revision = events[-1].kv.mod_revision + 1
        finally:
            requests.put(None)
            call.cancel()

    def stop(self) -> None:
        """Stop delivering; returns once the thread has ended."""
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def _kv(kv: kv_pb2.KeyValue) -> KeyValue:
    return KeyValue(bytes(kv.key), bytes(kv.value), kv.mod_revision, kv.create_revision, kv.lease)


def _target(endpoints: tuple[str, ...]) -> str:
    """One gRPC target for the endpoints: the address itself, or a list of IP literals (gRPC takes a
    list only as those) that the channel fails over across."""
    if len(endpoints) == 1:
        return endpoints[0]
    hosts = [e.rpartition(":")[0].strip("[]") for e in endpoints]
    try:
        families = {ipaddress.ip_address(h).version for h in hosts}
    except ValueError:
        raise InvalidArgumentError(
            f"several etcd endpoints must be IP addresses (or give one DNS name resolving to them all): {endpoints}"
        ) from None
    if families == {4}:
        return "ipv4:" + ",".join(endpoints)
    if families == {6}:
        return "ipv6:" + ",".join(endpoints)
    raise InvalidArgumentError(f"etcd endpoints {list(endpoints)} mix IPv4 and IPv6; use one family")


def _error(exc: grpc.RpcError, endpoints: tuple[str, ...]) -> MemstoreError:
    error = error_from_rpc(exc)
    error.args = (f"etcd at {','.join(endpoints)}: {error}",)
    return error
