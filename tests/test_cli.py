"""The `memstore` command line: create and info in process, bad arguments, and the real
console entry point in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memstore.cli import describe_table, main
from memstore.dtypes import DType
from memstore.layout import EngramLayout, fingerprint
from memstore.manifest import Manifest
from memstore.table import Table

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
