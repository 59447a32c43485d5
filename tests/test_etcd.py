"""memstore.etcd against a real etcd (Debian's 3.4) on loopback, and its vendored protocol's stubs."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest

from memstore.errors import InvalidArgumentError, UnavailableError
from memstore.etcd import EtcdClient, EventKind, Watch, WatchEvent, parse_endpoints, prefix_end
from tests.etcd_server import EtcdServer
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
ETCD_STUBS = [f"{name}{suffix}" for name in ("auth", "kv", "rpc") for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


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


def test_keys_prefixes_and_transactions(etcd_store: EtcdClient) -> None:
    etcd_store.put(b"/t/a", b"1")
    etcd_store.put(b"/t/b", b"2")
    etcd_store.put(b"/u/c", b"3")
    kvs, revision = etcd_store.get_prefix(b"/t/")
    assert [(kv.key, kv.value) for kv in kvs] == [(b"/t/a", b"1"), (b"/t/b", b"2")]
    assert revision >= kvs[-1].mod_revision
    assert etcd_store.get(b"/t/a").value == b"1" and etcd_store.get(b"/t/z") is None
    assert etcd_store.create(b"/t/leader", b"me") == (True, None)
    created, holder = etcd_store.create(b"/t/leader", b"you")  # taken: the holder comes back, unchanged
    assert not created and holder.value == b"me"
    assert etcd_store.delete_prefix(b"/t/") == 3 and etcd_store.get_prefix(b"/t/")[0] == []
    assert etcd_store.get(b"/u/c").value == b"3"


def test_a_lease_keeps_its_keys_until_revoked_or_expired(etcd_store: EtcdClient) -> None:
    lease = etcd_store.grant(1)
    etcd_store.put(b"/l/a", b"x", lease=lease)
    assert etcd_store.get(b"/l/a").lease == lease
    assert etcd_store.keep_alive_once(lease) > 0  # etcd raises a TTL below its minimum (2s here)
    etcd_store.revoke(lease)
    assert etcd_store.get(b"/l/a") is None
    assert etcd_store.keep_alive_once(lease) == 0  # gone: the owner must register anew
    etcd_store.revoke(lease)  # twice is not an error
    short = etcd_store.grant(1)
    etcd_store.put(b"/l/b", b"y", lease=short)
    wait_until(lambda: etcd_store.get(b"/l/b") is None, "the unrenewed lease expired", timeout_s=10)


def test_calls_to_a_stopped_etcd_fail_with_the_projects_error(etcd: EtcdServer, etcd_store: EtcdClient) -> None:
    etcd.stop()
    with pytest.raises(UnavailableError, match=f"etcd at {etcd.endpoint}"):
        etcd_store.get(b"/x")


def test_a_watch_delivers_in_order_and_resumes_across_an_etcd_restart(etcd: EtcdServer, etcd_store: EtcdClient) -> None:
    seen: list[WatchEvent] = []
    lock = threading.Lock()

    def on_events(events: list[WatchEvent]) -> None:
        with lock:
            seen.extend(events)

    _, revision = etcd_store.get_prefix(b"/w/")
    watch = Watch(etcd_store, b"/w/", on_events, revision + 1).start()
    try:
        etcd_store.put(b"/w/a", b"1")
        etcd_store.put(b"/elsewhere", b"not watched")
        etcd_store.delete(b"/w/a")
        wait_until(lambda: len(seen) == 2, "two events")
        etcd.stop()
        etcd.start()  # same data, same port: the watch reconnects by itself
        etcd_store.put(b"/w/b", b"2")
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
