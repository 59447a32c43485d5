"""DaemonConfig and the `memstore serve` flags that become one: every flag lands in its field, every
old spelling in the same field with the same value, sizes and durations parse once with clear errors,
unknown flags and fields are refused."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memstore.auth import ClientTls, TlsConfig
from memstore.cli import _parser, main
from memstore.cli_args import format_bytes, parse_bytes
from memstore.cli_serve import daemon_config
from memstore.daemon_config import DaemonConfig, ServerConfig
from memstore.errors import InvalidArgumentError
from memstore.integrity import IntegrityConfig
from memstore.live import LiveConfig
from memstore.membership import MembershipConfig
from memstore.replica import FollowConfig
from memstore.reseed import ReseedPolicy
from memstore.rowcache import RowCacheConfig
from memstore.sync import SyncConfig, SyncTimeoutPolicy
from memstore.wal import Durability

TOKEN = "a-replicate-token-of-length"


def _serve_parser() -> argparse.ArgumentParser:
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["serve"]


def _config(*flags: str, path: str = "/tables/t") -> DaemonConfig:
    return daemon_config(_parser().parse_args(["serve", path, *flags]))


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSTORE_TOKEN", raising=False)  # a replica's token falls back to it


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "follow-token"
    path.write_text(f"{TOKEN}\n")
    path.chmod(0o600)
    return path


# Every flag of `memstore serve` (its current spelling), a value other than the default, and where
# it lands. Flags that need another flag beside them give it too.
FLAGS: list[tuple[list[str], Callable[[DaemonConfig], Any], Any]] = [
    (["--read-only"], lambda c: c.read_only, True),
    (["--snapshot-dir", "/snaps"], lambda c: c.server.snapshot_dir, Path("/snaps")),
    (["--max-snapshots", "3"], lambda c: c.server.max_snapshots, 3),
    (["--group-readable"], lambda c: c.group_readable, True),
    (["--listen", "0.0.0.0:6000"], lambda c: c.listen, "0.0.0.0:6000"),
    (["--port-file", "/run/port"], lambda c: c.port_file, Path("/run/port")),
    (["--chunk-bytes", "256KiB"], lambda c: c.server.chunk_bytes, 256 << 10),
    (["--max-workers", "3"], lambda c: c.server.max_workers, 3),
    (["--grace-s", "2.5"], lambda c: c.grace_s, 2.5),
    (["--no-same-host"], lambda c: c.server.same_host, False),
    (["--no-data-plane"], lambda c: c.server.data_plane, None),
    (["--data-plane-listen", "0.0.0.0:7000"], lambda c: c.server.data_plane.listen, "0.0.0.0:7000"),
    (["--data-plane-advertise", "h:7001"], lambda c: c.server.data_plane.advertise, "h:7001"),
    (["--data-plane-ticket-s", "60"], lambda c: c.server.data_plane.ticket_s, 60.0),
    (["--data-plane-max-connections", "5"], lambda c: c.server.data_plane.max_connections, 5),
    (["--data-plane-chunk-bytes", "256KiB"], lambda c: c.server.data_plane.chunk_bytes, 256 << 10),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], lambda c: c.server.tls, TlsConfig(Path("c.pem"), Path("k.pem"))),
    (
        ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"],
        lambda c: c.server.tls,
        TlsConfig(Path("c.pem"), Path("k.pem"), Path("ca.pem")),
    ),
    (["--token-file", "/etc/tokens"], lambda c: c.server.token_file, Path("/etc/tokens")),
    (["--durability", "os"], lambda c: c.live.durability, Durability.OS),
    (["--checkpoint-every", "7"], lambda c: c.live.checkpoint_every, 7),
    (["--scrub-period-s", "30"], lambda c: c.live.integrity, IntegrityConfig(scrub_period_s=30.0)),
    (["--no-integrity"], lambda c: c.live.integrity, IntegrityConfig(enabled=False)),
    (["--accept-data-loss"], lambda c: c.live.accept_data_loss, True),
    (["--follow", "primary:50051"], lambda c: (c.primary, c.follow), ("primary:50051", FollowConfig())),
    (["--follow", "p:1", "--max-lag", "9"], lambda c: c.follow, FollowConfig(max_lag=9)),
    (["--follow", "p:1", "--follow-tls-ca", "ca.pem"], lambda c: c.follow_config.tls, ClientTls(Path("ca.pem"))),
    (["--follow", "p:1", "--reseed", "never"], lambda c: c.reseed, ReseedPolicy.NEVER),
    (["--max-followers", "2"], lambda c: c.server.max_followers, 2),
    (["--etcd", "e:2379", "--cluster-name", "t"], lambda c: c.membership, MembershipConfig(("e:2379",), "t")),
    (
        ["--etcd", "e:1", "--cluster-name", "t", "--advertise", "h:5", "--etcd-ttl-s", "4"],
        lambda c: c.membership,
        MembershipConfig(("e:1",), "t", advertise="h:5", ttl_s=4),
    ),
    (
        ["--etcd", "e:1", "--cluster-name", "t", "--failover"],
        lambda c: c.membership,
        MembershipConfig(("e:1",), "t", election=True),
    ),
    (["--max-row-watchers", "3"], lambda c: c.server.max_row_watchers, 3),
    (["--feed-bytes", "8MiB"], lambda c: c.live.feed_bytes, 8 << 20),
    (["--sync-replicas", "2"], lambda c: c.live.sync, SyncConfig(replicas=2)),
    (["--sync-replicas", "1", "--sync-timeout-s", "2"], lambda c: c.live.sync.timeout_s, 2.0),
    (
        ["--sync-replicas", "1", "--sync-timeout-policy", "degrade"],
        lambda c: c.live.sync.policy,
        SyncTimeoutPolicy.DEGRADE,
    ),
    (["--max-rows-per-request", "1000"], lambda c: c.server.max_rows_per_request, 1000),
    (["--max-message-bytes", "2MiB"], lambda c: c.server.max_message_bytes, 2 << 20),
    (["--max-concurrent-calls", "5"], lambda c: c.server.max_concurrent_calls, 5),
    (["--max-calls-per-peer", "0"], lambda c: c.server.max_calls_per_peer, 0),
    (["--request-timeout-s", "4"], lambda c: c.server.request_timeout_s, 4.0),
    (["--send-timeout-s", "6"], lambda c: c.server.send_timeout_s, 6.0),
    (["--max-in-flight-bytes", "3GiB"], lambda c: c.server.max_in_flight_bytes, 3 << 30),
    (["--row-cache-bytes", "4G"], lambda c: c.live.row_cache, RowCacheConfig(bytes=4 << 30)),
    (["--row-cache-bytes", "512KiB"], lambda c: c.live.row_cache.bytes, 512 << 10),
    (["--metrics-port", "9100"], lambda c: c.observability.metrics_port, 9100),
    (["--metrics-host", "0.0.0.0"], lambda c: c.observability.metrics_host, "0.0.0.0"),
    (["--log-interval-s", "5"], lambda c: c.observability.log_interval_s, 5.0),
]

# Old spelling -> (new spelling, value given to each): the same field must get the same value.
RENAMED = {
    "--grace": ("--grace-s", "3", "3"),
    "--log-interval": ("--log-interval-s", "0.5", "0.5"),
    "--scrub-period": ("--scrub-period-s", "120", "120"),
    "--request-timeout": ("--request-timeout-s", "2", "2"),
    "--send-timeout": ("--send-timeout-s", "9", "9"),
    "--feed-mb": ("--feed-bytes", "0.5", "512KiB"),  # --feed-mb counted MiB
}
# Flags that reach no DaemonConfig field: help, and the log format main() applies to every command.
PROCESS_FLAGS = {"-h", "--help", "--log-format"}


def _visible_flags() -> set[str]:
    parser = _serve_parser()
    return {
        option for action in parser._actions if action.help is not argparse.SUPPRESS for option in action.option_strings
    }


def _hidden_flags() -> set[str]:
    parser = _serve_parser()
    return {
        option for action in parser._actions if action.help is argparse.SUPPRESS for option in action.option_strings
    }


@pytest.mark.parametrize(("flags", "field", "expected"), FLAGS, ids=[" ".join(f[0]) for f in FLAGS])
def test_each_flag_lands_in_its_field(flags: list[str], field: Callable[[DaemonConfig], Any], expected: Any) -> None:
    assert field(_config(*flags)) == expected
    assert field(_config()) != expected, "the value the test gives is the default: it shows nothing"


def test_every_flag_is_mapped() -> None:
    """A flag added to `memstore serve` without a line in FLAGS (and so without a checked field) fails here."""
    mapped = {flag for flags, _, _ in FLAGS for flag in flags if flag.startswith("--")}
    assert _visible_flags() - PROCESS_FLAGS == mapped | {"--follow-token-file"}  # its own test: it reads a file


def test_the_defaults_are_the_configs_defaults() -> None:
    assert _config() == DaemonConfig(Path("/tables/t"))


def test_follow_token_file_lands_in_the_follow_config(token_file: Path) -> None:
    config = _config("--follow", "p:1", "--follow-token-file", str(token_file))
    assert config.follow == FollowConfig(token=TOKEN)


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_spelling_sets_the_same_field_to_the_same_value(old: str) -> None:
    new, old_value, new_value = RENAMED[old]
    by_old, by_new = _config(old, old_value), _config(new, new_value)
    assert by_old == by_new
    assert by_old != _config(), "the value the test gives is the default: it shows nothing"


def test_every_hidden_flag_is_a_tested_old_spelling() -> None:
    assert _hidden_flags() == set(RENAMED)
    assert {new for new, _, _ in RENAMED.values()} <= _visible_flags()


def test_help_names_each_old_spelling_beside_its_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapped inside a flag's name
    shown = _serve_parser().format_help()
    for old, (new, _, _) in RENAMED.items():
        assert f"(formerly {old})" in shown
        assert new in shown


@pytest.mark.parametrize("command", ["health", "stats"])
def test_remote_timeout_old_spelling(command: str) -> None:
    by_old = _parser().parse_args([command, "127.0.0.1:1", "--timeout", "2.5"])
    by_new = _parser().parse_args([command, "127.0.0.1:1", "--timeout-s", "2.5"])
    assert by_old.timeout_s == by_new.timeout_s == 2.5


def test_help_groups_the_flags() -> None:
    titles = [group.title for group in _serve_parser()._action_groups]
    for title in ("table", "network", "security", "durability", "replication", "limits", "observability"):
        assert any(t and t.startswith(title) for t in titles), f"no {title!r} group in {titles}"


# ---- units -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1 << 20),
        ("0", 0),
        ("512KiB", 512 << 10),
        ("64M", 64 << 20),
        ("64mb", 64 << 20),
        ("64MiB", 64 << 20),
        ("1.5GiB", 3 << 29),
        ("2T", 2 << 40),
        ("100B", 100),
        ("0.5k", 512),
    ],
)
def test_sizes_parse_in_powers_of_1024(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("size", [1, 1000, 1 << 10, 3 << 20, 64 << 20, 1 << 30, 5 << 40, (1 << 20) + 1])
def test_sizes_shown_in_help_read_back(size: int) -> None:
    assert parse_bytes(format_bytes(size)) == size


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--feed-bytes", "lots", "argument --feed-bytes: expected a size in bytes, like 1048576, 512KiB"),
        ("--max-in-flight-bytes", "-1", "argument --max-in-flight-bytes: expected a size in bytes"),
        ("--chunk-bytes", "64XB", "argument --chunk-bytes: expected a size in bytes"),
        ("--max-message-bytes", "1.5", "argument --max-message-bytes: '1.5' is not a whole number of bytes"),
        ("--feed-mb", "many", "argument --feed-mb: expected a number of MiB, like 64 or 0.5"),
        ("--grace-s", "10s", "argument --grace-s: invalid float value: '10s'"),
    ],
)
def test_a_malformed_unit_is_an_argparse_error_naming_the_flag(
    flag: str, value: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "/tables/t", flag, value])
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--grace-s", "-5"], "DaemonConfig.grace_s must be in [0, 86400] seconds; got -5.0"),
        (["--log-interval", "0"], "ObservabilityConfig.log_interval_s must be in (0, 86400] seconds; got 0.0"),
        (["--chunk-bytes", "0"], "ServerConfig.chunk_bytes must be at least 1; got 0"),
        (["--scrub-period-s", "nan"], "scrub period must be 0 (off) or a positive number; got nan"),
        (["--listen", "127.0.0.1:99999"], "expected HOST:PORT with a port from 0 to 65535"),
    ],
)
def test_values_out_of_range_are_refused_before_the_table_is_opened(
    tmp_path: Path, flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path / "no-table"), *flags]) == 2  # the table is never looked for
    err = capsys.readouterr().err
    assert said in err and "no-table" not in err


# ---- unknown keys, and what goes together -----------------------------------------------------------


def test_unknown_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "/tables/t", "--feed-gb", "1"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --feed-gb 1" in capsys.readouterr().err


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'feed_mb'"):
        DaemonConfig(Path("t"), feed_mb=64)  # type: ignore[call-arg]


def test_follow_settings_need_a_primary() -> None:
    with pytest.raises(InvalidArgumentError, match="DaemonConfig.follow configures a replica and needs"):
        DaemonConfig(Path("t"), follow=FollowConfig(max_lag=3))
    assert DaemonConfig(Path("t"), primary="p:1").follow_config == FollowConfig()
    with pytest.raises(InvalidArgumentError, match="DaemonConfig.primary is empty"):
        DaemonConfig(Path("t"), primary="")


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"server": LiveConfig()}, "DaemonConfig.server takes ServerConfig, not LiveConfig"),
        ({"live": ServerConfig()}, "DaemonConfig.live takes LiveConfig, not ServerConfig"),
        ({"observability": ServerConfig()}, "DaemonConfig.observability takes ObservabilityConfig, not ServerConfig"),
        ({"follow": LiveConfig(), "primary": "p:1"}, "DaemonConfig.follow takes FollowConfig or None, not LiveConfig"),
        ({"listen": "localhost"}, "cannot listen on 'localhost': expected HOST:PORT"),
    ],
)
def test_parts_of_the_wrong_kind_are_refused(fields: dict[str, Any], said: str) -> None:
    with pytest.raises(InvalidArgumentError, match=said.replace("(", r"\(")):
        DaemonConfig(Path("t"), **fields)


def test_paths_given_as_text_become_paths() -> None:
    config = DaemonConfig("t", port_file="p")  # type: ignore[arg-type]
    assert config.table == Path("t") and config.port_file == Path("p")
