"""Client settings, with the gRPC service config they turn into."""

from __future__ import annotations

import enum
import json
import os
import socket
import time
from dataclasses import dataclass, field

import grpc

from memstore.auth import ClientTls, check_token, open_channel
from memstore.errors import DeadlineExceededError, InvalidArgumentError
from memstore.wire import memstore_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["Memstore"].full_name


# The longest deadline a call may have. gRPC turns a longer one (1e10 s, inf, nan) into a deadline
# already past: every call would fail at once with "Deadline Exceeded".
MAX_TIMEOUT_S = 1e6


def seconds_left(deadline: float) -> float:
    """Seconds until `deadline` (time.monotonic()); DeadlineExceededError once it has passed (no attempt
    starts then)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError("the call's deadline passed before it could be (re)sent")
    return left


def check_timeout(seconds: float, name: str = "timeout") -> float:
    """`seconds` when it is a usable deadline (0 < seconds <= MAX_TIMEOUT_S), else InvalidArgumentError."""
    if not 0 < seconds <= MAX_TIMEOUT_S:  # False for nan too
        raise InvalidArgumentError(
            f"{name} must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0e} (every call has a "
            f"deadline); got {seconds}"
        )
    return seconds


class LoadBalancing(enum.Enum):
    """How a channel whose target names several daemons (the replicas of a shard) spreads calls."""

    PICK_FIRST = "pick_first"  # one daemon at a time: the first that connects
    # Every ready daemon in turn; with client-side health checking, only those whose gRPC
    # health service says SERVING (a replica lagging its primary says NOT_SERVING).
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class ClientConfig:
    """Deadlines and retries of a MemstoreClient; defaults suit a training job on one host."""

    # Deadline of every call unless the call passes its own.
    timeout_s: float = 30.0
    # Attempts per call on UNAVAILABLE (with exponential backoff), all within the call's deadline.
    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    # HTTP/2 flow-control window per stream; a small window stalls large responses.
    window_bytes: int = 16 << 20
    # Same-host fast path (the daemon's table files mapped read-only in this process):
    # None uses it when available, False never, True requires it.
    same_host: bool | None = None
    # The daemon's data plane (raw rows over framed TCP) for lookups that do not use the same-host
    # path: None uses it when the daemon offers it (falling back to gRPC when it cannot be reached),
    # False never, True requires it.
    data_plane: bool | None = None
    # Connections a large data-plane lookup is striped over (one TCP stream is bound by one core's copying).
    data_plane_streams: int = 2
    # Send unique ids (and restore duplicates here) when that removes at least this share of rows.
    dedup_min_saving: float = 0.05
    # Largest request the client sends (ids are 8 bytes each).
    max_request_bytes: int = 256 << 20
    # Names this client in the daemon's logs and write-ahead log (a replica name, say).
    client_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    load_balancing: LoadBalancing = LoadBalancing.PICK_FIRST
    # Deadline of one attempt on one replica inside a cluster call's deadline; on expiry the
    # cluster client tries another replica (None: an attempt may take the whole deadline).
    attempt_timeout_s: float | None = None
    # TLS to daemons started with --tls-cert (None: plaintext), and the bearer token sent with
    # every call to daemons started with --token-file (kept out of repr, hence out of logs).
    tls: ClientTls | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_timeout(self.timeout_s, "ClientConfig.timeout_s")
        if not 1 <= self.max_attempts <= 5:
            raise InvalidArgumentError(f"ClientConfig.max_attempts must be 1..5; got {self.max_attempts}")
        if not 0.0 <= self.dedup_min_saving < 1.0:
            raise InvalidArgumentError(f"ClientConfig.dedup_min_saving must be in [0, 1); got {self.dedup_min_saving}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s <= MAX_TIMEOUT_S:
            raise InvalidArgumentError("ClientConfig needs 0 < initial_backoff_s <= max_backoff_s")
        if self.token is not None:
            check_token(self.token, "ClientConfig.token")
        if not 1 <= self.data_plane_streams <= 64:
            raise InvalidArgumentError(f"ClientConfig.data_plane_streams must be 1..64; got {self.data_plane_streams}")
        if self.attempt_timeout_s is not None:
            check_timeout(self.attempt_timeout_s, "ClientConfig.attempt_timeout_s")

    def channel_options(self) -> list[tuple[str, object]]:
        """gRPC channel options: message limits, window, load balancing; gRPC's own retries off.

        The client retries in Python (MemstoreClient._retrying), every attempt inside the call's one
        deadline. gRPC's retry policy is not used: with it, a Lookup stream whose daemon dies during
        the call blocks forever, past its deadline (grpc 1.85's retry filter, on giving up, completes
        the call's status but never its pending receive of a message, and the deadline cannot end it;
        grpc/grpc#41036 reports retry-policy calls hanging past their deadline since 1.72).
        """
        service_config: dict[str, object] = {}
        if self.load_balancing is LoadBalancing.ROUND_ROBIN:
            service_config["loadBalancingConfig"] = [{"round_robin": {}}]
            service_config["healthCheckConfig"] = {"serviceName": _SERVICE}
        return [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", self.max_request_bytes),
            ("grpc.http2.lookahead_bytes", self.window_bytes),
            # Off: no retry filter in the call stack, not even for gRPC's transparent retries.
            ("grpc.enable_retries", 0),
            ("grpc.service_config", json.dumps(service_config)),
        ]

    def open_channel(self, target: str) -> grpc.Channel:
        """A channel to `target` with these options, TLS and token."""
        return open_channel(target, self.channel_options(), self.tls, self.token)
