"""`memstore snapshot`, `health` and `stats`: commands that call a running daemon."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore.auth import add_client_arguments, client_security, open_channel
from memstore.cli_args import add_renamed
from memstore.errors import InvalidArgumentError
from memstore.metrics import summarize
from memstore.service import SERVICE_NAME


def add_remote_parsers(commands: argparse._SubParsersAction) -> None:
    """The subcommands that talk to a daemon, each with the TLS and token flags."""
    snap = commands.add_parser("snapshot", help="ask a serving daemon for a consistent snapshot")
    snap.add_argument("address", help="the daemon's HOST:PORT")
    snap.add_argument("name", help="directory name inside the daemon's snapshot directory")
    add_client_arguments(snap)

    health = commands.add_parser(
        "health", help="gRPC health check of a daemon (exit 0 when SERVING): for container health probes"
    )
    health.add_argument("address", help="the daemon's HOST:PORT")
    health.add_argument(
        "--service", default="", help=f"the service to check, e.g. {SERVICE_NAME} (default: the whole server)"
    )
    add_renamed(
        health,
        "--timeout-s",
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds before an unanswered check fails",
    )
    add_client_arguments(health)

    stats = commands.add_parser(
        "stats", help="a daemon's metrics: calls, errors and latency per RPC, rows and bytes served, pushes"
    )
    stats.add_argument("address", help="the daemon's HOST:PORT")
    stats.add_argument("--raw", action="store_true", help="print the Prometheus text exposition as it is")
    add_renamed(
        stats,
        "--timeout-s",
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds before the call fails",
    )
    add_client_arguments(stats)


def run_snapshot(args: argparse.Namespace) -> int:
    from client import ClientConfig, MemstoreClient  # the client pulls in torch: only here

    tls, token = client_security(args)
    with MemstoreClient(args.address, ClientConfig(tls=tls, token=token)) as client:
        path, version = client.snapshot(args.name)
    print(f"snapshot of version {version} at {path}")
    return 0


def run_health(args: argparse.Namespace) -> int:
    """One grpc.health.v1 Check with a deadline: 0 when SERVING; 1 otherwise, unreachable included."""
    _check_timeout(args.timeout_s)
    tls, _ = client_security(args)  # health needs no token
    request = health_pb2.HealthCheckRequest(service=args.service)
    with open_channel(args.address, [], tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout_s)
        except grpc.RpcError as exc:  # UNAVAILABLE (nothing listening), DEADLINE_EXCEEDED, NOT_FOUND (service)
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def run_stats(args: argparse.Namespace) -> int:
    """Print the daemon's metrics, summarised per RPC (or raw with --raw)."""
    from client import ClientConfig, MemstoreClient

    _check_timeout(args.timeout_s)
    tls, token = client_security(args)
    with MemstoreClient(args.address, ClientConfig(tls=tls, token=token, same_host=False)) as client:
        text = client.stats(timeout=args.timeout_s)
    if args.raw:
        print(text, end="")
    else:
        print(f"{args.address}:")
        print("\n".join(summarize(text).lines()))
    return 0


def _check_timeout(seconds: float) -> None:
    """A --timeout-s gRPC can honour: gRPC fails a call at once for one of 1e10 s, inf or nan."""
    if not 0 < seconds <= 1e6:  # False for nan too
        raise InvalidArgumentError(f"--timeout-s must be positive seconds, at most 1e6; got {seconds}")
