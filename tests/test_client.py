"""MemstoreClient against a real daemon: shapes, dtypes, dedup, errors, deadlines, retries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from client import (
    ClientConfig,
    DeadlineExceededError,
    InvalidArgumentError,
    LayoutMismatchError,
    MemstoreClient,
    ResourceExhaustedError,
    UnavailableError,
)
from client.cluster import ClusterClient
from client.cluster_spec import ClusterSpec
from client.prefetch import PrefetchConfig, Prefetcher
from client.push import Pusher
from memstore.daemon_config import ServerConfig
from memstore.dtypes import DType
from memstore.launch import start_daemon
from memstore.layout import fingerprint
from memstore.live import LiveTable
from memstore.service import create_server
from memstore.table import Table
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from tests.helpers import CREATABLE_DTYPES, SMALL_LAYOUT, make_table


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (0,)])
def test_lookup_keeps_the_shape_of_the_ids(client: MemstoreClient, table: Table, shape) -> None:
    ids = np.random.default_rng(0).integers(0, 1000, shape)
    rows = client.lookup(1, ids)
    assert rows.shape == (*shape, 16) and rows.dtype == torch.float16
    np.testing.assert_array_equal(rows.reshape(-1, 16).numpy(), table.gather(1, ids.reshape(-1)))


@pytest.mark.parametrize("make_ids", [np.array, torch.tensor, list], ids=["numpy", "torch", "list"])
def test_lookup_accepts_numpy_torch_and_lists(client: MemstoreClient, table: Table, make_ids) -> None:
    rows = client.lookup(layer_id=4, row_ids=make_ids([5, 1, 5, 999]))
    np.testing.assert_array_equal(rows.numpy(), table.gather(4, np.array([5, 1, 5, 999])))


def test_duplicates_are_fetched_once_and_restored_in_order(client: MemstoreClient, table: Table) -> None:
    ids = np.random.default_rng(1).integers(0, 50, 10_000)  # heavy duplication, like Zipfian N-grams
    np.testing.assert_array_equal(client.lookup(1, ids).numpy(), table.gather(1, ids))


@pytest.mark.parametrize("duplicated", [False, True], ids=["distinct", "duplicated"])
def test_lookup_into_out_fills_and_returns_it(client: MemstoreClient, table: Table, duplicated: bool) -> None:
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 20 if duplicated else 1000, (6, 50))
    out = torch.full((6, 50, 16), 3.0, dtype=torch.float16)
    rows = client.lookup(1, ids, out=out)
    assert rows.data_ptr() == out.data_ptr() and rows.shape == (6, 50, 16)
    np.testing.assert_array_equal(out.reshape(-1, 16).numpy(), table.gather(1, ids.reshape(-1)))
    flat_out = torch.empty(300, 16, dtype=torch.float16)  # [N, dim] is accepted too
    assert torch.equal(client.lookup(1, ids, out=flat_out), rows)


@pytest.mark.parametrize(
    "out",
    [
        torch.empty(5, 16, dtype=torch.float16),
        torch.empty(4, 17, dtype=torch.float16),
        torch.empty(4, 16, dtype=torch.float32),
        torch.empty(16, 4, dtype=torch.float16).T,
        np.empty((4, 16), dtype=np.float16),
    ],
    ids=["rows", "width", "dtype", "strided", "numpy"],
)
def test_lookup_rejects_an_unfit_out(client: MemstoreClient, out) -> None:
    with pytest.raises(InvalidArgumentError, match="out must be"):
        client.lookup(1, np.arange(4), out=out)


@pytest.mark.parametrize("dtype", CREATABLE_DTYPES)
def test_rows_keep_the_stored_dtype(daemon_factory, client_config, tmp_path, dtype: DType) -> None:
    with Table.open(make_table(tmp_path / dtype.value, dtype)) as opened:
        daemon = daemon_factory(opened)
        with MemstoreClient(daemon.address, client_config) as client:
            rows = client.lookup(1, np.arange(10))
        assert rows.dtype == dtype.torch
        expected = dtype.to_torch(opened.gather(1, np.arange(10)))
        assert torch.equal(
            rows.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
            expected.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
        )


def test_bad_ids_raise_project_errors_not_grpc_errors(client: MemstoreClient) -> None:
    with pytest.raises(InvalidArgumentError, match="out of range"):
        client.lookup(1, [10**9])
    with pytest.raises(InvalidArgumentError, match="unknown Engram layer 3"):
        client.lookup(3, [0])
    with pytest.raises(InvalidArgumentError, match="integers"):
        client.lookup(1, np.array([0.5]))
    with pytest.raises(InvalidArgumentError, match="integers"):
        client.lookup(1, torch.tensor([1.0]))
    with pytest.raises(InvalidArgumentError, match="not an Engram layer id"):
        client.lookup(-1, [0])
    assert client.lookup(1, [0]).shape == (1, 16)  # still serving


def test_describe_and_fingerprint_check(client: MemstoreClient, table: Table) -> None:
    assert client.describe() == table.manifest
    client.check_fingerprint(fingerprint(SMALL_LAYOUT, 0))
    with pytest.raises(LayoutMismatchError, match="seed 0"):
        client.check_fingerprint(fingerprint(SMALL_LAYOUT, 1))


def test_expected_fingerprint_is_checked_on_connect(daemon, client_config) -> None:
    with MemstoreClient(daemon.address, client_config, expected_fingerprint=fingerprint(SMALL_LAYOUT, 0)) as client:
        assert client.lookup(1, [1]).shape == (1, 16)
    with pytest.raises(LayoutMismatchError):
        MemstoreClient(daemon.address, client_config, expected_fingerprint="0" * 16)


def test_unreachable_daemon_raises_unavailable(client_config, tmp_path) -> None:
    # A Unix socket nobody listens on: unlike a "free" TCP port, nothing can take it meanwhile.
    socket_path = tmp_path / "nobody.sock"
    with MemstoreClient(f"unix:{socket_path}", client_config) as client:
        attempts: list[str] = []

        def counted(name: str) -> Callable[..., object]:
            call = getattr(client._stub, name)  # the real call, counted

            def attempt(*args: object, **kwargs: object) -> object:
                attempts.append(name)
                return call(*args, **kwargs)

            return attempt

        # The first call of a lookup: Describe for the same-host path, else Lookup itself.
        client._stub.Describe, client._stub.Lookup = counted("Describe"), counted("Lookup")
        with pytest.raises(UnavailableError) as info:
            client.lookup(1, [0])
    # Retried as configured before giving up, and raised as the project's error alone: gRPC's is
    # neither the exception nor chained to it (a caller's traceback shows no grpc internals).
    assert len(attempts) == client_config.max_attempts > 1
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not isinstance(info.value, grpc.RpcError)
    assert str(socket_path) in str(info.value)  # says which address could not be reached


def test_deadline_is_enforced_against_a_stuck_daemon(client_config) -> None:
    # A listening socket that never speaks HTTP/2: the TCP connect succeeds, nothing answers.
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(8)
        with MemstoreClient(f"127.0.0.1:{stuck.getsockname()[1]}", client_config) as client:
            start = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                client.lookup(1, [0], timeout=0.5)
            assert time.monotonic() - start < 5


@pytest.fixture
def unix_servers() -> Iterator[Callable[[Table, str], grpc.Server]]:
    """Start daemons on Unix sockets (`start(table, address)`); all are stopped afterwards. A socket path
    is this test's own: a daemon restarted on it cannot meet another's, as a re-bound TCP port can."""
    started: list[grpc.Server] = []

    def start(table: Table, address: str) -> grpc.Server:
        server, _ = create_server(table, address, ServerConfig(same_host=False))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=None).wait()


def test_retries_unavailable_until_the_daemon_is_up(unix_servers, table: Table, tmp_path) -> None:
    address = f"unix:{tmp_path / 'daemon.sock'}"
    config = ClientConfig(timeout_s=20, max_attempts=5, initial_backoff_s=0.5, max_backoff_s=2.0, same_host=False)
    starter = threading.Timer(0.3, lambda: unix_servers(table, address))
    with MemstoreClient(address, config) as client:
        starter.start()
        rows = client.lookup(1, [1, 2])
    starter.join()
    assert rows.shape == (2, 16)


def test_client_survives_a_daemon_restart(unix_servers, table: Table, tmp_path) -> None:
    address = f"unix:{tmp_path / 'daemon.sock'}"
    first = unix_servers(table, address)
    config = ClientConfig(timeout_s=20, max_attempts=5, initial_backoff_s=0.5, max_backoff_s=2.0)
    with MemstoreClient(address, config) as client:
        before = client.lookup(4, [3])
        first.stop(grace=None).wait()
        unix_servers(table, address)
        assert torch.equal(client.lookup(4, [3]), before)


def test_duplicates_do_not_cross_the_wire_and_limits_hold_on_both_paths(
    daemon_factory, client_config, table: Table
) -> None:
    daemon = daemon_factory(table, ServerConfig(max_rows_per_request=100))
    ids = np.arange(10_000) % 100  # 10,000 ids, 100 distinct: only the 100 are sent
    with MemstoreClient(daemon.address, client_config) as client:
        np.testing.assert_array_equal(client.lookup(1, ids).numpy(), table.gather(1, ids))
        with pytest.raises(ResourceExhaustedError, match="at most 100"):
            client.lookup(1, np.arange(101))


def test_the_requested_transport_is_used(client: MemstoreClient, client_config: ClientConfig) -> None:
    client.lookup(1, [0, 1])
    expected = "same-host" if client_config.same_host else "data-plane" if client_config.data_plane else "grpc"
    assert client.transport == expected


def test_same_host_falls_back_to_the_data_plane_when_the_daemon_does_not_offer_it(daemon_factory, table: Table) -> None:
    daemon = daemon_factory(table, ServerConfig(same_host=False))
    with MemstoreClient(daemon.address) as client:
        np.testing.assert_array_equal(client.lookup(4, [7]).numpy(), table.gather(4, np.array([7])))
        assert client.transport == "data-plane"
    with MemstoreClient(daemon.address, ClientConfig(same_host=True)) as client:
        with pytest.raises(UnavailableError, match="no same-host access"):
            client.lookup(4, [7])


def test_same_host_refuses_a_file_that_is_not_the_daemons(daemon_factory, tmp_path) -> None:
    path = make_table(tmp_path / "t")
    with Table.open(path) as opened:
        daemon = daemon_factory(opened)
        moved = tmp_path / "moved"
        path.rename(moved)  # the daemon still maps the old inodes; the path now holds another table
        make_table(path)
        with MemstoreClient(daemon.address) as client:
            np.testing.assert_array_equal(client.lookup(1, [3]).numpy(), opened.gather(1, np.array([3])))
            assert client.transport == "data-plane"


def test_a_one_attempt_client_gets_a_working_channel(daemon) -> None:
    # gRPC refuses a retry policy of one attempt and fails the channel; the client then sends none.
    with MemstoreClient(daemon.address, ClientConfig(max_attempts=1, same_host=False)) as client:
        assert client.lookup(1, np.arange(3)).shape == (3, 16)


def test_an_lmdb_table_is_served_to_remote_clients_only(tmp_path, daemon_factory) -> None:
    from memstore.create import create_table
    from memstore.tabledir.manifest import Backend, Manifest

    path = create_table(tmp_path / "lmdb", Manifest(layout=SMALL_LAYOUT, dtype=DType.FLOAT16, backend=Backend.LMDB))
    with Table.open(path) as table:
        daemon = daemon_factory(table)
        ids = np.random.default_rng(3).integers(0, 1000, (5, 40))
        with MemstoreClient(daemon.address, ClientConfig(same_host=None)) as client:
            np.testing.assert_array_equal(
                client.lookup(1, ids).numpy(), table.gather(1, ids.reshape(-1)).reshape(5, 40, 16)
            )
            assert client.transport == "data-plane"  # one LMDB open per process: no same-host mapping offered
        with MemstoreClient(daemon.address, ClientConfig(same_host=True)) as client, pytest.raises(UnavailableError):
            client.lookup(1, ids)


def _queued_bytes(ports: tuple[int, ...]) -> int:
    """Bytes waiting unread in the receive queues of the TCP connections a daemon on `ports` accepted."""
    queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC listens on IPv6 sockets that take IPv4 too
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port in ports and fields[3] == "01":  # ESTABLISHED, the daemon's end
                queued += int(fields[4].split(":")[1], 16)
    return queued


def _call_while_the_daemon_dies(
    process: subprocess.Popen, ports: tuple[int, ...], call: Callable[[], object]
) -> object:
    """Stop the daemon, start `call` in a thread, kill the daemon once the call's request reached
    it, and return what the call raised (or returned). Fails, rather than hangs, if the call
    outlives the daemon by a minute (far past any deadline the tests give)."""
    os.kill(process.pid, signal.SIGSTOP)
    queued_before = _queued_bytes(ports)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome["result"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    for _ in range(1000):  # until the request is in the stopped daemon's socket: the call is in flight
        if _queued_bytes(ports) > queued_before:
            break
        worker.join(0.01)
    in_flight = _queued_bytes(ports) > queued_before
    process.kill()
    process.wait()
    worker.join(60)
    assert not worker.is_alive(), "the call outlived its deadline: it hangs on a dead daemon"
    assert in_flight, f"the call never reached the daemon; it ended with {outcome['result']!r}"
    return outcome["result"]


@pytest.fixture
def dying_daemon(tmp_path) -> Iterator[Callable[..., tuple[subprocess.Popen, str]]]:
    """Start `memstore serve` children that tests stop and kill (of a trainable table; with
    `trainable=False` of a frozen one, which several may serve); all are killed after."""
    path = make_table(tmp_path / "trainable", optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))
    frozen = make_table(tmp_path / "frozen")
    started: list[subprocess.Popen] = []

    def start(trainable: bool = True) -> tuple[subprocess.Popen, str]:
        served = path if trainable else frozen
        process, address = start_daemon(served, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        return process, address

    yield start
    for process in started:
        process.kill()  # SIGKILL ends a stopped process too
        process.wait()


# Default retries (5 attempts), a deadline well below the test's minute.
_DEFAULT_RETRIES = ClientConfig(timeout_s=5.0, same_host=False)


@pytest.mark.parametrize(
    "call", ["lookup", "grpc-lookup", "version", "push", "cluster-lookup", "prefetch", "same-host-lookup"]
)
def test_a_call_ends_when_its_daemon_dies_mid_call(dying_daemon, call: str) -> None:
    """A daemon stopped (SIGSTOP) during a call and then killed: the call fails with the project's
    error instead of blocking forever (gRPC's retry policy used to hang streamed lookups)."""
    process, address = dying_daemon()
    with MemstoreClient(address, _DEFAULT_RETRIES) as probe:  # lookups' requests queue at its data plane's port
        ports = (int(address.rsplit(":", 1)[1]), probe._describe(None).data_plane.port)
    ids = np.arange(8)
    if call == "cluster-lookup":
        client = ClusterClient(ClusterSpec.from_flags([address]), _DEFAULT_RETRIES)
    elif call == "same-host-lookup":  # rows from the mapped files, once Describe (sent mid-death here) answers
        client = MemstoreClient(address, replace(_DEFAULT_RETRIES, same_host=True))
    elif call == "grpc-lookup":
        client = MemstoreClient(address, replace(_DEFAULT_RETRIES, data_plane=False))
    else:
        client = MemstoreClient(address, _DEFAULT_RETRIES)
    with client:
        if call == "same-host-lookup":
            assert client.version() == 0  # connected, not described
        else:
            assert client.lookup(1, ids).shape == (8, 16)  # connected and described
        if call == "lookup":
            assert client.transport == "data-plane"
        if call == "prefetch":
            # Fetched in submit (no pool thread that a regression would leave hanging at exit).
            with Prefetcher(client, lambda _: {1: ids}, [1], PrefetchConfig(overlap=False)) as prefetcher:

                def fetch_step() -> torch.Tensor:
                    with prefetcher.submit(None) as handle:
                        return handle.rows(1)

                result = _call_while_the_daemon_dies(process, ports, fetch_step)
        elif call == "push":
            grads = np.ones((8, 16), np.float32)
            result = _call_while_the_daemon_dies(process, ports, lambda: client.push(1, ids, grads, step_id=1))
        elif call == "version":
            result = _call_while_the_daemon_dies(process, ports, client.version)
        else:
            result = _call_while_the_daemon_dies(process, ports, lambda: client.lookup(1, ids))
    assert isinstance(result, (DeadlineExceededError, UnavailableError)), result


@pytest.mark.parametrize("empty", [[], (), [[]]], ids=["list", "tuple", "nested"])
def test_an_empty_list_of_ids_is_no_ids_not_floats(daemon_factory, client_config, tmp_path, empty) -> None:
    """numpy types [] as float64: it used to be refused as "row ids must be integers; got float64"."""
    path = make_table(tmp_path / "trainable", optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))
    with LiveTable.open(path) as live:
        daemon = daemon_factory(live)
        try:
            with MemstoreClient(daemon.address, client_config) as client:
                assert client.lookup(1, empty).shape == (*np.shape(empty), 16)
                assert client.push(1, empty, np.zeros((*np.shape(empty), 16), np.float32), step_id=1).rows == 0
                assert client.push(4, [], [], step_id=1).rows == 0
                with pytest.raises(InvalidArgumentError, match="got a list of float64 values"):
                    client.lookup(1, [0.5])
        finally:
            daemon.stop()


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "localhost:http", ""])
def test_an_address_that_is_not_host_port_is_refused(address: str) -> None:
    """gRPC would dial 127.0.0.1:99999 as port 34463, whatever serves there, and a bare host on 443."""
    with pytest.raises(InvalidArgumentError, match="is not a daemon's address: expected HOST:PORT"):
        MemstoreClient(address)


def test_a_port_past_65535_does_not_reach_the_daemon_on_the_wrapped_port(daemon) -> None:
    wrapped = f"127.0.0.1:{daemon.port + 65536}"  # what gRPC would dial: this very daemon
    with pytest.raises(InvalidArgumentError, match="port from 1 to 65535"):
        MemstoreClient(wrapped, ClientConfig(same_host=False)).version()


def test_grpc_targets_with_a_scheme_pass(daemon, tmp_path) -> None:
    with MemstoreClient(f"ipv4:{daemon.address}", ClientConfig(same_host=False)) as client:
        assert client.lookup(1, [0]).shape == (1, 16)
    MemstoreClient(f"unix:{tmp_path / 'socket'}").close()  # a Unix socket target is taken as it is


@pytest.fixture
def trainable_daemon(daemon_factory, tmp_path) -> Iterator:
    """A daemon serving a trainable (SGD) copy of the small table; yields (daemon, its LiveTable)."""
    path = make_table(tmp_path / "trainable", optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))
    with LiveTable.open(path) as live:
        daemon = daemon_factory(live)
        try:
            yield daemon, live
        finally:
            daemon.stop()


def test_a_pusher_step_that_does_not_increase_is_refused_not_dropped(trainable_daemon) -> None:
    """The daemon answers a repeated step id as a retry without applying it: the second step 1's
    gradients used to vanish with an acknowledgement."""
    daemon, live = trainable_daemon
    grads = {1: (np.arange(4), np.ones((4, 16), np.float32))}
    with MemstoreClient(daemon.address, ClientConfig(same_host=False)) as client, Pusher(client, [1, 4]) as pusher:
        pusher.push_step(1, grads)
        with pytest.raises(InvalidArgumentError, match="step ids must increase: step 1 after step 1"):
            pusher.push_step(1, grads)
        pusher.push_step(2, grads)
    assert live.version == 2


def test_a_pusher_step_with_an_unknown_layer_pushes_nothing(trainable_daemon) -> None:
    """A layer the pusher has no worker for raised a raw KeyError after the layers before it were pushed."""
    daemon, live = trainable_daemon
    grads = {layer: (np.arange(4), np.ones((4, 16), np.float32)) for layer in (1, 7)}
    with MemstoreClient(daemon.address, ClientConfig(same_host=False)) as client, Pusher(client, [1, 4]) as pusher:
        with pytest.raises(InvalidArgumentError, match=r"layers \[7\]; this pusher pushes layers \[1, 4\]"):
            pusher.push_step(1, grads)
        pusher.flush()
    assert live.version == 0


def test_a_cluster_connects_while_one_daemon_of_a_shard_hangs(daemon, table: Table) -> None:
    """A hung daemon (it accepts connections, never answers) failed the whole ClusterClient with
    DeadlineExceededError at connect, though its shard had another daemon up; only an unreachable
    one (UNAVAILABLE) was let pass."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        spec = ClusterSpec.from_flags([f"127.0.0.1:{hung.getsockname()[1]},{daemon.address}"])
        with ClusterClient(spec, ClientConfig(timeout_s=1.0, same_host=False)) as cluster:
            np.testing.assert_array_equal(cluster.lookup(1, [3, 5]).numpy(), table.gather(1, np.array([3, 5])))


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), 1e10, 0.0, -1.0])
def test_a_deadline_grpc_cannot_keep_is_refused_not_failed_as_exceeded(daemon, seconds: float) -> None:
    """gRPC turns a deadline of 1e10 s, inf or nan into one already past: `timeout_s=inf` (meant as
    "no deadline") failed every call at once with "Deadline Exceeded", and nan passed the config's check."""
    with pytest.raises(InvalidArgumentError, match="ClientConfig.timeout_s must be a number of seconds above 0"):
        ClientConfig(timeout_s=seconds)
    with pytest.raises(InvalidArgumentError, match="PrefetchConfig.timeout_s must be"):
        PrefetchConfig(timeout_s=seconds)
    with MemstoreClient(daemon.address, ClientConfig(same_host=False)) as client:
        with pytest.raises(InvalidArgumentError, match="timeout must be a number of seconds above 0"):
            client.lookup(1, [0], timeout=seconds)
        with pytest.raises(InvalidArgumentError, match="timeout must be a number of seconds above 0"):
            client.version(timeout=seconds)
        assert client.version(timeout=1e6) == 0  # the longest deadline taken


def test_a_one_shard_cluster_fails_over_from_a_hung_replica(dying_daemon) -> None:
    """One shard, two daemons, one of them stopped (SIGSTOP, still READY to gRPC): a one-shard
    ClusterClient skipped its replica retry, so `attempt_timeout_s` was ignored and the lookup that
    round robin sent to the hung daemon waited out the whole deadline."""
    (hung, first), (_, second) = dying_daemon(trainable=False), dying_daemon(trainable=False)
    config = ClientConfig(timeout_s=20.0, attempt_timeout_s=1.0, same_host=False)
    with ClusterClient(ClusterSpec.from_flags([f"{second},{first}"]), config) as cluster:
        expected = cluster.lookup(1, np.arange(8))
        for _ in range(4):  # both daemons serve: round robin has them both READY
            assert torch.equal(cluster.lookup(1, np.arange(8)), expected)
        hung.send_signal(signal.SIGSTOP)
        for _ in range(4):  # round robin sends some of these to the hung daemon first
            assert torch.equal(cluster.lookup(1, np.arange(8)), expected)
