"""Shared fixtures: small tables on disk and real daemons on loopback port 0."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trustme

from client import ClientConfig, MemstoreClient
from memstore.daemon_config import ServerConfig
from memstore.etcd import EtcdClient
from memstore.service import create_server
from memstore.table import Table
from model.data import DataConfig, PreparedData, prepare_data
from tests.etcd_server import EtcdServer, require_etcd
from tests.helpers import DEADLINE_S, FAST_FAIL, SMALL_CORPUS, make_table


@pytest.fixture(scope="session")
def table_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small float16 table shared by the tests that only read it."""
    return make_table(tmp_path_factory.mktemp("tables") / "small")


@pytest.fixture(scope="session")
def table(table_path: Path) -> Iterator[Table]:
    with Table.open(table_path) as opened:
        yield opened


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """A small generated corpus and BPE for model tests, built once per session."""
    return prepare_data(DataConfig(data_dir=tmp_path_factory.mktemp("data"), vocab_size=500, corpus=SMALL_CORPUS))


class Daemon:
    """A started in-process server on 127.0.0.1, on the port it bound (port 0: one the kernel picked)."""

    def __init__(self, table: Table, config: ServerConfig | None = None, port: int = 0) -> None:
        self.server, self.port = create_server(table, f"127.0.0.1:{port}", config)
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        assert self.server.stop(grace=None).wait(DEADLINE_S), f"the daemon at {self.address} did not stop"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("trainer@example.test")
    other_ca = trustme.CA()
    files = {
        "ca": root / "ca.pem",
        "other_ca": root / "other-ca.pem",
        "server_cert": root / "server.pem",
        "server_key": root / "server.key",
        "client_cert": root / "client.pem",
        "client_key": root / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    other_ca.cert_pem.write_to_path(str(files["other_ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server_cert"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    for key in ("server_key", "client_key"):
        files[key].chmod(0o600)  # a key others may read is refused
    return files


@pytest.fixture
def daemon_factory() -> Iterator:
    """Start daemons on demand (`daemon_factory(table, config)`); all are stopped afterwards."""
    started: list[Daemon] = []

    def start(table: Table, config: ServerConfig | None = None, port: int = 0) -> Daemon:
        started.append(Daemon(table, config, port))
        return started[-1]

    yield start
    for daemon in started:  # each stops, or fails the test, by its deadline
        daemon.stop()


@pytest.fixture
def daemon(daemon_factory, table: Table) -> Daemon:
    return daemon_factory(table)


# How a client's lookups travel, as ClientConfig settings: each contract test of the client runs over each.
TRANSPORTS = {
    "grpc": {"same_host": False, "data_plane": False},
    "data-plane": {"same_host": False, "data_plane": True},
    "same-host": {"same_host": True},
}


@pytest.fixture(params=list(TRANSPORTS))
def client_config(request: pytest.FixtureRequest) -> ClientConfig:
    """Fail-fast client settings, once over gRPC streaming, the data plane and the same-host fast path."""
    return replace(FAST_FAIL, **TRANSPORTS[request.param])


@pytest.fixture
def client(daemon: Daemon, client_config: ClientConfig) -> Iterator[MemstoreClient]:
    with MemstoreClient(daemon.address, client_config) as connected:
        yield connected


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd on free loopback ports (skips where no etcd binary is found: scripts/get_etcd.sh)."""
    server = EtcdServer(require_etcd(), tmp_path / "etcd").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_store(etcd: EtcdServer) -> Iterator[EtcdClient]:
    """A client of that etcd."""
    with EtcdClient(etcd.endpoint, timeout_s=2.0) as client:
        yield client
