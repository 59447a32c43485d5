"""Which data planes a client's lookups take, and when they fall back to gRPC.

A `MemstoreClient` asks `DataPlaneRoute.planes()` before each lookup attempt. The first time,
the route describes every daemon the client's gRPC target names (one, or a shard's replicas in an
`ipv4:a:1,b:2` list), each anew rather than from the client's cached Describe, since a restarted
daemon listens on another port. Replicas are described in parallel, and a hung one is left out
rather than allowed to hold the lookup. When none of the planes can serve, the route falls back to
gRPC for `RETRY_S`, then describes the daemons again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

from client.config import ClientConfig, seconds_left
from client.dataplane import DataPlane, DataPlanes
from memstore.errors import UnavailableError
from memstore.tabledir.manifest import Manifest
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

log = logging.getLogger("client")

# Seconds before a client none of whose daemons' data planes could serve looks for them again (gRPC
# meanwhile), and before one replica's data plane that failed is described and tried again.
RETRY_S = 10.0
REPLICA_REST_S = 2.0
# Seconds the replicas of a target have to describe their data planes once the first has.
_REPLICA_GRACE_S = 0.25

# One unary call within a timeout, failing with the project's exceptions (MemstoreClient._call).
UnaryCall = Callable[[Any, Any, float], Any]


class DataPlaneRoute:
    """The data planes of one client's target: described on first use, fallen back from, described again."""

    def __init__(
        self,
        address: str,
        config: ClientConfig,
        stub: pb_grpc.MemstoreStub,
        call: UnaryCall,
        remember: Callable[[pb.DescribeResponse], None],
    ) -> None:
        self._address = address
        self._config = config
        self._stub = stub
        self._call = call
        self._remember = remember  # the client keeps its own daemon's first Describe
        self._lock = threading.Lock()
        self.current: DataPlanes | None = None
        self._checked = False
        self._retry_at = 0.0
        self._retired: list[DataPlanes] = []

    def planes(self, deadline: float) -> DataPlanes | None:
        """The data planes for a lookup, or None for gRPC (not offered, turned off, or failing lately)."""
        if self._config.data_plane is False or self.current is not None:
            return self.current
        if self._checked and time.monotonic() < self._retry_at:
            return None
        with self._lock:
            if self.current is None and (not self._checked or time.monotonic() >= self._retry_at):
                self.current = self._open(deadline)
                self._checked = True
                self._retry_at = time.monotonic() + RETRY_S
        return self.current

    def fall_back(self, planes: DataPlanes, exc: Exception) -> None:
        """Look rows up over gRPC for `RETRY_S` (none of `planes` could serve: `exc` says why)."""
        with self._lock:
            if self.current is planes:
                self.current = None
                self._retry_at = time.monotonic() + RETRY_S
                self._retired.append(planes)
        log.warning("%s; looking rows up over gRPC, and for the data plane again in %.0f s", exc, RETRY_S)

    def close(self) -> None:
        """Close every data plane this route opened."""
        with self._lock:
            planes, self.current = [self.current, *self._retired], None
            self._retired = []
        for each in planes:
            if each is not None:
                each.close()

    def _open(self, deadline: float) -> DataPlanes | None:
        addresses = target_addresses(self._address)
        if len(addresses) > 1:  # a shard's replicas: a channel of its own to each, for its Describe and tickets
            channels = [self._config.open_channel(address) for address in addresses]
            stubs = [pb_grpc.MemstoreStub(channel) for channel in channels]
        else:
            channels, stubs = [], [self._stub]
        describe = [
            functools.partial(self._describe, address, stub)
            for address, stub in zip(addresses or [self._address], stubs)
        ]
        found = {0: describe[0](deadline)} if len(stubs) == 1 else _describe_all(describe, deadline)
        found = {index: plane for index, plane in found.items() if plane is not None}
        if not found:
            for channel in channels:
                channel.close()
            if self._config.data_plane:
                raise UnavailableError(
                    f"{self._address} offers no data plane this client can reach (--no-data-plane, or not a TCP "
                    "address); drop ClientConfig(data_plane=True) to use gRPC"
                )
            return None
        return DataPlanes(
            list(found.values()),
            [describe[index] for index in found],
            REPLICA_REST_S,
            lambda: [channel.close() for channel in channels],
        )

    def _describe(self, address: str, stub: pb_grpc.MemstoreStub, deadline: float) -> DataPlane | None:
        """The data plane of the daemon at `address`, as its Describe offers it (None: none this client can use)."""
        try:
            served = self._call(stub.Describe, pb.DescribeRequest(), seconds_left(deadline))
        except UnavailableError:
            if stub is self._stub:
                raise  # the daemon itself is not there: the lookup's retries handle that
            return None  # one replica of several: the others may serve
        if stub is self._stub:
            self._remember(served)
        host = address.rpartition(":")[0].strip("[]")
        if not served.HasField("data_plane") or not (host or served.data_plane.host):
            return None

        def ticket(timeout: float) -> tuple[bytes, float]:
            answer = self._call(stub.OpenDataPlane, pb.OpenDataPlaneRequest(), timeout)
            return answer.ticket, answer.expires_in_s

        manifest = Manifest.from_json(served.manifest_json)
        row_bytes = manifest.dtype.row_bytes(manifest.layout.dim)
        config = self._config
        try:
            return DataPlane(host, served.data_plane, ticket, row_bytes, config.tls, config.data_plane_streams)
        except UnavailableError as exc:  # another protocol version, or TLS this client has no settings for
            if config.data_plane:
                raise
            log.warning("%s: %s", address, exc)
            return None


def target_addresses(address: str) -> list[str]:
    """The `host:port` of each daemon a gRPC target names (`host:port`, `dns:///host:port`, `ipv4:a:1,b:2`);
    none for targets that are not TCP addresses (a Unix socket)."""
    target = address
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if "/" in target or target.startswith(("unix:", "unix-abstract:", "vsock:", "xds:")):
        return []
    return [part for part in target.split(",") if part.rpartition(":")[0]]


def _describe_all(describe: list[Callable[[float], DataPlane | None]], deadline: float) -> dict[int, DataPlane | None]:
    """Each replica's data plane, described at once: those that answered by the first answer plus a moment
    (a hung replica must not hold the lookup to its deadline; it joins when the planes are described again)."""
    pool = futures.ThreadPoolExecutor(len(describe), thread_name_prefix="memstore-describe")
    try:
        asked = {pool.submit(each, deadline): index for index, each in enumerate(describe)}
        done, pending = futures.wait(asked, seconds_left(deadline), return_when=futures.FIRST_COMPLETED)
        if pending:
            more, _ = futures.wait(pending, min(_REPLICA_GRACE_S, max(0.0, deadline - time.monotonic())))
            done |= more
        return {asked[future]: future.result() for future in done if future.exception() is None}
    finally:
        pool.shutdown(wait=False)  # a hung Describe ends at the deadline on its own
