"""`memstore serve`: its flags, and the configs they become (parsed once, here)."""

from __future__ import annotations

import argparse
from pathlib import Path

from memstore.auth import ClientTls, TlsConfig, read_token
from memstore.cli_args import enum_choice
from memstore.errors import InvalidArgumentError
from memstore.integrity import IntegrityConfig
from memstore.live import LiveConfig
from memstore.logs import LogFormat
from memstore.replica import DEFAULT_MAX_LAG, FollowConfig
from memstore.service import ServerConfig, serve
from memstore.tabledir.fsafe import add_group_readable
from memstore.wal import Durability


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    """The `serve` subcommand and its flags."""
    defaults = ServerConfig()
    srv = commands.add_parser("serve", help="serve a table over gRPC until SIGTERM/Ctrl-C")
    srv.add_argument("path", type=Path)
    srv.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="host:port (default loopback only; 0.0.0.0:PORT for other hosts); port 0 picks a free one",
    )
    srv.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    srv.add_argument("--chunk-bytes", type=int, default=defaults.chunk_bytes, help="row bytes per streamed message")
    srv.add_argument("--max-workers", type=int, default=defaults.max_workers, help="threads serving calls")
    srv.add_argument("--grace", type=float, default=defaults.grace_s, help="seconds to drain calls on SIGTERM")
    srv.add_argument(
        "--log-interval", type=float, default=defaults.log_interval_s, help="seconds between traffic lines"
    )
    srv.add_argument(
        "--no-same-host", action="store_true", help="do not let clients on this host map the table's files"
    )
    srv.add_argument(
        "--read-only", action="store_true", help="refuse pushes and snapshots (e.g. a snapshot serving inference)"
    )
    srv.add_argument("--snapshot-dir", type=Path, help="where Snapshot writes (default: PATH.snapshots)")
    srv.add_argument(
        "--max-snapshots",
        type=int,
        default=defaults.max_snapshots,
        help="snapshots kept in the snapshot directory; more are refused until old ones are deleted",
    )
    add_group_readable(srv)
    srv.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics, HOST the --metrics-host (0: a free port)",
    )
    srv.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="the address the metrics endpoint listens on (default 127.0.0.1; it is plain HTTP without tokens, "
        "so give another only where the network is trusted)",
    )
    srv.add_argument(
        "--log-format",
        **enum_choice(LogFormat),
        default=argparse.SUPPRESS,  # `memstore --log-format json serve ...` works as well
        help="json: one JSON object per log line (time, level, logger, message), for log collectors",
    )
    _add_durability(srv)
    _add_limits(srv, defaults)
    _add_security(srv)
    _add_replication(srv, defaults)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; the exit code."""
    tls = None
    if args.tls_cert is not None or args.tls_key is not None:
        if args.tls_cert is None or args.tls_key is None:
            raise InvalidArgumentError("--tls-cert and --tls-key go together")
        tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    elif args.tls_client_ca is not None:
        raise InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)")
    config = ServerConfig(
        max_rows_per_request=args.max_rows_per_request,
        chunk_bytes=args.chunk_bytes,
        max_workers=args.max_workers,
        grace_s=args.grace,
        log_interval_s=args.log_interval,
        same_host=not args.no_same_host,
        snapshot_dir=args.snapshot_dir,
        max_snapshots=args.max_snapshots,
        max_followers=args.max_followers,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_calls=args.max_concurrent_calls,
        max_in_flight_bytes=args.max_in_flight_bytes,
        max_calls_per_peer=args.max_calls_per_peer,
        request_timeout_s=args.request_timeout,
        send_timeout_s=args.send_timeout,
        tls=tls,
        token_file=args.token_file,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    live = LiveConfig(
        durability=args.durability,
        checkpoint_every=args.checkpoint_every,
        feed_bytes=int(args.feed_mb * 2**20),
        accept_data_loss=args.accept_data_loss,
        integrity=IntegrityConfig(enabled=not args.no_integrity, scrub_period_s=args.scrub_period),
    )
    _check_follow_flags(args)
    follow = None
    if args.follow is not None:
        # A replica shows the primary its own certificate (if it has one) and the follow token.
        primary_tls = None
        if args.follow_tls_ca is not None:
            primary_tls = ClientTls(args.follow_tls_ca, args.tls_cert, args.tls_key)
        max_lag = DEFAULT_MAX_LAG if args.max_lag is None else args.max_lag
        follow = FollowConfig(max_lag=max_lag, tls=primary_tls, token=read_token(args.follow_token_file))
    return serve(
        args.path,
        args.listen,
        config,
        args.port_file,
        read_only=args.read_only,
        live_config=live,
        follow=args.follow,
        follow_config=follow,
    )


def _check_follow_flags(args: argparse.Namespace) -> None:
    """InvalidArgumentError for a replication flag given without --follow (it would be ignored)."""
    if args.follow is not None:
        return
    given = [
        flag
        for flag, value in (
            ("--max-lag", args.max_lag),
            ("--follow-tls-ca", args.follow_tls_ca),
            ("--follow-token-file", args.follow_token_file),
        )
        if value is not None
    ]
    if given:
        raise InvalidArgumentError(
            f"{', '.join(given)} configure a replica and need --follow PRIMARY; without it this daemon is a "
            "primary (or a frozen table) and would ignore them"
        )


def _add_durability(srv: argparse.ArgumentParser) -> None:
    live = LiveConfig()
    srv.add_argument(
        "--durability",
        **enum_choice(Durability),
        default=live.durability,
        help="fsync: a push is acknowledged once its log record is on disk (survives power loss); "
        "os: once the OS has it (survives the daemon's crash, not the host's)",
    )
    srv.add_argument("--checkpoint-every", type=int, default=live.checkpoint_every, help="pushes between checkpoints")
    srv.add_argument(
        "--scrub-period",
        type=float,
        default=live.integrity.scrub_period_s,
        metavar="SECONDS",
        help="verify every row against its checksum again within this period (0: only on first read); damage "
        "answers DATA_LOSS for its rows and turns health NOT_SERVING",
    )
    srv.add_argument(
        "--no-integrity",
        action="store_true",
        help="do not keep or check row checksums (removes a writable table's; a later checked start rebuilds them)",
    )
    srv.add_argument(
        "--feed-mb",
        type=float,
        default=live.feed_bytes / 2**20,
        metavar="MB",
        help="recent pushes kept in memory for followers; a follower further behind reads this daemon's log "
        "(the pushes since its last checkpoint), and past that must restart from a snapshot",
    )
    srv.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="serve even when acknowledged pushes cannot be accounted for (log cut or deleted, checkpoint.json "
        "lost or damaged), logging what was lost; the version skips past the lost ones, so replicas that saw them "
        "must be re-seeded. Without it such a table refuses to start (docs/operations.md)",
    )


def _add_limits(srv: argparse.ArgumentParser, defaults: ServerConfig) -> None:
    group = srv.add_argument_group("limits (a call past one fails with RESOURCE_EXHAUSTED)")
    group.add_argument("--max-rows-per-request", type=int, default=defaults.max_rows_per_request)
    group.add_argument(
        "--max-message-bytes", type=int, default=defaults.max_message_bytes, help="bytes of one request message"
    )
    group.add_argument(
        "--max-concurrent-calls",
        type=int,
        default=defaults.max_concurrent_calls,
        help="calls served or queued at once (Follow streams not counted); more are refused at once",
    )
    group.add_argument(
        "--max-calls-per-peer",
        type=int,
        default=defaults.max_calls_per_peer,
        help="calls one client host may have in progress at once (0: no limit); more are refused",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout_s,
        help="seconds a call's request may take to arrive before the call is cancelled",
    )
    group.add_argument(
        "--send-timeout",
        type=float,
        default=defaults.send_timeout_s,
        help="seconds a client may leave a response message unread before its call is cancelled",
    )
    group.add_argument(
        "--max-in-flight-bytes",
        type=int,
        default=defaults.max_in_flight_bytes,
        help="memory the calls in progress may hold (requests, gathered rows, optimizer work); "
        "a call that would pass it is refused, and the client retries it shortly",
    )


def _add_security(srv: argparse.ArgumentParser) -> None:
    group = srv.add_argument_group("TLS and tokens (docs/operations.md)")
    group.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain (PEM)")
    group.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    group.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA (PEM): mutual TLS"
    )
    group.add_argument(
        "--token-file",
        type=Path,
        help="require a bearer token on every call: lines `read TOKEN` (lookups), `write TOKEN` (also pushes "
        "and snapshots) or `replicate TOKEN` (lookups and Follow, for replicas); health checks need none; the "
        "file must not be readable by group or others",
    )


def _add_replication(srv: argparse.ArgumentParser, defaults: ServerConfig) -> None:
    group = srv.add_argument_group("replication (docs/replication.md)")
    group.add_argument(
        "--follow",
        metavar="ADDRESS",
        help="serve PATH as a read replica of the daemon at ADDRESS (host:port): stream and apply its pushes, "
        "refuse pushes here; PATH must be a copy of the primary's table (a snapshot of it, a copy of its "
        "directory, or an identical `memstore create`)",
    )
    group.add_argument(
        "--max-lag",
        type=int,
        metavar="VERSIONS",
        help="with --follow: answer lookups (and report SERVING) only while at most this many versions behind "
        f"the primary; above it lookups fail with UNAVAILABLE so clients retry elsewhere (default {DEFAULT_MAX_LAG})",
    )
    group.add_argument(
        "--follow-tls-ca",
        type=Path,
        help="with --follow: connect to the primary with TLS, trusting this CA (--tls-cert/--tls-key, if given, "
        "are shown to it as this replica's client certificate)",
    )
    group.add_argument(
        "--follow-token-file",
        type=Path,
        help="with --follow: a file holding the token to show the primary (a `replicate TOKEN` of its --token-file)",
    )
    group.add_argument(
        "--max-followers",
        type=int,
        default=defaults.max_followers,
        help="followers streaming at once (each holds a worker thread of its own, on top of --max-workers)",
    )
