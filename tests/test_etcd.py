"""memstore.etcd against a real etcd (Debian's 3.4) on loopback, and its vendored protocol's stubs."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from memstore.errors import InvalidArgumentError, UnavailableError
from memstore.etcd import EtcdClient, EventKind, Watch, WatchEvent, parse_endpoints, prefix_end
from tests.etcd_server import EtcdServer, require_etcd
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
ETCD_STUBS = [f"{name}{suffix}" for name in ("auth", "kv", "rpc") for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(require_etcd(), tmp_path / "etcd").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(etcd: EtcdServer) -> Iterator[EtcdClient]:
    with EtcdClient(etcd.endpoint, timeout_s=2.0) as connected:
        yield connected


def test_committed_etcd_stubs_match_the_vendored_protos(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto_for_etcd", REPO / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    generated = tmp_path / "memstore" / "wire" / "etcd"
    assert sorted(p.name for p in generated.iterdir()) == sorted(ETCD_STUBS)
    for name in ETCD_STUBS:
        assert (generated / name).read_bytes() == (REPO / "memstore" / "wire" / "etcd" / name).read_bytes(), (
            f"memstore/wire/etcd/{name} is out of date: run `python scripts/gen_proto.py` and commit the result"
        )


def test_endpoints_and_prefixes() -> None:
    assert parse_endpoints("http://10.0.0.1:2379, 10.0.0.2:2379") == ("10.0.0.1:2379", "10.0.0.2:2379")
    for bad in ("", "etcd", "etcd:port", "https://a:2379"):
        with pytest.raises(InvalidArgumentError):
            parse_endpoints(bad)
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"


def test_keys_prefixes_and_transactions(client: EtcdClient) -> None:
    client.put(b"/t/a", b"1")
    client.put(b"/t/b", b"2")
    client.put(b"/u/c", b"3")
    kvs, revision = client.get_prefix(b"/t/")
    assert [(kv.key, kv.value) for kv in kvs] == [(b"/t/a", b"1"), (b"/t/b", b"2")]
    assert revision >= kvs[-1].mod_revision
    assert client.get(b"/t/a").value == b"1" and client.get(b"/t/z") is None
    assert client.create(b"/t/leader", b"me") == (True, None)
    created, holder = client.create(b"/t/leader", b"you")  # taken: the holder comes back, unchanged
    assert not created and holder.value == b"me"
    assert client.delete_prefix(b"/t/") == 3 and client.get_prefix(b"/t/")[0] == []
    assert client.get(b"/u/c").value == b"3"


def test_a_lease_keeps_its_keys_until_revoked_or_expired(client: EtcdClient) -> None:
    lease = client.grant(1)
    client.put(b"/l/a", b"x", lease=lease)
    assert client.get(b"/l/a").lease == lease
    assert client.keep_alive_once(lease) > 0  # etcd raises a TTL below its minimum (2s here)
    client.revoke(lease)
    assert client.get(b"/l/a") is None
    assert client.keep_alive_once(lease) == 0  # gone: the owner must register anew
    client.revoke(lease)  # twice is not an error
    short = client.grant(1)
    client.put(b"/l/b", b"y", lease=short)
    wait_until(lambda: client.get(b"/l/b") is None, "the unrenewed lease expired", timeout_s=10)


def test_calls_to_a_stopped_etcd_fail_with_the_projects_error(etcd: EtcdServer, client: EtcdClient) -> None:
    etcd.stop()
    with pytest.raises(UnavailableError, match=f"etcd at {etcd.endpoint}"):
        client.get(b"/x")


def test_a_watch_delivers_in_order_and_resumes_across_an_etcd_restart(etcd: EtcdServer, client: EtcdClient) -> None:
    seen: list[WatchEvent] = []
    lock = threading.Lock()

    def on_events(events: list[WatchEvent]) -> None:
        with lock:
            seen.extend(events)

    _, revision = client.get_prefix(b"/w/")
    watch = Watch(client, b"/w/", on_events, revision + 1).start()
    try:
        client.put(b"/w/a", b"1")
        client.put(b"/elsewhere", b"not watched")
        client.delete(b"/w/a")
        wait_until(lambda: len(seen) == 2, "two events")
        etcd.stop()
        etcd.start()  # same data, same port: the watch reconnects by itself
        client.put(b"/w/b", b"2")
        wait_until(lambda: len(seen) == 3, "the event after the restart")
    finally:
        watch.stop()
    assert [(e.kind, e.kv.key) for e in seen] == [
        (EventKind.PUT, b"/w/a"),
        (EventKind.DELETE, b"/w/a"),
        (EventKind.PUT, b"/w/b"),
    ]
    revisions = [e.kv.mod_revision for e in seen]
    assert revisions == sorted(set(revisions))  # none repeated across the reconnection
