"""The cluster spec: which daemons serve each shard of a table.

A small TOML file, shards in order:

    [[shards]]
    primary = "10.0.0.1:50051"          # takes pushes and snapshots, serves reads
    replicas = ["10.0.0.2:50051"]       # read replicas following the primary (memstore serve --follow)
    read_target = "dns:///shard0:50051" # optional: one gRPC target resolving to every daemon that serves reads

or the same as command-line flags, one per shard in order: `--shard PRIMARY[,REPLICA...]`.
Parsed once, here; unknown keys are errors.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memstore.errors import InvalidArgumentError


@dataclass(frozen=True)
class ShardAddresses:
    """The daemons of one shard (a shard discovered in etcd may have no primary for a while: None)."""

    primary: str | None
    replicas: tuple[str, ...] = ()
    read_target: str | None = None

    def __post_init__(self) -> None:
        for address in self.addresses:
            _split_host_port(address)  # rejects malformed addresses now, not at the first call

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every daemon of the shard, primary first."""
        return self.replicas if self.primary is None else (self.primary, *self.replicas)

    def reads(self) -> str:
        """The gRPC target reads go to: `read_target`, or a list of every daemon's address.

        gRPC takes a list of addresses only as IP literals (`ipv4:a:1,b:2`), so host names are
        resolved here, once; give `read_target` (a DNS name resolving to every replica, such as a
        compose network alias or a Kubernetes headless service) to have gRPC re-resolve them.
        """
        if self.read_target is not None:
            return self.read_target
        if len(self.addresses) <= 1:
            if not self.addresses:
                raise InvalidArgumentError("a shard without daemons has nothing to read from")
            return self.addresses[0]
        endpoints = [_resolve(address) for address in self.addresses]
        if all(":" not in host for host, _ in endpoints):
            return "ipv4:" + ",".join(f"{host}:{port}" for host, port in endpoints)
        if all(":" in host for host, _ in endpoints):
            return "ipv6:" + ",".join(f"[{host}]:{port}" for host, port in endpoints)
        raise InvalidArgumentError(f"shard addresses {list(self.addresses)} mix IPv4 and IPv6; use one family")


@dataclass(frozen=True)
class ClusterSpec:
    """The shards of one table, in shard order."""

    shards: tuple[ShardAddresses, ...]

    def __post_init__(self) -> None:
        if not self.shards:
            raise InvalidArgumentError("a cluster needs at least one shard")
        if any(shard.primary is None for shard in self.shards):
            raise InvalidArgumentError("every shard of a cluster spec needs a primary")
        seen: set[str] = set()
        for address in (a for shard in self.shards for a in shard.addresses):
            if address in seen:
                raise InvalidArgumentError(f"{address} appears twice in the cluster spec; each daemon serves one shard")
            seen.add(address)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSpec:
        """From the parsed TOML: {"shards": [{"primary": ..., "replicas": [...], "read_target": ...}, ...]}."""
        _reject_unknown(data, {"shards"}, "the cluster spec")
        shards = data.get("shards")
        if not isinstance(shards, list):
            raise InvalidArgumentError("the cluster spec needs a list of shards ([[shards]] tables)")
        parsed = []
        for index, shard in enumerate(shards):
            where = f"shard {index} of the cluster spec"
            if not isinstance(shard, dict) or not isinstance(shard.get("primary"), str):
                raise InvalidArgumentError(f'{where} needs primary = "HOST:PORT"')
            _reject_unknown(shard, {"primary", "replicas", "read_target"}, where)
            replicas = shard.get("replicas", [])
            if not isinstance(replicas, list) or not all(isinstance(r, str) for r in replicas):
                raise InvalidArgumentError(f'{where}: replicas must be a list of "HOST:PORT" strings')
            read_target = shard.get("read_target")
            if read_target is not None and not isinstance(read_target, str):
                raise InvalidArgumentError(f"{where}: read_target must be a gRPC target string")
            parsed.append(ShardAddresses(shard["primary"], tuple(replicas), read_target))
        return cls(tuple(parsed))

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterSpec:
        """Read a TOML cluster spec."""
        try:
            return cls.from_dict(tomllib.loads(Path(path).read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgumentError(f"{path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read the cluster spec {path}: {exc.strerror}") from None

    @classmethod
    def from_flags(cls, shards: Sequence[str]) -> ClusterSpec:
        """From `--shard PRIMARY[,REPLICA...]` values, one per shard in order."""
        parsed = []
        for value in shards:
            primary, *replicas = [a.strip() for a in value.split(",")]
            parsed.append(ShardAddresses(primary, tuple(replicas)))
        return cls(tuple(parsed))

    @classmethod
    def single(cls, address: str) -> ClusterSpec:
        """One unsharded daemon."""
        return cls((ShardAddresses(address),))


def _reject_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = set(data) - known
    if unknown:
        raise InvalidArgumentError(f"{where} has unknown keys {sorted(unknown)}; known keys are {sorted(known)}")


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"{address!r} is not a HOST:PORT address")
    return host, int(port)


def _resolve(address: str) -> tuple[str, int]:
    """(IP literal, port) of a HOST:PORT address."""
    host, port = _split_host_port(address)
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        pass
    for family in (socket.AF_INET, socket.AF_UNSPEC):  # IPv4 first: "localhost" may list ::1 first
        try:
            return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4][0], port
        except socket.gaierror as exc:
            error = exc
    raise InvalidArgumentError(f"cannot resolve {host!r} of {address}: {error.strerror}")
