"""Both clients are a `TableClient`: at runtime (isinstance) and by signature (inspect), call for call."""

from __future__ import annotations

import inspect

import pytest

from client import ClusterClient, ClusterSpec, MemstoreClient, RowReader, RowWriter, TableClient, TableFetcher
from tests.helpers import FAST_FAIL


def _members(protocol: type) -> list[str]:
    """The calls and properties a protocol declares (its own and its bases')."""
    names = set()
    for klass in protocol.__mro__:
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        names |= {name for name in vars(klass) if not name.startswith("_") or name in ("__enter__", "__exit__")}
    return sorted(names)


def _differences(protocol: type, implementation: type) -> list[str]:
    """Where `implementation` does not offer a call of `protocol` as declared: each parameter there
    with its kind and default, extra parameters optional; properties as properties."""
    found = []
    for name in _members(protocol):
        declared, offered = inspect.getattr_static(protocol, name), inspect.getattr_static(implementation, name, None)
        if isinstance(declared, property):
            if not isinstance(offered, property):
                found.append(f"{name}: not a property")
            continue
        if offered is None or not callable(offered):
            found.append(f"{name}: missing")
            continue
        wanted = inspect.signature(getattr(protocol, name)).parameters
        given = inspect.signature(getattr(implementation, name)).parameters
        for param in wanted.values():
            other = given.get(param.name)
            if param.kind is param.VAR_POSITIONAL:
                other = next((p for p in given.values() if p.kind is p.VAR_POSITIONAL), None)
            if other is None or other.kind != param.kind or other.default != param.default:
                found.append(f"{name}({param}): offered as {other}")
        for param in given.values():
            if (
                param.name not in wanted
                and param.default is param.empty
                and param.kind
                not in (
                    param.VAR_POSITIONAL,
                    param.VAR_KEYWORD,
                )
            ):
                found.append(f"{name}: extra required parameter {param}")
    return found


@pytest.mark.parametrize("implementation", [MemstoreClient, ClusterClient])
def test_both_clients_offer_every_call_of_the_protocol(implementation: type) -> None:
    assert _differences(TableClient, implementation) == []
    assert _members(TableClient) == sorted(
        {"describe", "lookup", "push", "trainable", "transport", "check_fingerprint", "version", "close"}
        | {"__enter__", "__exit__"}
    )


def test_the_signature_check_sees_a_call_that_drifted() -> None:
    class Drifted(MemstoreClient):
        def version(self, deadline: float | None = None) -> int:  # renamed keyword
            return 0

        def push(self, layer_id, row_ids, grads, step_id=0, lr_scale=None, timeout=None):  # not keyword-only
            raise NotImplementedError

    assert sorted(d.split("(")[0] for d in _differences(TableClient, Drifted)) == ["push", "push", "push", "version"]


def test_in_process_fetcher_is_a_row_reader_only() -> None:
    assert _differences(RowReader, TableFetcher) == []
    assert issubclass(TableFetcher, RowReader) and not issubclass(TableFetcher, RowWriter)


def test_connected_clients_are_table_clients(daemon) -> None:
    with (
        MemstoreClient(daemon.address, FAST_FAIL) as client,
        ClusterClient(ClusterSpec.single(daemon.address), FAST_FAIL) as cluster,
    ):
        for connected in (client, cluster):
            assert isinstance(connected, TableClient)
            assert isinstance(connected, RowReader) and isinstance(connected, RowWriter)
    assert not isinstance(object(), TableClient) and not isinstance(TableFetcher(None), RowWriter)
