"""The daemon's configuration: `DaemonConfig`, everything one `memstore serve` runs with.

`memstore serve` parses its flags into a DaemonConfig once, at the edge (memstore/cli_serve.py);
`memstore.daemon.serve(config)` runs it. Each config checks itself when built and says what to
change. Beside the table, the address, the port file and the drain period, its parts:

- `ServerConfig`: what a gRPC server of the open table reads (`create_server`): streaming, limits,
  security (TLS, tokens), snapshots, the primary's side of replication, and its `DataPlaneConfig`
  (memstore.dataplane);
- `LiveConfig` (memstore.live): durability, checkpoints, the feed kept for followers, row checksums,
  synchronous replication (`LiveConfig.sync`, memstore.sync);
- `FollowConfig` (memstore.replica): the replica's side, with `DaemonConfig.primary`;
- `ObservabilityConfig`: the metrics endpoint and the traffic log line;
- `MembershipConfig` (memstore.membership): registration in etcd, for discovery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memstore.auth import TlsConfig
from memstore.errors import InvalidArgumentError
from memstore.live import LiveConfig
from memstore.membership import MembershipConfig
from memstore.replica import FollowConfig
from memstore.reseed import ReseedPolicy
from memstore.snapshots import DEFAULT_MAX_SNAPSHOTS

DEFAULT_LISTEN = "127.0.0.1:50051"
# The heartbeat period a Follow stream may ask for, in seconds.
MIN_HEARTBEAT_S = 0.01
MAX_HEARTBEAT_S = 60.0


@dataclass(frozen=True)
class DataPlaneConfig:
    """The daemon's data plane (memstore.dataplane; `memstore serve --data-plane-*`): raw rows over framed TCP for
    clients on other hosts. `ServerConfig.data_plane` None turns it off (`--no-data-plane`)."""

    # HOST:PORT to listen on; None: the gRPC listen host, a free port.
    listen: str | None = None
    # HOST or HOST:PORT Describe tells clients (a proxy, a NAT); None: the port listened on, and the
    # listen host when it is one address (else the host each client reached the daemon at).
    advertise: str | None = None
    # Seconds a ticket from OpenDataPlane is accepted; a connection lives at most this long.
    ticket_s: float = 300.0
    max_connections: int = 64
    # Row bytes per frame: what one gather makes before it is sent.
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not 1 <= self.ticket_s <= 86400:
            raise InvalidArgumentError(f"data plane ticket lifetime must be 1..86400 s; got {self.ticket_s}")
        if self.max_connections < 1:
            raise InvalidArgumentError(f"data plane max connections must be at least 1; got {self.max_connections}")
        if not 4096 <= self.chunk_bytes <= 64 << 20:
            raise InvalidArgumentError(f"data plane chunk bytes must be 4 KiB..64 MiB; got {self.chunk_bytes}")
        if self.listen is not None:
            if self.listen.startswith(("unix:", "unix-abstract:")):
                raise InvalidArgumentError(f"the data plane listens on TCP: HOST:PORT, not {self.listen!r}")
            check_listen_address(self.listen)
        if self.advertise is not None and has_port(self.advertise):
            host, _, port = self.advertise.rpartition(":")
            if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise InvalidArgumentError(
                    f"data plane advertise {self.advertise!r}: expected HOST or HOST:PORT with a port from 1 to 65535"
                )
        elif self.advertise is not None and not self.advertise.strip("[]"):
            raise InvalidArgumentError("data plane advertise is empty: give HOST or HOST:PORT, or leave it out")


@dataclass(frozen=True)
class ServerConfig:
    """What a gRPC server of an open table reads (memstore.service.create_server): streaming, limits,
    security, snapshots and the primary's side of replication. The defaults suit one host serving a
    few model replicas."""

    max_rows_per_request: int = 1 << 22
    # Row bytes per streamed message: large enough to amortise per-message costs, small
    # enough that gathering the next chunk overlaps sending this one (measured: 1 MiB).
    chunk_bytes: int = 1 << 20
    max_workers: int = 8
    # HTTP/2 flow-control window per stream; a small window stalls large responses.
    window_bytes: int = 16 << 20
    # Let clients on this host map the table's files read-only instead of streaming rows.
    same_host: bool = True
    # Where Snapshot writes (default: "<table>.snapshots" beside the table).
    snapshot_dir: Path | None = None
    # Follow streams served at once; each holds a worker thread of its own (added to max_workers).
    max_followers: int = 4
    # WatchRows streams served at once (clients' device caches kept coherent while training); each
    # holds a worker thread of its own, like a follower.
    max_row_watchers: int = 16
    # Snapshots kept in snapshot_dir (those being written included); more are refused.
    max_snapshots: int = DEFAULT_MAX_SNAPSHOTS
    # Seconds between a Follow stream's heartbeats when the follower does not ask for a period.
    follow_heartbeat_s: float = 1.0
    # Record bytes per Follow message (a larger record travels alone).
    follow_batch_bytes: int = 4 << 20
    # Limits (memstore.limits); a call past one fails with RESOURCE_EXHAUSTED. Bytes of one
    # request message (refused by gRPC before it is decoded):
    max_message_bytes: int = 64 << 20
    # Calls served or queued at once, Follow streams not counted (they have max_followers):
    max_concurrent_calls: int = 64
    # Memory the calls in progress may hold at once (requests, gathered rows, optimizer work):
    max_in_flight_bytes: int = 1 << 30
    # TLS (certificate and key, optionally a CA for client certificates) and bearer tokens
    # (`read TOKEN` / `write TOKEN` lines): memstore.auth.
    tls: TlsConfig | None = None
    token_file: Path | None = None
    # Seconds a call's request message may take to arrive, and each response message to be taken by the
    # client, before the call is cancelled and what it holds returned (memstore.guard).
    request_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    # Calls one peer host may have in progress at once (0: no limit), and health Watch streams in all
    # (round_robin clients keep one open per connection; each holds no thread, only a little memory).
    max_calls_per_peer: int = 32
    max_watch_streams: int = 256
    # Lookups' rows over framed TCP beside gRPC, for clients on other hosts (None: gRPC only).
    data_plane: DataPlaneConfig | None = DataPlaneConfig()

    def __post_init__(self) -> None:
        for name in (
            "max_rows_per_request",
            "chunk_bytes",
            "max_workers",
            "window_bytes",
            "follow_batch_bytes",
            "max_message_bytes",
            "max_concurrent_calls",
            "max_in_flight_bytes",
            "max_watch_streams",
            "max_snapshots",
        ):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"ServerConfig.{name} must be at least 1; got {getattr(self, name)}")
        for name in ("request_timeout_s", "send_timeout_s"):
            if not 0 < getattr(self, name) <= 86400:
                raise InvalidArgumentError(
                    f"ServerConfig.{name} must be in (0, 86400] seconds; got {getattr(self, name)}"
                )
        if self.max_calls_per_peer < 0:
            raise InvalidArgumentError(
                f"ServerConfig.max_calls_per_peer must be 0 or more; got {self.max_calls_per_peer}"
            )
        if self.max_row_watchers < 0:
            raise InvalidArgumentError(f"ServerConfig.max_row_watchers must be 0 or more; got {self.max_row_watchers}")
        if self.max_followers < 0:
            raise InvalidArgumentError(f"ServerConfig.max_followers must be 0 or more; got {self.max_followers}")
        if not MIN_HEARTBEAT_S <= self.follow_heartbeat_s <= MAX_HEARTBEAT_S:
            raise InvalidArgumentError(
                f"ServerConfig.follow_heartbeat_s must be in [{MIN_HEARTBEAT_S}, {MAX_HEARTBEAT_S}]; "
                f"got {self.follow_heartbeat_s}"
            )

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Lookup messages stay within chunk_bytes by construction; a Follow message carries whole
            # logged records, and one push's after-image with its optimizer state (Adam: 2.4x the
            # push request) can exceed any chunk. The server sends only what it built: no cap.
            ("grpc.max_send_message_length", -1),
            ("grpc.http2.lookahead_bytes", self.window_bytes),
            # gRPC sets SO_REUSEPORT by default: a second daemon on a port in use would start and
            # share it, clients getting either table at random. Off: that bind fails.
            ("grpc.so_reuseport", 0),
            # A connection that has not finished its (TLS) handshake in this time is closed, one with
            # no call for this long too; streams per connection are bounded by what the daemon admits.
            ("grpc.server_handshake_timeout_ms", 10_000),
            ("grpc.max_connection_idle_ms", 10 * 60_000),
            (
                "grpc.max_concurrent_streams",
                self.max_concurrent_calls + self.max_followers + self.max_row_watchers + self.max_watch_streams,
            ),
        ]


@dataclass(frozen=True)
class ObservabilityConfig:
    """What the daemon tells its operator: the Prometheus endpoint and the periodic traffic line."""

    # Serve Prometheus metrics at http://metrics_host:PORT/metrics (0: any free port; None: not served).
    # Plain HTTP, so loopback unless asked: a scraper elsewhere needs metrics_host (and a network it may trust).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_interval_s: float = 60.0  # seconds between traffic lines

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InvalidArgumentError(
                f"ObservabilityConfig.metrics_port must be a port, 0 to 65535; got {self.metrics_port}"
            )
        # `not a < x <= b` holds for nan too. A zero interval spun the serving loop writing log lines.
        if not 0 < self.log_interval_s <= 86400:
            raise InvalidArgumentError(
                f"ObservabilityConfig.log_interval_s must be in (0, 86400] seconds; got {self.log_interval_s}"
            )


@dataclass(frozen=True)
class DaemonConfig:
    """What one daemon serves and how: the table, where it listens, and its parts' configs."""

    table: Path
    listen: str = DEFAULT_LISTEN  # HOST:PORT (port 0: a free one) or unix:PATH
    port_file: Path | None = None  # the bound port is written here once serving
    # Refuse pushes and snapshots even when the table has an optimizer (a snapshot serving inference).
    read_only: bool = False
    # Serve the table as a read replica of the daemon at this address; None: a primary (or a frozen table).
    primary: str | None = None
    # Seconds in-flight calls may take to finish after SIGTERM or SIGINT, before the daemon stops.
    grace_s: float = 10.0
    server: ServerConfig = field(default_factory=ServerConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    # How a replica follows its primary (only with `primary`; None: FollowConfig's defaults).
    follow: FollowConfig | None = None
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    # Let the file's group read what the daemon writes (snapshots, logs): 0750/0640 instead of 0700/0600.
    group_readable: bool = False
    # Register in etcd as a member of a cluster (None: no etcd, the single-daemon default).
    membership: MembershipConfig | None = None
    # A replica that can no longer follow (too far behind, or ahead of its primary): re-seed itself over
    # StreamSnapshot and follow again (AUTO), or stop serving until an operator re-seeds it (NEVER).
    reseed: ReseedPolicy = ReseedPolicy.AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", Path(self.table))
        if self.port_file is not None:
            object.__setattr__(self, "port_file", Path(self.port_file))
        check_listen_address(self.listen)
        if not 0 <= self.grace_s <= 86400:  # False for nan too
            raise InvalidArgumentError(f"DaemonConfig.grace_s must be in [0, 86400] seconds; got {self.grace_s}")
        for name, kind in (("server", ServerConfig), ("live", LiveConfig), ("observability", ObservabilityConfig)):
            if not isinstance(getattr(self, name), kind):
                raise InvalidArgumentError(
                    f"DaemonConfig.{name} takes {kind.__name__}, not {type(getattr(self, name)).__name__}"
                )
        if self.follow is not None and not isinstance(self.follow, FollowConfig):
            raise InvalidArgumentError(
                f"DaemonConfig.follow takes FollowConfig or None, not {type(self.follow).__name__}"
            )
        self._check_sync()
        # A replica must also be writable and trainable: LiveTable.open says so, knowing the table.
        if self.primary is not None:
            if not self.primary:
                raise InvalidArgumentError("DaemonConfig.primary is empty; give the primary's HOST:PORT, or None")
        elif self.follow is not None:
            raise InvalidArgumentError(
                "DaemonConfig.follow configures a replica and needs DaemonConfig.primary (--follow PRIMARY); "
                "without it this daemon is a primary and would ignore it"
            )

    def _check_sync(self) -> None:
        """Synchronous replication needs a primary that takes pushes and can stream to enough followers."""
        replicas = self.live.sync.replicas
        if not replicas:
            return
        if self.primary is not None and not (self.membership and self.membership.election):  # for when promoted
            raise InvalidArgumentError(
                "--sync-replicas is for a primary: this daemon follows "
                f"{self.primary} and takes no pushes; drop --sync-replicas here (give it to the primary)"
            )
        if self.read_only:
            raise InvalidArgumentError("--sync-replicas needs a daemon that takes pushes; drop --read-only or it")
        if replicas > self.server.max_followers:
            raise InvalidArgumentError(
                f"--sync-replicas {replicas} can never be met: this daemon streams to at most --max-followers "
                f"{self.server.max_followers} replicas; raise --max-followers or lower --sync-replicas"
            )

    @property
    def follow_config(self) -> FollowConfig:
        """How the replica follows: `follow`, or the defaults."""
        return self.follow or FollowConfig()


def has_port(address: str) -> bool:
    """Whether `address` (HOST, HOST:PORT, IPV6 or [IPV6]:PORT) names a port."""
    return "]:" in address if address.startswith("[") else address.count(":") == 1


def check_listen_address(address: str) -> None:
    """InvalidArgumentError unless `address` is HOST:PORT with a port in 0..65535 (gRPC itself
    would serve port 99999 as 34463, and a bare host on port 443), or a Unix socket (unix:PATH)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgumentError(
            f"cannot listen on {address!r}: expected HOST:PORT with a port from 0 to 65535 (0 picks a free one), "
            "e.g. 127.0.0.1:50051 or [::1]:50051, or unix:PATH"
        )
