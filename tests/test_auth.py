"""Who may call: TLS (and client certificates), bearer tokens with read and write scopes, a read-only
daemon, and the warning for a daemon exposed without either. Certificates are made in the test."""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import MemstoreClient
from memstore.auth import ClientTls, Scope, TlsConfig, TokenTable, is_loopback, open_channel, read_token
from memstore.daemon import exposure_warning
from memstore.daemon_config import ServerConfig
from memstore.errors import InvalidArgumentError, ReadOnlyError, UnauthenticatedError, UnavailableError
from memstore.live import LiveConfig, LiveTable
from memstore.metrics import DaemonMetrics
from memstore.replica import FollowConfig, Follower
from memstore.service import create_server
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from memstore.wal import Durability
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc
from tests.helpers import FAST_FAIL, SMALL_LAYOUT, make_table

LAYER = 1
DIM = SMALL_LAYOUT.dim
READ_TOKEN = "r" * 8 + "ead-token-0123"
WRITE_TOKEN = "w" * 8 + "rite-token-0123"
REPLICATE_TOKEN = "replicate-token-0123"
GRPC = replace(FAST_FAIL, same_host=False, max_attempts=1)


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    lines = f"# who may call\nread {READ_TOKEN}\n  # the trainer\nwrite {WRITE_TOKEN}\nreplicate {REPLICATE_TOKEN}\n"
    _write_private(path, lines)
    return path


def _write_private(path: Path, text: str) -> None:
    """A token file as it should be: readable by its owner only (others' access is refused)."""
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)


@pytest.fixture
def trainable(tmp_path: Path):
    """A trainable table served by LiveTable (opened and closed by the test through this fixture)."""
    path = make_table(tmp_path / "t", seed=1, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0))
    opened: list[LiveTable] = []

    def open_table(read_only: bool = False) -> LiveTable:
        opened.append(LiveTable.open(path, read_only=read_only, config=LiveConfig(durability=Durability.OS)))
        return opened[-1]

    yield open_table
    for live in opened:
        live.close()


@pytest.fixture
def serve():
    servers: list[grpc.Server] = []

    def start(live: LiveTable, config: ServerConfig) -> str:
        server, port = create_server(live, "127.0.0.1:0", config)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None).wait()


def _push(client: MemstoreClient) -> None:
    client.push(LAYER, np.arange(4), np.ones((4, DIM), np.float32))


def test_token_file_parsing(tmp_path: Path, tokens: Path) -> None:
    table = TokenTable.from_file(tokens)
    assert table.scope(READ_TOKEN) is Scope.READ
    assert table.scope(WRITE_TOKEN) is Scope.WRITE
    assert table.scope("not-a-token-at-all") is None
    bad = tmp_path / "bad"
    _write_private(bad, "admin sometokenlongenough\n")
    with pytest.raises(InvalidArgumentError, match="line 1: expected `read TOKEN`, `write TOKEN` or `replicate TOKEN`"):
        TokenTable.from_file(bad)
    _write_private(bad, "read short\n")
    with pytest.raises(InvalidArgumentError, match="at least 16 characters"):
        TokenTable.from_file(bad)
    with pytest.raises(InvalidArgumentError, match="cannot read the token file"):
        TokenTable.from_file(tmp_path / "missing")


def test_client_token_from_file_or_environment(tmp_path: Path, tokens: Path, monkeypatch) -> None:
    bare = tmp_path / "bare"
    _write_private(bare, f"{WRITE_TOKEN}\n")
    assert read_token(bare) == WRITE_TOKEN
    assert read_token(tokens) == READ_TOKEN  # a daemon's file works: its first token
    monkeypatch.setenv("MEMSTORE_TOKEN", READ_TOKEN)
    assert read_token(None) == READ_TOKEN
    monkeypatch.delenv("MEMSTORE_TOKEN")
    assert read_token(None) is None


def test_tokens_scope_what_each_caller_may_do(trainable, serve, tokens: Path) -> None:
    live = trainable()
    address = serve(live, ServerConfig(same_host=False, token_file=tokens))
    with MemstoreClient(address, GRPC) as anonymous:
        with pytest.raises(UnauthenticatedError, match="bearer token is required"):
            anonymous.version()
    with MemstoreClient(address, replace(GRPC, token="wrong-token-of-some-length")) as wrong:
        with pytest.raises(UnauthenticatedError):
            wrong.lookup(LAYER, np.arange(3))
    before = live.gather(LAYER, np.arange(8))[0].copy()
    with MemstoreClient(address, replace(GRPC, token=READ_TOKEN)) as reader:
        assert np.array_equal(reader.lookup(LAYER, np.arange(8)).numpy(), before)
        with pytest.raises(ReadOnlyError, match="Push needs a write token"):
            _push(reader)
        with pytest.raises(ReadOnlyError, match="Snapshot needs a write token"):
            reader.snapshot("s1")
        assert reader.version() == 0  # nothing was applied
    assert np.array_equal(live.gather(LAYER, np.arange(8))[0], before)
    with MemstoreClient(address, replace(GRPC, token=WRITE_TOKEN)) as writer:
        _push(writer)
        assert writer.version() == 1
        assert writer.snapshot("s1")[1] == 1


def test_health_answers_without_a_token(trainable, serve, tokens: Path) -> None:
    """Orchestrators' probes carry no token; the health service tells nothing about the table."""
    address = serve(trainable(), ServerConfig(same_host=False, token_file=tokens))
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_the_token_stays_out_of_the_config_repr() -> None:
    assert WRITE_TOKEN not in repr(replace(GRPC, token=WRITE_TOKEN))


def test_tls_serves_clients_that_trust_its_ca_only(trainable, serve, pki) -> None:
    tls = TlsConfig(pki["server_cert"], pki["server_key"])
    address = serve(trainable(), ServerConfig(same_host=False, tls=tls))
    with MemstoreClient(address, replace(GRPC, tls=ClientTls(ca=pki["ca"]))) as client:
        assert client.lookup(LAYER, np.arange(5)).shape == (5, DIM)
        _push(client)
    with MemstoreClient(address, GRPC) as plaintext:
        with pytest.raises(UnavailableError):
            plaintext.version()
    with MemstoreClient(address, replace(GRPC, tls=ClientTls(ca=pki["other_ca"]))) as untrusting:
        with pytest.raises(UnavailableError):
            untrusting.version()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(trainable, serve, pki) -> None:
    tls = TlsConfig(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    address = serve(trainable(), ServerConfig(same_host=False, tls=tls))
    with MemstoreClient(address, replace(GRPC, tls=ClientTls(ca=pki["ca"]))) as no_cert:
        with pytest.raises(UnavailableError):
            no_cert.version()
    with_cert = ClientTls(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])
    with MemstoreClient(address, replace(GRPC, tls=with_cert)) as client:
        assert client.version() == 0


def test_tls_and_tokens_together(trainable, serve, pki, tokens: Path) -> None:
    tls = TlsConfig(pki["server_cert"], pki["server_key"])
    address = serve(trainable(), ServerConfig(same_host=False, tls=tls, token_file=tokens))
    with MemstoreClient(address, replace(GRPC, tls=ClientTls(ca=pki["ca"]), token=WRITE_TOKEN)) as client:
        _push(client)
        assert client.version() == 1
    with open_channel(address, [], ClientTls(ca=pki["ca"])) as channel:  # health over TLS, no token
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(InvalidArgumentError, match="give both"):
        ClientTls(cert=Path("client.pem"))


def test_a_read_only_daemon_refuses_pushes_and_snapshots(trainable, serve, tmp_path: Path) -> None:
    live = trainable(read_only=True)
    address = serve(live, ServerConfig(same_host=False, snapshot_dir=tmp_path / "snaps"))
    with MemstoreClient(address, GRPC) as client:
        with pytest.raises(ReadOnlyError):
            _push(client)
        with pytest.raises(ReadOnlyError, match="snapshots are refused"):
            client.snapshot("s1")
        assert client.lookup(LAYER, np.arange(3)).shape == (3, DIM)
    assert not (tmp_path / "snaps").exists()


def test_binding_a_public_interface_without_tls_or_tokens_warns(tokens: Path, pki) -> None:
    assert is_loopback("127.0.0.1:50051") and is_loopback("[::1]:1") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("10.0.0.5:1") and not is_loopback("host.example:1")
    assert exposure_warning("127.0.0.1:50051", ServerConfig()) is None
    warning = exposure_warning("0.0.0.0:50051", ServerConfig())
    assert warning is not None and "WITHOUT TLS OR TOKENS" in warning and "push" in warning
    tls = TlsConfig(pki["server_cert"], pki["server_key"])
    assert exposure_warning("0.0.0.0:50051", ServerConfig(tls=tls, token_file=tokens)) is None
    mutual = TlsConfig(pki["server_cert"], pki["server_key"], pki["ca"])
    assert exposure_warning("0.0.0.0:50051", ServerConfig(tls=mutual)) is None


def test_a_replica_follows_a_primary_behind_tls_and_a_token(trainable, serve, pki, tokens: Path, tmp_path) -> None:
    """The replica shows the primary a replicate token over TLS, and still applies every push."""
    primary_live = trainable()
    tls = TlsConfig(pki["server_cert"], pki["server_key"])
    primary = serve(primary_live, ServerConfig(same_host=False, tls=tls, token_file=tokens))
    copy = tmp_path / "replica"
    shutil.copytree(primary_live.path, copy)
    replica_live = LiveTable.open(copy, config=LiveConfig(durability=Durability.OS), primary=primary)
    follower = Follower(replica_live, FollowConfig(tls=ClientTls(ca=pki["ca"]), token=REPLICATE_TOKEN))
    try:
        follower.check_primary()
        follower.start()
        with MemstoreClient(primary, replace(GRPC, tls=ClientTls(ca=pki["ca"]), token=WRITE_TOKEN)) as client:
            _push(client)
            _push(client)
        for _ in range(500):
            if replica_live.version == 2:
                break
            time.sleep(0.01)
        assert replica_live.version == 2
        assert np.array_equal(replica_live.gather(LAYER, np.arange(8))[0], primary_live.gather(LAYER, np.arange(8))[0])
    finally:
        follower.stop()
        replica_live.close()


def test_a_token_read_from_the_environment_loses_its_newline(trainable, serve, tokens: Path, monkeypatch) -> None:
    """`MEMSTORE_TOKEN` set from a file with its newline used to fail every call with "Invalid metadata"."""
    monkeypatch.setenv("MEMSTORE_TOKEN", f"{READ_TOKEN}\n")
    assert read_token(None) == READ_TOKEN
    address = serve(trainable(), ServerConfig(same_host=False, token_file=tokens))
    with MemstoreClient(address, replace(GRPC, token=read_token(None))) as reader:
        assert reader.version() == 0


@pytest.mark.parametrize(
    ("token", "said"),
    [
        (f"{READ_TOKEN}\n", "a newline at position 22 (strip the newline"),
        (f"{READ_TOKEN[:5]} {READ_TOKEN[5:]}", "whitespace at position 5"),
        (f"{READ_TOKEN}\x07", "character U+0007 at position 22"),
        (f"{READ_TOKEN}é", "character U+00E9 at position 22"),
        ("", "the token is empty"),
    ],
    ids=["newline", "space", "control", "non-ascii", "empty"],
)
def test_a_token_that_cannot_travel_is_refused_clearly(tmp_path: Path, token: str, said: str, monkeypatch) -> None:
    """Refused where it is given (the client's config, a token file, the environment), never echoed,
    instead of every call failing with gRPC's "Invalid metadata"."""
    with pytest.raises(InvalidArgumentError, match=f"ClientConfig.token: .*{re.escape(said)}") as caught:
        replace(GRPC, token=token)
    if token:
        assert token not in str(caught.value)
    if token.strip() and token != f"{READ_TOKEN}\n":  # file and environment lose a newline by design
        path = tmp_path / "tokens"
        _write_private(path, f"read {token}\n")
        if " " not in token:  # a space splits the line into three words: a malformed line instead
            with pytest.raises(InvalidArgumentError, match=f"line 1: .*{re.escape(said)}"):
                TokenTable.from_file(path)
            with pytest.raises(InvalidArgumentError, match=f"line 1: .*{re.escape(said)}"):
                read_token(path)
        monkeypatch.setenv("MEMSTORE_TOKEN", token)
        with pytest.raises(InvalidArgumentError, match=f"MEMSTORE_TOKEN: .*{re.escape(said)}"):
            read_token(None)


def _follow_request(live: LiveTable) -> pb.FollowRequest:
    return pb.FollowRequest(manifest_json=live.manifest.to_json(), follower_id="test", heartbeat_s=0.05)


def test_follow_needs_a_replicate_token(trainable, serve, tokens: Path) -> None:
    """A read (or write) token used to open Follow streams: every push, with row ids and optimizer
    state, and a --max-followers slot each. Follow is the replicate scope's alone now."""
    live = trainable()
    address = serve(live, ServerConfig(same_host=False, token_file=tokens, max_followers=1))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MemstoreStub(channel)
        for token in (READ_TOKEN, WRITE_TOKEN):
            with pytest.raises(grpc.RpcError) as info:
                next(stub.Follow(_follow_request(live), metadata=[("authorization", f"Bearer {token}")], timeout=5))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "Follow needs a replicate token" in info.value.details()
            assert "`replicate TOKEN`" in info.value.details() and "--follow-token-file" in info.value.details()
        # Those refusals held no follower slot: the only one is the replica's.
        stream = stub.Follow(_follow_request(live), metadata=[("authorization", f"Bearer {REPLICATE_TOKEN}")])
        try:
            assert list(next(stream).records) == []  # a heartbeat: following
        finally:
            stream.cancel()
    with MemstoreClient(address, replace(GRPC, token=REPLICATE_TOKEN)) as replica:
        assert replica.lookup(LAYER, np.arange(3)).shape == (3, DIM)  # a replica may read what it follows
        with pytest.raises(ReadOnlyError, match="Push needs a write token; this is a replicate token"):
            _push(replica)
    assert TokenTable.from_file(tokens).scope(REPLICATE_TOKEN) is Scope.REPLICATE


def test_tls_without_tokens_or_client_certificates_warns(pki, tokens: Path) -> None:
    """TLS alone says nothing about who may call: anyone could push and snapshot unwarned."""
    tls = TlsConfig(pki["server_cert"], pki["server_key"])
    warning = exposure_warning("0.0.0.0:50051", ServerConfig(tls=tls))
    assert warning is not None and "NEITHER TOKENS NOR CLIENT CERTIFICATES" in warning and "--token-file" in warning
    plaintext_tokens = exposure_warning("0.0.0.0:50051", ServerConfig(token_file=tokens))
    assert plaintext_tokens is not None and "tokens travel in plaintext" in plaintext_tokens
    assert exposure_warning("127.0.0.1:50051", ServerConfig(tls=tls)) is None


def test_a_secret_file_others_may_read_is_refused(tmp_path: Path, tokens: Path, pki, trainable) -> None:
    """A token file or TLS key readable by group or others was used silently."""
    tokens.chmod(0o644)
    for load in (TokenTable.from_file, read_token):
        with pytest.raises(InvalidArgumentError, match=rf"{re.escape(str(tokens))} is open to group or others"):
            load(tokens)
    with pytest.raises(InvalidArgumentError, match=r"\(mode 0644\).*`chmod 600 "):
        create_server(trainable(), "127.0.0.1:0", ServerConfig(same_host=False, token_file=tokens))
    key = tmp_path / "server.key"
    shutil.copy(pki["server_key"], key)
    key.chmod(0o640)
    with pytest.raises(InvalidArgumentError, match=r"TLS key .* \(mode 0640\)"):
        TlsConfig(pki["server_cert"], key).server_credentials()
    with pytest.raises(InvalidArgumentError, match=r"TLS key .* \(mode 0640\)"):
        ClientTls(ca=pki["ca"], cert=pki["client_cert"], key=key).credentials()


def test_a_hash_inside_a_token_is_part_of_it(tmp_path: Path) -> None:
    """`#` anywhere started a comment, so `write abcdefgh#ijklmnopq` silently meant `abcdefgh`."""
    path = tmp_path / "tokens"
    _write_private(path, "# comments start a line\nwrite 0123456789abcdef#ghij\n")
    table = TokenTable.from_file(path)
    assert table.scope("0123456789abcdef#ghij") is Scope.WRITE
    assert table.scope("0123456789abcdef") is None
    assert read_token(path) == "0123456789abcdef#ghij"
    _write_private(path, f"write {WRITE_TOKEN} # the trainer\n")
    with pytest.raises(InvalidArgumentError, match="line 1: .*comments go on lines of their own"):
        TokenTable.from_file(path)
    with pytest.raises(InvalidArgumentError, match="line 1: .*comments go on lines of their own"):
        read_token(path)  # it used to send `#`-less text: the trainer's comment, or a truncated token


def test_a_token_given_twice_is_refused(tmp_path: Path) -> None:
    """The same token on a read and a write line took the scope of whichever line came last."""
    path = tmp_path / "tokens"
    _write_private(path, f"write {WRITE_TOKEN}\nread {WRITE_TOKEN}\n")
    with pytest.raises(InvalidArgumentError, match="line 2: this token is already on line 1") as caught:
        TokenTable.from_file(path)
    assert WRITE_TOKEN not in str(caught.value)


def test_a_token_sent_without_tls_to_another_host_warns(caplog, pki) -> None:
    """The client sent a bearer token in plaintext across the network without a word."""
    with caplog.at_level(logging.WARNING, logger="memstore.auth"):
        for target, tls in [("127.0.0.1:50051", None), ("unix:/tmp/x.sock", None), ("10.0.0.5:50051", ClientTls())]:
            open_channel(target, [], tls, READ_TOKEN).close()
        assert not caplog.records
        open_channel("10.0.0.5:50051", [], None, READ_TOKEN).close()
    assert len(caplog.records) == 1
    assert "sending a bearer token to 10.0.0.5:50051 without TLS" in caplog.text and READ_TOKEN not in caplog.text


def test_refused_calls_are_counted_and_logged_without_the_token(trainable, tokens: Path, caplog) -> None:
    """Authentication failures were neither counted nor logged."""
    metrics = DaemonMetrics()
    server, port = create_server(
        trainable(), "127.0.0.1:0", ServerConfig(same_host=False, token_file=tokens), None, metrics
    )
    server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="memstore.auth"):
            with MemstoreClient(f"127.0.0.1:{port}", GRPC) as anonymous:
                for _ in range(3):
                    with pytest.raises(UnauthenticatedError):
                        anonymous.version()
            with MemstoreClient(f"127.0.0.1:{port}", replace(GRPC, token="a-wrong-token-0123456")) as wrong:
                with pytest.raises(UnauthenticatedError):
                    wrong.version()
            with MemstoreClient(f"127.0.0.1:{port}", replace(GRPC, token=READ_TOKEN)) as reader:
                with pytest.raises(ReadOnlyError):
                    _push(reader)
    finally:
        server.stop(None).wait(5)
    assert metrics.total("memstore_auth_refused_total", method="Describe", reason="missing") == 3
    assert metrics.total("memstore_auth_refused_total", method="Describe", reason="invalid") == 1
    assert metrics.total("memstore_auth_refused_total", method="Push", reason="scope") == 1
    refusals = [record for record in caplog.records if record.name == "memstore.auth"]
    assert len(refusals) == 1  # rate-limited: one line for the burst, the rest counted into the next
    assert "refused a Describe call: missing token" in refusals[0].getMessage()
    assert "a-wrong-token" not in caplog.text and READ_TOKEN not in caplog.text
