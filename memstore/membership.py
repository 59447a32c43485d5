"""Cluster membership in etcd: the key layout, the member record, and a daemon's registration.

The only module that knows the layout (docs/replication.md shows it). Under `/memstore/<cluster>/`:

    members/<shard>/<address>   one per daemon: a JSON `MemberRecord`, attached to the daemon's
                                lease (gone on a clean stop at once, after the TTL on a crash)
    leader/<shard>              the shard's elected primary: a JSON `LeaderRecord` (with its lease)
    epoch/<shard>               the shard's promotion counter, decimal (no lease: it only grows)
    acked/<shard>               the highest version a leader acknowledged with --sync-replicas, 20
                                zero-padded digits so that etcd's byte comparison is numeric (no lease)
    candidates/<shard>/<address>  a replica's frozen version while it stands for election (its lease)

`<shard>` is the shard's number in decimal; `<cluster>` names the table (letters, digits, `-_.`).
Light on purpose (memstore.etcd and the standard library): the client reads the same records.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from memstore.errors import InvalidArgumentError, MemstoreError
from memstore.etcd import EtcdClient, parse_endpoints

log = logging.getLogger("memstore.membership")

ROOT = "/memstore"
DEFAULT_TTL_S = 10
DEFAULT_REFRESH_S = 2.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class Role(enum.Enum):
    """What a member does for its shard."""

    PRIMARY = "primary"  # takes pushes (or serves a frozen table) and feeds the replicas
    REPLICA = "replica"  # follows a primary, serves reads


def check_cluster_name(name: str) -> str:
    """The name, or InvalidArgumentError: it is a key segment, so no slashes or spaces."""
    if not _NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"cluster name {name!r} must be 1 to 128 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    return name


def cluster_prefix(cluster: str) -> bytes:
    return f"{ROOT}/{check_cluster_name(cluster)}/".encode()


def members_prefix(cluster: str) -> bytes:
    """Every member of every shard of the cluster."""
    return cluster_prefix(cluster) + b"members/"


def member_key(cluster: str, shard: int, address: str) -> bytes:
    return members_prefix(cluster) + f"{shard}/{address}".encode()


def leader_key(cluster: str, shard: int) -> bytes:
    """Reserved: the shard's elected primary."""
    return cluster_prefix(cluster) + f"leader/{shard}".encode()


def epoch_key(cluster: str, shard: int) -> bytes:
    """Reserved: the shard's promotion counter."""
    return cluster_prefix(cluster) + f"epoch/{shard}".encode()


def acked_key(cluster: str, shard: int) -> bytes:
    """The highest version the shard's leaders acknowledged under --sync-replicas (see `version_bytes`)."""
    return cluster_prefix(cluster) + f"acked/{shard}".encode()


def candidates_prefix(cluster: str, shard: int) -> bytes:
    """The replicas standing for election in a shard."""
    return cluster_prefix(cluster) + f"candidates/{shard}/".encode()


def version_bytes(version: int) -> bytes:
    """A version as 20 zero-padded digits: etcd compares values as bytes, so these compare as numbers."""
    return f"{version:020d}".encode()


@dataclass(frozen=True)
class LeaderRecord:
    """The value of `leader/<shard>`: who leads the shard, since which promotion."""

    address: str
    epoch: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes) -> LeaderRecord:
        """InvalidArgumentError for a value that is not a leader record."""
        try:
            data = json.loads(value)
            return cls(address=str(data["address"]), epoch=int(data["epoch"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgumentError(f"not a leader record: {value[:200]!r} ({exc})") from None


@dataclass(frozen=True)
class MemberRecord:
    """What a daemon tells the cluster about itself (the value of its member key, JSON)."""

    address: str  # where clients and replicas reach it (HOST:PORT)
    shard: int
    num_shards: int
    role: Role
    version: int  # pushes applied
    lag: int  # versions behind its primary (0 for a primary)
    fingerprint: str  # the table's (the same on every shard)
    trainable: bool = False  # takes pushes
    serving: bool = True  # answers lookups (a replica too far behind does not)
    primary: str | None = None  # a replica's primary
    epoch: int = 0  # the leader epoch it serves under (etcd elections; 0: none)

    def encode(self) -> bytes:
        data = asdict(self)
        data["role"] = self.role.value
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes) -> MemberRecord:
        """From a member key's value; InvalidArgumentError for one that is not a record. Keys a newer
        daemon adds are ignored, so a cluster can be upgraded one daemon at a time."""
        try:
            data = json.loads(value)
            known = {f.name for f in fields(cls)}
            record = cls(**{k: v for k, v in data.items() if k in known})
            return cls(**{**asdict(record), "role": Role(record.role)})
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"not a member record: {value[:200]!r} ({exc})") from None


@dataclass(frozen=True)
class MembershipConfig:
    """Where and how a daemon registers (memstore serve --etcd ... --cluster-name ...)."""

    endpoints: tuple[str, ...]
    cluster: str
    # The address others reach this daemon at (None: the listen address, a wildcard host replaced by
    # this host's name).
    advertise: str | None = None
    ttl_s: int = DEFAULT_TTL_S  # a killed daemon's key is gone this long after its last renewal
    refresh_s: float = DEFAULT_REFRESH_S  # how often version, lag and role are written when they change
    # Take part in the shard's leader election (memstore.election): fencing and automatic failover.
    election: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", parse_endpoints(self.endpoints))
        check_cluster_name(self.cluster)
        if not 1 <= self.ttl_s <= 3600:
            raise InvalidArgumentError(f"the membership TTL must be 1 to 3600 seconds; got {self.ttl_s}")
        if not 0 < self.refresh_s <= self.ttl_s:
            raise InvalidArgumentError(
                f"the membership refresh period must be in (0, TTL={self.ttl_s}] seconds; got {self.refresh_s}"
            )


class Registration:
    """Keeps a daemon's member key in etcd while it serves.

    A thread renews the lease every third of its TTL and rewrites the record when `state()` changes
    (checked every `refresh_s`, not per push). When etcd is unreachable the daemon serves on; once
    etcd answers again the key is renewed, or, if the lease expired meanwhile, written anew under a
    new lease. `stop` revokes the lease, so the key goes at once on a clean stop.
    """

    def __init__(self, config: MembershipConfig, state: Callable[[], MemberRecord]) -> None:
        self.config = config
        self._state = state
        self._etcd = EtcdClient(config.endpoints, timeout_s=max(1.0, min(5.0, config.ttl_s / 3)))
        self._lease = 0
        self._written: MemberRecord | None = None
        self._key: bytes | None = None
        self._failing = False  # logged once per outage, not at every retry
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="etcd-membership", daemon=True)

    @property
    def registered(self) -> bool:
        return self._lease != 0

    def start(self) -> Registration:
        """Register now (a warning, not an error, when etcd does not answer: the thread retries) and
        keep the registration up from a thread."""
        self._tick()
        self._thread.start()
        return self

    @property
    def _period(self) -> float:
        return min(self.config.refresh_s, self.config.ttl_s / 3)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._period)
            self._wake.clear()
            if not self._stop.is_set():
                self._tick()

    def refresh(self) -> None:
        """Write the record now rather than at the next refresh (a promotion: clients switch at once)."""
        self._wake.set()

    def _tick(self) -> None:
        try:
            record = self._state()
            key = member_key(self.config.cluster, record.shard, record.address)
            if self._lease and self._etcd.keep_alive_once(self._lease) == 0:
                log.warning("membership lease expired while etcd was unreachable: registering anew")
                self._lease, self._written = 0, None
            if not self._lease:
                self._lease = self._etcd.grant(self.config.ttl_s)
                self._written = None
            if self._key is not None and key != self._key:  # another shard or address: the old key goes
                self._etcd.delete(self._key)
            if record != self._written or key != self._key:
                self._etcd.put(key, record.encode(), lease=self._lease)
                if self._written is None:
                    log.info("registered in etcd as %s (%s)", key.decode(), record.role.value)
                self._written, self._key = record, key
            if self._failing:
                log.info("etcd membership: etcd answers again; registration renewed")
                self._failing = False
        except MemstoreError as exc:
            if "lease not found" in str(exc):  # expired between the renewal and the write
                self._lease, self._written = 0, None
            if not self._failing:
                log.warning("etcd membership: %s (serving goes on; retrying every %.1fs)", exc, self._period)
            self._failing = True

    def stop(self) -> None:
        """Stop renewing and revoke the lease: the member key is gone when this returns (if etcd answers)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._lease:
            try:
                # Briefly: a stopping daemon's drain waits on this, and the key expires anyway.
                self._etcd.revoke(self._lease, timeout_s=2.0)
            except MemstoreError as exc:
                log.warning("could not remove the etcd member key (it expires after %ds): %s", self.config.ttl_s, exc)
        self._etcd.close()


def advertised_address(config: MembershipConfig, listen: str, port: int) -> str:
    """The address to register: `config.advertise`, else the listen host (this host's name for a
    wildcard) with the bound port."""
    if config.advertise is not None:
        return config.advertise
    if listen.startswith(("unix:", "unix-abstract:")):
        raise InvalidArgumentError("a daemon listening on a Unix socket registers in etcd only with --advertise")
    host = listen.rpartition(":")[0]
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"
