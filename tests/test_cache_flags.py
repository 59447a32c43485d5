"""The device cache's command-line flags (model/cache_flags.py): parsed once into a CacheConfig, bad values
and contradictions refused as usage errors before any work."""

from __future__ import annotations

import argparse

import pytest

from client.cache import CacheConfig, CachePolicy
from model.cache_flags import add_cache_arguments, cache_config_from_args


def _parse(argv: list[str], generation_only: bool = False) -> CacheConfig | None:
    parser = argparse.ArgumentParser()
    add_cache_arguments(parser)
    return cache_config_from_args(parser.parse_args(argv), parser, generation_only=generation_only)


def test_no_size_means_no_cache() -> None:
    assert _parse([]) is None


def test_flags_become_one_cache_config() -> None:
    assert _parse(["--cache-rows", "4096"]) == CacheConfig(policy=CachePolicy.LRU, max_rows=4096, max_bytes=None)
    config = _parse(["--cache-bytes", "64MiB", "--cache-rows", "1000", "--cache-policy", "tinylfu"], True)
    assert config == CacheConfig(policy=CachePolicy.TINYLFU, max_rows=1000, max_bytes=64 << 20, generation_only=True)
    assert _parse(["--cache-bytes", "1.5k", "--cache-policy", "lfu"]).max_bytes == 1536


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cache-rows", "0"], "--cache-rows must be at least 1; got 0"),
        (["--cache-bytes", "0"], "--cache-bytes must be at least 1; got 0"),
        (["--cache-rows", "ten"], "argument --cache-rows: invalid int value: 'ten'"),
        (["--cache-bytes", "12Q"], "argument --cache-bytes: expected a size in bytes"),
        (
            ["--cache-rows", "9", "--cache-policy", "mru"],
            "invalid choice 'mru' (choose from lru, lfu, tinylfu, static)",
        ),
        (["--cache-rows", "9", "--cache-policy", "static"], "--cache-policy static needs its hot set given up front"),
        (["--cache-policy", "lfu"], "--cache-policy set up the device cache: give its size"),
        (["--cache-max-lag", "2"], "--cache-max-lag set up the device cache: give its size"),
        (["--cache-rows", "9", "--cache-max-lag", "-1"], "--cache-max-lag must be at least 0; got -1"),
    ],
)
def test_bad_values_are_usage_errors(capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_max_lag_reaches_the_cache_config() -> None:
    assert _parse(["--cache-rows", "9", "--cache-max-lag", "3"]).cache_max_lag == 3
    assert _parse(["--cache-rows", "9"]).cache_max_lag == CacheConfig().cache_max_lag == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "local", "--cache-rows", "64"], "--cache-rows: the device cache sits in front of a memstore"),
        (["--source", "none", "--cache-bytes", "1M"], "--cache-bytes: the device cache sits in front of a memstore"),
        (
            ["--source", "memstore", "--memstore", "127.0.0.1:1", "--no-prefetch", "--cache-rows", "64"],
            "the device cache lives in the prefetcher; drop --no-prefetch",
        ),
        (
            ["--source", "memstore", "--memstore", "127.0.0.1:1", "--cache-rows", "-3"],
            "--cache-rows must be at least 1",
        ),
    ],
)
def test_train_refuses_a_cache_it_cannot_use_before_any_work(tmp_path, capsys, argv, message) -> None:
    from model import train as train_cli

    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*argv, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_generate_refuses_a_cache_for_local_tables_before_any_work(tmp_path, capsys) -> None:
    from model import generate as generate_cli

    argv = ["--checkpoint", str(tmp_path / "c.pt"), "--source", "local", "--cache-rows", "64"]
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main([*argv, "--data-dir", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    assert "the device cache sits in front of a memstore table" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
