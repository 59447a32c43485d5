"""`memstore serve`: its flags, and the DaemonConfig they become (parsed once, here).

Units: sizes are `-bytes` flags taking bytes or a binary unit (`64MiB`, memstore.cli_args.parse_bytes),
durations are `-s` flags taking seconds; counts name what they count. A renamed flag keeps its old
spelling as a hidden alias (the table in docs/operations.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memstore.auth import ClientTls, TlsConfig, read_token
from memstore.cli_args import add_renamed, enum_choice, format_bytes, parse_bytes, parse_mebibytes
from memstore.daemon import serve
from memstore.daemon_config import DaemonConfig, DataPlaneConfig, ObservabilityConfig, ServerConfig
from memstore.errors import InvalidArgumentError
from memstore.integrity import IntegrityConfig
from memstore.live import LiveConfig
from memstore.logs import LogFormat
from memstore.membership import DEFAULT_TTL_S, MembershipConfig
from memstore.replica import FollowConfig
from memstore.reseed import ReseedPolicy
from memstore.rowcache import RowCacheConfig
from memstore.sync import SyncConfig, SyncTimeoutPolicy
from memstore.tabledir.fsafe import add_group_readable
from memstore.wal import Durability


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    """The `serve` subcommand and its flags, in groups: table, network, security, durability,
    replication, limits, observability."""
    srv = commands.add_parser("serve", help="serve a table over gRPC until SIGTERM/Ctrl-C")
    daemon, server, live = DaemonConfig(Path(".")), ServerConfig(), LiveConfig()
    _add_table(srv, server)
    _add_network(srv, daemon, server)
    _add_security(srv)
    _add_durability(srv, live)
    _add_replication(srv, server, live)
    _add_membership(srv)
    _add_limits(srv, server)
    _add_data_plane(srv, server.data_plane or DataPlaneConfig())
    _add_row_cache(srv, live.row_cache)
    _add_observability(srv, daemon.observability)


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """The DaemonConfig `memstore serve`'s parsed flags ask for; InvalidArgumentError for flags that do not
    go together (each config checks its own values and says what to change)."""
    return DaemonConfig(
        table=args.path,
        listen=args.listen,
        port_file=args.port_file,
        read_only=args.read_only,
        primary=args.follow,
        grace_s=args.grace_s,
        server=ServerConfig(
            max_rows_per_request=args.max_rows_per_request,
            chunk_bytes=args.chunk_bytes,
            max_workers=args.max_workers,
            same_host=not args.no_same_host,
            snapshot_dir=args.snapshot_dir,
            max_snapshots=args.max_snapshots,
            max_followers=args.max_followers,
            max_row_watchers=args.max_row_watchers,
            max_message_bytes=args.max_message_bytes,
            max_concurrent_calls=args.max_concurrent_calls,
            max_in_flight_bytes=args.max_in_flight_bytes,
            max_calls_per_peer=args.max_calls_per_peer,
            request_timeout_s=args.request_timeout_s,
            send_timeout_s=args.send_timeout_s,
            tls=_tls(args),
            token_file=args.token_file,
            data_plane=_data_plane(args),
        ),
        live=LiveConfig(
            durability=args.durability,
            checkpoint_every=args.checkpoint_every,
            feed_bytes=args.feed_bytes,
            accept_data_loss=args.accept_data_loss,
            integrity=IntegrityConfig(enabled=not args.no_integrity, scrub_period_s=args.scrub_period_s),
            row_cache=RowCacheConfig(bytes=args.row_cache_bytes),
            sync=_sync(args),
        ),
        follow=_follow(args),
        observability=ObservabilityConfig(
            metrics_port=args.metrics_port, metrics_host=args.metrics_host, log_interval_s=args.log_interval_s
        ),
        group_readable=args.group_readable,
        membership=_membership(args),
        reseed=ReseedPolicy.AUTO if args.reseed is None else args.reseed,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; the exit code."""
    return serve(daemon_config(args))


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if args.tls_cert is not None or args.tls_key is not None:
        if args.tls_cert is None or args.tls_key is None:
            raise InvalidArgumentError("--tls-cert and --tls-key go together")
        return TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.tls_client_ca is not None:
        raise InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)")
    return None


def _follow(args: argparse.Namespace) -> FollowConfig | None:
    """How this replica follows its primary (None without --follow); InvalidArgumentError for a
    replication flag given without --follow (it would be ignored)."""
    if args.follow is None:
        given = [
            flag
            for flag, value in (
                ("--max-lag", args.max_lag),
                ("--follow-tls-ca", args.follow_tls_ca),
                ("--follow-token-file", args.follow_token_file),
                ("--reseed", args.reseed),
            )
            if value is not None
        ]
        if given:
            raise InvalidArgumentError(
                f"{', '.join(given)} configure a replica and need --follow PRIMARY; without it this daemon is a "
                "primary (or a frozen table) and would ignore them"
            )
        return None
    # A replica shows the primary its own certificate (if it has one) and the follow token.
    primary_tls = None if args.follow_tls_ca is None else ClientTls(args.follow_tls_ca, args.tls_cert, args.tls_key)
    max_lag = FollowConfig().max_lag if args.max_lag is None else args.max_lag
    return FollowConfig(max_lag=max_lag, tls=primary_tls, token=read_token(args.follow_token_file))


def _sync(args: argparse.Namespace) -> SyncConfig:
    """Synchronous replication's flags; InvalidArgumentError for a timeout or policy without --sync-replicas."""
    if not args.sync_replicas:
        given = [
            flag
            for flag, value in (
                ("--sync-timeout-s", args.sync_timeout_s),
                ("--sync-timeout-policy", args.sync_timeout_policy),
            )
            if value is not None
        ]
        if given:
            raise InvalidArgumentError(
                f"{', '.join(given)} configure synchronous replication and need --sync-replicas N (N >= 1); "
                "without it pushes do not wait for replicas and would ignore them"
            )
        return SyncConfig(replicas=args.sync_replicas)
    defaults = SyncConfig()
    return SyncConfig(
        replicas=args.sync_replicas,
        timeout_s=defaults.timeout_s if args.sync_timeout_s is None else args.sync_timeout_s,
        policy=defaults.policy if args.sync_timeout_policy is None else args.sync_timeout_policy,
    )


def _add_table(srv: argparse.ArgumentParser, defaults: ServerConfig) -> None:
    group = srv.add_argument_group("table")
    group.add_argument("path", type=Path, help="the table directory to serve")
    group.add_argument(
        "--read-only", action="store_true", help="refuse pushes and snapshots (e.g. a snapshot serving inference)"
    )
    group.add_argument("--snapshot-dir", type=Path, help="where Snapshot writes (default: PATH.snapshots)")
    group.add_argument(
        "--max-snapshots",
        type=int,
        default=defaults.max_snapshots,
        help="snapshots kept in the snapshot directory; more are refused until old ones are deleted",
    )
    add_group_readable(group)


def _add_network(srv: argparse.ArgumentParser, daemon: DaemonConfig, defaults: ServerConfig) -> None:
    group = srv.add_argument_group("network")
    group.add_argument(
        "--listen",
        default=daemon.listen,
        help="host:port (default loopback only; 0.0.0.0:PORT for other hosts); port 0 picks a free one",
    )
    group.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    group.add_argument(
        "--chunk-bytes",
        type=parse_bytes,
        default=defaults.chunk_bytes,
        metavar="BYTES",
        help=f"row bytes per streamed message (default {format_bytes(defaults.chunk_bytes)})",
    )
    group.add_argument("--max-workers", type=int, default=defaults.max_workers, help="threads serving calls")
    add_renamed(
        group,
        "--grace-s",
        "--grace",
        type=float,
        default=daemon.grace_s,
        metavar="SECONDS",
        help="seconds to drain calls on SIGTERM",
    )
    group.add_argument(
        "--no-same-host", action="store_true", help="do not let clients on this host map the table's files"
    )


def _add_security(srv: argparse.ArgumentParser) -> None:
    group = srv.add_argument_group("security: TLS and tokens (docs/operations.md)")
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


def _add_durability(srv: argparse.ArgumentParser, defaults: LiveConfig) -> None:
    group = srv.add_argument_group("durability")
    group.add_argument(
        "--durability",
        **enum_choice(Durability),
        default=defaults.durability,
        help="fsync: a push is acknowledged once its log record is on disk (survives power loss); "
        "os: once the OS has it (survives the daemon's crash, not the host's)",
    )
    group.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, help="pushes between checkpoints"
    )
    add_renamed(
        group,
        "--scrub-period-s",
        "--scrub-period",
        type=float,
        default=defaults.integrity.scrub_period_s,
        metavar="SECONDS",
        help="verify every row against its checksum again within this period (0: only on first read); damage "
        "answers DATA_LOSS for its rows and turns health NOT_SERVING",
    )
    group.add_argument(
        "--no-integrity",
        action="store_true",
        help="do not keep or check row checksums (removes a writable table's; a later checked start rebuilds them)",
    )
    group.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="serve even when acknowledged pushes cannot be accounted for (log cut or deleted, checkpoint.json "
        "lost or damaged), logging what was lost; the version skips past the lost ones, so replicas that saw them "
        "must be re-seeded. Without it such a table refuses to start (docs/operations.md)",
    )


def _add_replication(srv: argparse.ArgumentParser, server: ServerConfig, live: LiveConfig) -> None:
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
        "the primary; above it lookups fail with UNAVAILABLE so clients retry elsewhere "
        f"(default {FollowConfig().max_lag})",
    )
    group.add_argument(
        "--reseed",
        **enum_choice(ReseedPolicy),
        default=None,
        help="with --follow: when the primary no longer holds the pushes after this replica's version, or has "
        "fewer than it (a deposed primary rejoining), auto (the default): replace this table with a copy streamed "
        "from the primary and follow again; never: stop serving until an operator runs `memstore reseed`",
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
    sync = SyncConfig()
    group.add_argument(
        "--sync-replicas",
        type=int,
        default=sync.replicas,
        metavar="N",
        help="acknowledge a push only once N replicas hold it durably (applied and logged per their "
        "--durability); 0, the default: asynchronous, a push is acknowledged once durable here",
    )
    group.add_argument(
        "--sync-timeout-s",
        type=float,
        metavar="SECONDS",
        help=f"with --sync-replicas: how long a push waits for its replicas (default {sync.timeout_s:g}); keep it "
        "below the clients' push deadline",
    )
    group.add_argument(
        "--sync-timeout-policy",
        **enum_choice(SyncTimeoutPolicy),
        default=None,
        help="with --sync-replicas: when fewer replicas confirm in time, fail (default: the push fails with "
        "UNAVAILABLE, applied here but not acknowledged; a retry with the same step id is not applied again) or "
        "degrade (acknowledge it anyway and stop waiting, logged and counted, until the replicas catch up)",
    )
    group.add_argument(
        "--max-followers",
        type=int,
        default=server.max_followers,
        help="followers streaming at once (each holds a worker thread of its own, on top of --max-workers)",
    )
    group.add_argument(
        "--max-row-watchers",
        type=int,
        default=server.max_row_watchers,
        help="clients' device caches kept coherent at once while training (each WatchRows stream holds a thread)",
    )
    add_renamed(
        group,
        "--feed-bytes",
        "--feed-mb",
        type=parse_bytes,
        old_type=parse_mebibytes,  # --feed-mb counted MiB
        default=live.feed_bytes,
        metavar="BYTES",
        help=f"recent pushes kept in memory for followers (default {format_bytes(live.feed_bytes)}); a follower "
        "further behind reads this daemon's log (the pushes since its last checkpoint), and past that must "
        "restart from a snapshot",
    )


def _membership(args: argparse.Namespace) -> MembershipConfig | None:
    """Where this daemon registers (None without --etcd); InvalidArgumentError for half the pair."""
    if args.etcd is None:
        given = [
            flag
            for flag, value in (
                ("--cluster-name", args.cluster_name),
                ("--advertise", args.advertise),
                ("--failover", args.failover),
            )
            if value
        ]
        if given:
            raise InvalidArgumentError(f"{', '.join(given)} need --etcd ENDPOINTS (the etcd to register in)")
        return None
    if args.cluster_name is None:
        raise InvalidArgumentError("--etcd needs --cluster-name NAME (the table's cluster to register under)")
    return MembershipConfig(
        endpoints=args.etcd,
        cluster=args.cluster_name,
        advertise=args.advertise,
        ttl_s=args.etcd_ttl_s,
        election=args.failover,
    )


def _add_membership(srv: argparse.ArgumentParser) -> None:
    group = srv.add_argument_group("cluster membership in etcd (docs/replication.md)")
    group.add_argument(
        "--etcd",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="register this daemon in etcd (address, shard, role, version, lag) so that clients given "
        "--etcd and --cluster-name find it; without it no etcd is used",
    )
    group.add_argument("--cluster-name", metavar="NAME", help="with --etcd: the cluster (one table) to register in")
    group.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="with --etcd: the address clients and replicas reach this daemon at (default: --listen, with "
        "this host's name for a wildcard host and the bound port for port 0)",
    )
    group.add_argument(
        "--etcd-ttl-s",
        type=int,
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help="with --etcd: the registration's lease; a daemon killed without a clean stop leaves the cluster "
        f"this long after its last renewal (default {DEFAULT_TTL_S})",
    )
    group.add_argument(
        "--failover",
        action="store_true",
        help="with --etcd: take part in the shard's leader election (a lease of --etcd-ttl-s): the primary "
        "takes pushes only while it leads, and a replica is promoted when the leader is lost "
        "(docs/replication.md, Automatic failover)",
    )


def _add_limits(srv: argparse.ArgumentParser, defaults: ServerConfig) -> None:
    group = srv.add_argument_group("limits (a call past one fails with RESOURCE_EXHAUSTED)")
    group.add_argument("--max-rows-per-request", type=int, default=defaults.max_rows_per_request)
    group.add_argument(
        "--max-message-bytes",
        type=parse_bytes,
        default=defaults.max_message_bytes,
        metavar="BYTES",
        help=f"bytes of one request message (default {format_bytes(defaults.max_message_bytes)})",
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
    add_renamed(
        group,
        "--request-timeout-s",
        "--request-timeout",
        type=float,
        default=defaults.request_timeout_s,
        metavar="SECONDS",
        help="seconds a call's request may take to arrive before the call is cancelled",
    )
    add_renamed(
        group,
        "--send-timeout-s",
        "--send-timeout",
        type=float,
        default=defaults.send_timeout_s,
        metavar="SECONDS",
        help="seconds a client may leave a response message unread before its call is cancelled",
    )
    group.add_argument(
        "--max-in-flight-bytes",
        type=parse_bytes,
        default=defaults.max_in_flight_bytes,
        metavar="BYTES",
        help="memory the calls in progress may hold (requests, gathered rows, optimizer work; default "
        f"{format_bytes(defaults.max_in_flight_bytes)}); "
        "a call that would pass it is refused, and the client retries it shortly",
    )


def _data_plane(args: argparse.Namespace) -> DataPlaneConfig | None:
    """The data plane's settings (None with --no-data-plane); it advertises --advertise's host by default."""
    if args.no_data_plane:
        return None
    advertise = args.data_plane_advertise
    if advertise is None and args.advertise:
        advertise = args.advertise.rpartition(":")[0]  # the host clients reach this daemon at; our own port
    return DataPlaneConfig(
        listen=args.data_plane_listen,
        advertise=advertise,
        ticket_s=args.data_plane_ticket_s,
        max_connections=args.data_plane_max_connections,
        chunk_bytes=args.data_plane_chunk_bytes,
    )


def _add_data_plane(srv: argparse.ArgumentParser, defaults: DataPlaneConfig) -> None:
    group = srv.add_argument_group("data plane: lookups' rows over framed TCP for other hosts (docs/operations.md)")
    group.add_argument(
        "--no-data-plane",
        action="store_true",
        help="serve lookups over gRPC only (clients on other hosts then get rows at about a quarter of the speed)",
    )
    group.add_argument(
        "--data-plane-listen",
        metavar="HOST:PORT",
        help="where the data plane listens (default: --listen's host, a free port; Describe tells clients)",
    )
    group.add_argument(
        "--data-plane-advertise",
        metavar="HOST[:PORT]",
        help="the address clients reach the data plane at, when not --listen's host and port (a proxy, a NAT); "
        "default: --advertise's host",
    )
    group.add_argument(
        "--data-plane-ticket-s",
        type=float,
        default=defaults.ticket_s,
        metavar="SECONDS",
        help="how long a data plane ticket (from OpenDataPlane, token-checked) is good for "
        f"(default {defaults.ticket_s:g})",
    )
    group.add_argument(
        "--data-plane-max-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help=f"data plane connections open at once (default {defaults.max_connections})",
    )
    group.add_argument(
        "--data-plane-chunk-bytes",
        type=parse_bytes,
        default=defaults.chunk_bytes,
        metavar="BYTES",
        help=f"row bytes gathered per frame (default {format_bytes(defaults.chunk_bytes)})",
    )


def _add_row_cache(srv: argparse.ArgumentParser, defaults: RowCacheConfig) -> None:
    group = srv.add_argument_group("row cache: DRAM over a table on disk (docs/operations.md)")
    group.add_argument(
        "--row-cache-bytes",
        type=parse_bytes,
        default=defaults.bytes,
        metavar="BYTES",
        help="keep recently read rows in this much shared memory (e.g. 4GiB; 0, the default: no cache, rows are "
        "read through the page cache); misses are read with O_DIRECT, so a table larger than RAM is served from "
        "this budget rather than from the page cache, and clients on this host read the cached rows too",
    )


def _add_observability(srv: argparse.ArgumentParser, defaults: ObservabilityConfig) -> None:
    group = srv.add_argument_group("observability")
    group.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics, HOST the --metrics-host (0: a free port)",
    )
    group.add_argument(
        "--metrics-host",
        default=defaults.metrics_host,
        help="the address the metrics endpoint listens on (default 127.0.0.1; it is plain HTTP without tokens, "
        "so give another only where the network is trusted)",
    )
    add_renamed(
        group,
        "--log-interval-s",
        "--log-interval",
        type=float,
        default=defaults.log_interval_s,
        metavar="SECONDS",
        help="seconds between traffic lines",
    )
    group.add_argument(
        "--log-format",
        **enum_choice(LogFormat),
        default=argparse.SUPPRESS,  # `memstore --log-format json serve ...` works as well; main() applies it
        help="json: one JSON object per log line (time, level, logger, message), for log collectors",
    )
