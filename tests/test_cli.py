"""The `memstore` command line: create and info in process, bad arguments, the real
console entry point in a subprocess, and health checks against real servers."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health

from client import ClientConfig, MemstoreClient
from memstore.cli import _parser, describe_table, main
from memstore.daemon_config import check_listen_address
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError
from memstore.launch import daemon_process, start_daemon, stop_daemon
from memstore.layout import EngramLayout, fingerprint
from memstore.service import SERVICE_NAME, create_server
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from tests.helpers import make_table

REPO = Path(__file__).resolve().parent.parent
LAYOUT = EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(50, 70), max_ngram=3, heads_per_ngram=2, dim=8)
CREATE_ARGS = ["--layers", "1,4", "--vocab-size-per-ngram", "50,70", "--heads-per-ngram", "2", "--dim", "8"]


def _create(path: Path, *extra: str) -> int:
    return main(["create", str(path), *CREATE_ARGS, "--no-progress", *extra])


def test_create_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t"
    assert _create(path, "--seed", "3", "--dtype", "bfloat16", "--chunk-rows", "7") == 0
    out = capsys.readouterr().out
    manifest = Manifest(layout=LAYOUT, dtype=DType.BFLOAT16, seed=3)
    assert out.startswith(f"created {path}\n")
    assert f"fingerprint: {fingerprint(LAYOUT, 3)}" in out
    assert f"rows: {LAYOUT.total_rows:,}" in out
    assert "dtype bfloat16" in out
    for layer in LAYOUT.layer_ids:
        assert f"layer {layer}: {LAYOUT.num_rows(layer):,} rows" in out
    assert out == f"created {path}\n{describe_table(manifest)}\n"
    assert Manifest.read(path) == manifest


def test_created_table_opens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "t", "--init-std", "0.02") == 0
    with Table.open(tmp_path / "t") as table:
        assert table.manifest == Manifest(layout=LAYOUT, dtype=DType.FLOAT16, seed=0, init_std=0.02)


def test_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "t", "--seed", "5") == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    manifest = Manifest.read(tmp_path / "t")
    assert out.startswith(describe_table(manifest) + "\nmaterialised: ")
    assert f"fingerprint: {fingerprint(LAYOUT, 5)}" in out
    assert "format version 1, backend mmap, dtype float16, eager init" in out


def test_info_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "t", "--dtype", "float32") == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "t"), "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["fingerprint"] == fingerprint(LAYOUT, 0)
    assert data["dtype"] == "float32"
    assert data["layout"] == LAYOUT.to_dict()
    assert out == (tmp_path / "t" / "manifest.json").read_text()


def test_info_of_a_missing_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "memstore info: error:" in capsys.readouterr().err


def test_create_refuses_an_existing_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "t", "--seed", "1") == 0
    capsys.readouterr()
    assert _create(tmp_path / "t", "--seed", "2") == 2
    assert "already exists" in capsys.readouterr().err
    assert Manifest.read(tmp_path / "t").seed == 1
    assert _create(tmp_path / "t", "--seed", "2", "--overwrite") == 0
    assert Manifest.read(tmp_path / "t").seed == 2


def test_unknown_dtype_is_an_argparse_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _create(tmp_path / "t", "--dtype", "float64")
    assert exit_info.value.code == 2
    assert "--dtype" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_unknown_dtype_error_lists_the_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _create(tmp_path / "t", "--dtype", "float64")
    assert "bfloat16" in capsys.readouterr().err


def test_vocab_list_of_wrong_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["create", str(tmp_path / "t"), "--layers", "1", "--vocab-size-per-ngram", "50", "--dim", "8",
                 "--max-ngram", "3", "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "vocab_size_per_ngram" in err and "memstore create: error:" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "1,x"], "comma-separated integers"),
        (["--layers", ""], "comma-separated integers"),
        (["--dim", "eight"], "--dim"),
        (["--seed", "1.5"], "--seed"),
    ],
    ids=repr,
)
def test_malformed_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _create(tmp_path / "t", *args)  # later occurrences override CREATE_ARGS
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_required_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["create", str(tmp_path / "t"), "--layers", "1"])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_no_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dim", "0"], "dim is 0"),
        (["--layers", "1,1"], "duplicates"),
        (["--heads-per-ngram", "0"], "heads_per_ngram is 0"),
        (["--chunk-rows", "0"], "chunk_rows"),
    ],
    ids=repr,
)
def test_invalid_layouts_exit_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert _create(tmp_path / "t", *args) == 2
    assert message in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def test_console_entry_point(tmp_path: Path) -> None:
    """The real process: `python -m memstore create` then the installed `memstore info`."""
    path = tmp_path / "t"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    created = subprocess.run(
        [sys.executable, "-m", "memstore", "create", str(path), *CREATE_ARGS, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert f"fingerprint: {fingerprint(LAYOUT, 0)}" in created.stdout

    script = Path(sys.executable).with_name("memstore")
    info_cmd = [str(script)] if script.exists() else [sys.executable, "-m", "memstore"]
    info = subprocess.run(
        [*info_cmd, "info", str(path), "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["fingerprint"] == fingerprint(LAYOUT, 0)

    failed = subprocess.run(
        [*info_cmd, "info", str(tmp_path / "nowhere")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 2
    assert "not a memstore table" in failed.stderr


def test_create_with_an_optimizer_records_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t"
    assert _create(path, "--optimizer", "rowwise_adagrad", "--lr", "0.05", "--initial-accumulator", "0.1") == 0
    assert "optimizer: rowwise_adagrad (lr 0.05" in capsys.readouterr().out
    optimizer = Manifest.read(path).optimizer
    assert optimizer is not None and optimizer.kind.value == "rowwise_adagrad" and optimizer.lr == 0.05
    assert (path / "layer_1.sum.f32").stat().st_size == LAYOUT.num_rows(1) * 4
    assert (
        main(["create", str(tmp_path / "bad"), *CREATE_ARGS, "--no-progress", "--optimizer", "adam", "--lr", "-1"]) == 2
    )


def test_export_then_import_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "t", "--dtype", "float16") == 0
    assert main(["export", str(tmp_path / "t"), str(tmp_path / "rows.safetensors")]) == 0
    assert main(["import", str(tmp_path / "rows.safetensors"), str(tmp_path / "copy")]) == 0
    assert "imported" in capsys.readouterr().out
    for layer in LAYOUT.layer_ids:
        name = f"layer_{layer}.rows"
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()
    assert main(["import", str(tmp_path / "rows.safetensors"), str(tmp_path / "copy")]) == 2  # exists


def test_verify_checks_the_rows_against_their_recorded_sha256(tmp_path: Path, capsys) -> None:
    assert _create(tmp_path / "t") == 0
    assert main(["verify", str(tmp_path / "t"), "--no-progress"]) == 0
    assert "as recorded" in capsys.readouterr().out
    rows = tmp_path / "t" / "layer_4.rows"
    data = bytearray(rows.read_bytes())
    data[100] ^= 1  # one flipped bit
    rows.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "damaged" in capsys.readouterr().err


def test_import_with_a_manifest_for_a_file_made_elsewhere(tmp_path: Path, capsys) -> None:
    from safetensors.numpy import save_file

    layout = EngramLayout(
        layer_ids=(3,),
        vocab_size_per_ngram=(10, 10),
        max_ngram=3,
        heads_per_ngram=2,
        dim=4,
        head_sizes_override=(((7, 9), (11, 5)),),
    )
    rows = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    save_file({"layer_3": rows}, str(tmp_path / "elsewhere.safetensors"))
    (tmp_path / "manifest.json").write_text(Manifest(layout=layout, dtype=DType.FLOAT32).to_json())
    args = [
        "import",
        str(tmp_path / "elsewhere.safetensors"),
        str(tmp_path / "t"),
        "--manifest",
        str(tmp_path / "manifest.json"),
    ]
    assert main([*args, "--no-progress"]) == 0
    assert f"rows sha256: {hashlib.sha256(rows.tobytes()).hexdigest()}" in capsys.readouterr().out
    with Table.open(tmp_path / "t") as table:
        np.testing.assert_array_equal(table.gather(3, np.arange(32)), rows)
    assert main(["verify", str(tmp_path / "t"), "--no-progress"]) == 0


# --------------------------------------------------------------------------- sharded tables


def _shard_line(shard: Path) -> str:
    """What info and create print about one shard: its partitions and the rows it stores."""
    manifest = Manifest.read(shard)
    sharding = manifest.sharding
    partitions = f"partitions {sharding.partitions[0]}-{sharding.partitions[-1]} of {sharding.num_partitions}"
    stored = ", ".join(f"{manifest.stored_rows(layer):,} stored rows of layer {layer}" for layer in LAYOUT.layer_ids)
    return f"shard {sharding.shard} of {sharding.num_shards}, {partitions}, {stored}"


def test_create_shards_prints_each_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t"
    assert _create(path, "--shards", "3", "--partitions", "8") == 0
    out = capsys.readouterr().out
    shards = [path / f"shard-{k}" for k in range(3)]
    assert out.startswith(f"created {path}: 3 shards of 8 partitions\n{describe_table(Manifest(layout=LAYOUT))}\n")
    assert out.endswith("".join(f"{shard}: {_shard_line(shard)}\n" for shard in shards))
    assert "shard 1 of 3, partitions 3-5 of 8, 96 stored rows of layer 1, 108 stored rows of layer 4" in out
    assert sorted(p.name for p in path.iterdir()) == ["shard-0", "shard-1", "shard-2"]


def test_partitions_need_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "t", "--partitions", "8") == 2
    assert "give --shards N" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_info_of_a_shard_and_of_a_sharded_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t"
    assert _create(path, "--shards", "3", "--partitions", "8", "--optimizer", "adam") == 0
    capsys.readouterr()
    assert main(["info", str(path / "shard-1")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(describe_table(Manifest.read(path / "shard-1")) + "\nmaterialised: ")
    assert f"\n{_shard_line(path / 'shard-1')}\n" in out
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sharded table: 3 shards of 8 partitions\n")
    for k in range(3):
        assert f"\nshard-{k}: {_shard_line(path / f'shard-{k}')}\nmaterialised: " in out
    assert main(["info", str(path), "--json"]) == 0
    manifests = json.loads(capsys.readouterr().out)
    assert [m["sharding"]["shard"] for m in manifests] == [0, 1, 2]


def test_verify_checks_every_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t"
    assert _create(path, "--shards", "3", "--partitions", "8") == 0
    assert main(["verify", str(path), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("as recorded") == 3
    rows = path / "shard-2" / "layer_1.rows"
    data = bytearray(rows.read_bytes())
    data[5] ^= 1
    rows.write_bytes(bytes(data))
    assert main(["verify", str(path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("as recorded") == 2
    assert f"{path / 'shard-2'}: rows sha256" in captured.err and "damaged" in captured.err


def test_reshard_prints_the_checksum_both_sides_agree_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from memstore.reshard import table_checksum

    source, dest = tmp_path / "t", tmp_path / "u"
    assert _create(source, "--shards", "2", "--partitions", "8", "--optimizer", "adam") == 0
    capsys.readouterr()
    assert main(["reshard", str(source), str(dest), "--shards", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    checksum = table_checksum(dest)
    assert checksum == table_checksum(source)
    into = f"into {dest} (3 shards of 8 partitions): {LAYOUT.total_rows:,} rows in "
    assert out.startswith(f"resharded {source} (2 shards) {into}")
    for k in range(3):
        assert f"{dest / f'shard-{k}'}: {_shard_line(dest / f'shard-{k}')}\n" in out
    assert f"checksum of all rows: {checksum.rows} (source and destination agree)\n" in out
    assert f"checksum of the optimizer state: {checksum.state} (source and destination agree)\n" in out
    assert "optimizer steps carried over: layer 1 at step 0, layer 4 at step 0" in out
    assert main(["verify", str(dest), "--no-progress"]) == 0
    assert main(["reshard", str(source), str(dest), "--shards", "1", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_refuses_a_sharded_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "t", "--shards", "2", "--partitions", "8") == 0
    capsys.readouterr()
    for path, what in [(tmp_path / "t", "a sharded table"), (tmp_path / "t" / "shard-1", "shard 1 of 2")]:
        assert main(["export", str(path), str(tmp_path / "rows.safetensors")]) == 2
        assert f"{path} is {what}; export writes whole tables: reshard it to one shard first" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_import_never_writes_a_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "plain") == 0
    assert _create(tmp_path / "sharded", "--shards", "2", "--partitions", "8") == 0
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "rows.safetensors")]) == 0
    capsys.readouterr()
    shard_manifest = str(tmp_path / "sharded" / "shard-0" / "manifest.json")
    args = ["import", str(tmp_path / "rows.safetensors"), str(tmp_path / "t"), "--manifest", shard_manifest]
    assert main([*args, "--no-progress"]) == 2
    assert "describes shard 0 of 2" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_health_of_a_serving_daemon_process(table_path: Path) -> None:
    """The real pair: `memstore serve` in a process, `python -m memstore health` against it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with daemon_process(table_path) as address:
        checked = subprocess.run(
            [sys.executable, "-m", "memstore", "health", address, "--timeout", "10"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"{address}: SERVING\n"


def test_health_of_each_service_and_of_a_draining_server(table, capsys: pytest.CaptureFixture[str]) -> None:
    servicer = health.HealthServicer()
    server, port = create_server(table, "127.0.0.1:0", health_servicer=servicer)
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        assert main(["health", address, "--service", SERVICE_NAME]) == 0
        assert capsys.readouterr().out == f"{address}: SERVING\n"
        assert main(["health", address, "--service", "no.such.Service"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        servicer.enter_graceful_shutdown()  # what `memstore serve` does on SIGTERM, before draining
        assert main(["health", address]) == 1
        assert capsys.readouterr().out == f"{address}: NOT_SERVING\n"
    finally:
        server.stop(grace=None).wait()


def test_health_of_a_closed_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["health", f"127.0.0.1:{port}", "--timeout", "10"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_health_of_a_silent_listener_exits_1_at_the_deadline(capsys: pytest.CaptureFixture[str]) -> None:
    """A socket that accepts connections but never answers (a hung process): the deadline ends the check."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        start = time.monotonic()
        assert main(["health", f"127.0.0.1:{sock.getsockname()[1]}", "--timeout", "0.5"]) == 1
        assert time.monotonic() - start < 5
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_health_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "127.0.0.1:1", "--timeout", "0"]) == 2
    assert "--timeout-s must be positive" in capsys.readouterr().err


def test_serve_with_tokens_metrics_and_json_logs(table_path: Path, tmp_path: Path, capsys) -> None:
    """`memstore serve --token-file --metrics-port --log-format json`: the token guards the table,
    Prometheus scrapes the port, `memstore stats` prints the same counts, every log line is JSON."""
    tokens = tmp_path / "tokens"
    tokens.write_text("read a-read-token-of-length\n")
    tokens.chmod(0o600)  # a token file others may read is refused
    with socket.socket() as sock:  # a free port for the metrics endpoint
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    args = ["--token-file", str(tokens), "--metrics-port", str(metrics_port), "--log-format", "json"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEMSTORE_TOKEN": ""}
    process, address = start_daemon(table_path, args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert main(["stats", address]) == 2  # no token
        assert "bearer token is required" in capsys.readouterr().err
        with MemstoreClient(address, ClientConfig(same_host=False, token="a-read-token-of-length")) as client:
            for _ in range(3):
                client.lookup(1, np.arange(10))
        assert main(["stats", address, "--token-file", str(tokens)]) == 0
        printed = capsys.readouterr().out
        assert "memstore_rows_served_total" in printed and " 30" in printed
        assert re.search(r"^DataPlaneLookup\s+3\b", printed, re.MULTILINE), printed  # the data plane, by default
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert 'memstore_requests_total{code="OK",method="DataPlaneLookup"} 3.0' in scraped
        assert 'memstore_requests_total{code="UNAUTHENTICATED",method="Stats"}' not in scraped  # refused before
    finally:
        assert stop_daemon(process) == 0
    lines = [json.loads(line) for line in process.stderr.read().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(line["message"].startswith("serving ") for line in lines)
    assert any("metrics at http://127.0.0.1:" in line["message"] for line in lines)


def _serve_must_fail(table_path: Path, tmp_path: Path, *args: str) -> str:
    """Run `memstore serve` expecting it to refuse to start: its stderr, once it exited 2. Fails (instead
    of waiting forever) as soon as it writes its port file, i.e. serves."""
    port_file = tmp_path / "started.port"
    command = [sys.executable, "-m", "memstore", "serve", str(table_path), "--port-file", str(port_file), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not port_file.exists(), f"memstore serve {' '.join(args)} started serving"
        assert process.poll() is not None, "memstore serve neither served nor exited"
    finally:
        process.kill()
        stderr = process.communicate()[1]
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    return stderr


def test_serve_refuses_a_port_another_daemon_serves(table_path: Path, tmp_path: Path) -> None:
    """Two daemons on one port would share it (SO_REUSEPORT), clients reaching either table at random."""
    other = make_table(tmp_path / "other", seed=1)
    with daemon_process(other) as address:
        stderr = _serve_must_fail(table_path, tmp_path, "--listen", address)
        assert f"cannot listen on {address}: the port is in use" in stderr
        with MemstoreClient(address, ClientConfig(same_host=False)) as client:  # the first still serves its table
            assert client.describe().seed == 1


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1", "127.0.0.1:http", ":50051"])
def test_a_listen_address_that_is_not_host_port_is_refused(listen: str) -> None:
    """gRPC would serve 127.0.0.1:99999 on port 34463 and a bare host on port 443."""
    with pytest.raises(InvalidArgumentError, match="expected HOST:PORT with a port from 0 to 65535"):
        check_listen_address(listen)
    check_listen_address("[::1]:0")
    check_listen_address("localhost:65535")
    check_listen_address("unix:/run/memstore.sock")  # a Unix socket, as tests and sidecars use


def test_serve_listen_checks_hold_in_a_process(table_path: Path, tmp_path: Path) -> None:
    stderr = _serve_must_fail(table_path, tmp_path, "--listen", "127.0.0.1:99999")
    assert "expected HOST:PORT with a port from 0 to 65535" in stderr


def test_serve_refuses_a_port_file_in_a_missing_directory(
    table_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port_file = tmp_path / "no" / "such" / "port"
    assert main(["serve", str(table_path), "--listen", "127.0.0.1:0", "--port-file", str(port_file)]) == 2
    assert f"cannot write the port file {port_file}: the directory {port_file.parent} does not exist" in (
        capsys.readouterr().err
    )


def test_serve_refuses_a_metrics_port_in_use_before_serving(table_path: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = _serve_must_fail(table_path, tmp_path, "--listen", "127.0.0.1:0", "--metrics-port", str(port))
    assert f"cannot serve metrics on 127.0.0.1:{port}" in stderr
    assert "choose another --metrics-port" in stderr


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser and every subcommand's, by name."""
    top = _parser()
    (commands,) = [action for action in top._actions if isinstance(action, argparse._SubParsersAction)]
    return {"memstore": top, **commands.choices}


@pytest.mark.parametrize("command", sorted(_all_parsers()))
def test_help_shows_the_values_enum_flags_take(command: str) -> None:
    """`--backend {Backend.MMAP,Backend.LMDB}` told users to type what the flag refuses."""
    shown = _all_parsers()[command].format_help()
    assert not re.search(r"\b[A-Z][A-Za-z]+\.[A-Z][A-Z_]+\b", shown), shown


def test_enum_flags_take_and_list_their_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(tmp_path / "t", "--backend", "lmdb", "--optimizer", "adam") == 0
    manifest = Manifest.read(tmp_path / "t")
    assert manifest.backend.value == "lmdb" and manifest.optimizer.kind.value == "adam"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        _create(tmp_path / "u", "--backend", "mmapp")
    assert exited.value.code == 2
    assert "invalid choice 'mmapp' (choose from mmap, lmdb)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--lr", "0.1"], "--lr set an optimizer's hyperparameters, but no --optimizer is given"),
        (["--eps", "1e-6", "--betas", "0.8,0.9"], "--betas, --eps set an optimizer's hyperparameters"),
        (["--optimizer", "sgd", "--betas", "0.8,0.9"], "--betas does not apply to --optimizer sgd (only to adam)"),
        (["--optimizer", "sgd", "--eps", "1e-6"], "--eps does not apply to --optimizer sgd"),
        (["--optimizer", "adam", "--initial-accumulator", "0.1"], "--initial-accumulator does not apply to"),
    ],
    ids=["lr", "eps-betas", "sgd-betas", "sgd-eps", "adam-accumulator"],
)
def test_optimizer_flags_that_would_be_ignored_are_refused(
    tmp_path: Path, flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`create --lr 0.1` without --optimizer made a frozen table, the learning rate silently dropped."""
    assert _create(tmp_path / "t", *flags) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_optimizer_defaults_apply_when_flags_are_left_out(tmp_path: Path) -> None:
    assert _create(tmp_path / "t", "--optimizer", "adagrad", "--lr", "0.5") == 0
    recorded = Manifest.read(tmp_path / "t").optimizer
    assert recorded == OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.5)


@pytest.mark.parametrize("flag", [["--max-lag", "3"], ["--follow-token-file", "tokens"], ["--follow-tls-ca", "ca"]])
def test_replica_flags_without_follow_are_refused(table_path: Path, tmp_path: Path, flag: list[str]) -> None:
    stderr = _serve_must_fail(table_path, tmp_path, "--listen", "127.0.0.1:0", *flag)
    assert f"{flag[0]} configure a replica and need --follow PRIMARY" in stderr


def test_health_of_an_address_with_a_port_past_65535_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "127.0.0.1:99999", "--timeout", "10"]) == 2
    assert "'127.0.0.1:99999' is not a daemon's address" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["stats", "health"])
@pytest.mark.parametrize("seconds", ["nan", "inf", "0"])
def test_a_timeout_grpc_cannot_keep_is_refused(command: str, seconds: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "127.0.0.1:1", "--timeout", seconds]) == 2
    assert "--timeout-s must be positive" in capsys.readouterr().err
