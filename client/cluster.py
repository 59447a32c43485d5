"""ClusterClient: one table served by several shards, each by a primary and read replicas.

The same calls as `MemstoreClient` (so the prefetcher, the pusher and the model take either):

- lookup: ids are split by shard (the partition assignment every shard's manifest records),
  the parts are fetched in parallel and the rows reassembled in request order. Each shard's
  reads go through one gRPC channel over all its daemons with the round_robin policy and
  client-side health checking (a replica lagging its primary reports NOT_SERVING and gets no
  calls); MemstoreClient retries UNAVAILABLE within the call's deadline. A replica that fails
  mid-stream, or exceeds `ClientConfig.attempt_timeout_s`, is retried here on the next
  replica within the call's deadline (gRPC's own per-attempt timeout, `perAttemptRecvTimeout`,
  has open C-core bugs: grpc/grpc#38908, #39935).
- push: gradients are summed per row once, split by shard and sent to every shard's primary,
  an empty part included, so each shard's optimizer counts the same steps as one table would
  (Adam's bias correction depends on it). With a step id a push is safe to repeat whole after
  a failure: shards that applied it answer the repeat without applying it again.

At connect every listed daemon is described: a daemon serving another table, another shard
or another partition assignment is refused (LayoutMismatchError); an unreachable one is not
an error while its shard has another daemon up.

`ClusterClient.discover` finds the daemons in etcd instead of a spec (they register with
`memstore serve --etcd ... --cluster-name ...`) and follows their changes: a daemon that joins
is described and used, one that leaves (stopped, or killed and its lease expired) is no longer
called, a new primary takes the pushes. A daemon that registers under the cluster's name but
serves another table is left out, with an error in the log.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.client import (
    MemstoreClient,
    PushAck,
    as_int64_array,
    check_layer_id,
    grad_rows,
    out_rows,
    sum_duplicate_rows,
)
from client.cluster_spec import ClusterSpec, ShardAddresses
from client.config import ClientConfig, LoadBalancing, check_timeout
from client.discovery import ClusterView, Discovery
from memstore.auth import add_client_arguments, client_security
from memstore.errors import (
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    LayoutMismatchError,
    MemstoreError,
    UnavailableError,
)
from memstore.sharding import Sharding
from memstore.tabledir.manifest import Manifest

log = logging.getLogger("client.cluster")

# A replica that failed this way may be followed by a healthy one: try the call again.
_RETRY_ON_ANOTHER_REPLICA = (UnavailableError, DeadlineExceededError, DataLossError)
# How often a push waiting for a shard's new primary looks at what discovery installed.
_FAILOVER_POLL_S = 0.05


class ClusterClient:
    """A sharded, replicated table behind the `MemstoreClient` interface. Thread-safe; a context manager."""

    def __init__(
        self,
        spec: ClusterSpec | ClusterView,
        config: ClientConfig | None = None,
        *,
        expected_fingerprint: str | None = None,
        discovery: Discovery | None = None,
    ) -> None:
        self.spec = spec  # with discovery: the members as last seen
        self.config = config or ClientConfig()
        self._reader_config = replace(self.config, load_balancing=LoadBalancing.ROUND_ROBIN)
        self._discovery = discovery
        self._lock = threading.Lock()  # membership changes
        self._retired: list[tuple[float, MemstoreClient]] = []  # replaced clients, closed once no call uses them
        self._shards: tuple[ShardAddresses, ...] = spec.shards
        self._primaries: list[MemstoreClient | None] = []
        self._readers: list[MemstoreClient | None] = []
        for shard in spec.shards:
            primary, reader = self._clients_of(shard)
            self._primaries.append(primary)
            self._readers.append(reader)
        self._pool = ThreadPoolExecutor(max_workers=len(spec.shards), thread_name_prefix="memstore-shard")
        try:
            self._manifest, self._sharding = self._check_cluster()
            if expected_fingerprint is not None:
                self.check_fingerprint(expected_fingerprint)
            if discovery is not None:
                discovery.follow(self._membership_changed)
        except BaseException:
            self.close()
            raise

    @classmethod
    def discover(
        cls,
        etcd: str | list[str],
        cluster: str,
        config: ClientConfig | None = None,
        *,
        expected_fingerprint: str | None = None,
    ) -> ClusterClient:
        """The cluster whose daemons registered in etcd (`etcd`: HOST:PORT[,HOST:PORT...]) under `cluster`,
        followed as they join and leave. Waits up to the config's timeout for every shard to have a
        daemon; UnavailableError after it."""
        config = config or ClientConfig()
        discovery = Discovery(etcd, cluster, timeout_s=config.timeout_s)
        try:
            view = discovery.wait_for_complete(config.timeout_s)
            return cls(view, config, expected_fingerprint=expected_fingerprint, discovery=discovery)
        except BaseException:
            discovery.close()
            raise

    # -- the table ---------------------------------------------------------------------------

    def describe(self, timeout: float | None = None) -> Manifest:
        """The whole table's manifest (layout, dtype, seed, optimizer; no shard section)."""
        return self._manifest

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def trainable(self) -> bool:
        """Whether every shard's primary takes pushes."""
        return all(primary is not None and primary.trainable for primary in self._primaries)

    @property
    def transport(self) -> str:
        """How lookups travel: "grpc", "same-host", or both (per shard)."""
        return "+".join(sorted({reader.transport for reader in self._readers if reader is not None}))

    def check_fingerprint(self, expected: str, timeout: float | None = None) -> None:
        """LayoutMismatchError unless the cluster serves the table with this fingerprint."""
        if self._manifest.fingerprint != expected:
            raise LayoutMismatchError(
                f"the cluster serves a table with fingerprint {self._manifest.fingerprint}, expected {expected}: "
                "point the model at the cluster built for it"
            )

    def version(self, timeout: float | None = None) -> int:
        """Pushes applied over all shards (each shard counts its own)."""
        return sum(self._on_every_shard(lambda shard: self._primary(shard).version(timeout)))

    def snapshot(self, name: str, *, timeout: float | None = None) -> list[tuple[str, int]]:
        """A snapshot named `name` on every shard's primary: [(path on its host, version)] in shard order.

        Each shard's snapshot is consistent; across shards they are taken one after another, so
        take them between training steps (after `Pusher.flush`) for a table-wide consistent copy.
        """
        return self._on_every_shard(lambda shard: self._primary(shard).snapshot(name, timeout=timeout))

    # -- rows --------------------------------------------------------------------------------

    def lookup(
        self,
        layer_id: int,
        row_ids: Any,
        *,
        timeout: float | None = None,
        out: torch.Tensor | None = None,
        return_version: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, int]:
        """Rows [*row_ids.shape, dim] of the stored dtype, as `MemstoreClient.lookup` returns them.

        With `return_version`, also the sum of the shards' versions the rows show.
        """
        check_layer_id(layer_id)
        if self.num_shards == 1:  # no split: the rows land in `out` directly, replicas retried all the same
            return self._on_replicas(
                0,
                lambda seconds: self._reader(0).lookup(
                    layer_id, row_ids, timeout=seconds, out=out, return_version=return_version
                ),
                time.monotonic() + self._timeout(timeout),
            )
        ids = as_int64_array(row_ids)
        flat = ids.reshape(-1)  # [N]
        dtype, dim = self._manifest.dtype, self._manifest.dtype.stored_width(self._manifest.layout.dim)
        if out is None:
            out = torch.empty((*ids.shape, dim), dtype=dtype.torch)
        rows = out_rows(out, ids.shape, self._manifest)  # [N, dim], shares memory with out
        deadline = time.monotonic() + self._timeout(timeout)
        parts = self._split(flat)  # shard -> positions in flat
        futures = {shard: self._pool.submit(self._read, shard, layer_id, flat[at], deadline) for shard, at in parts}
        versions = []
        for shard, at in parts:
            part_rows, version = _result(futures, shard)  # [len(at), dim]
            rows[at] = part_rows
            versions.append(version)
        return (out, sum(versions)) if return_version else out

    def push(
        self,
        layer_id: int,
        row_ids: Any,
        grads: Any,
        *,
        step_id: int = 0,
        lr_scale: float | None = None,
        timeout: float | None = None,
    ) -> PushAck:
        """Gradients [*row_ids.shape, dim] to every shard's primary (see `MemstoreClient.push`).

        Returns the sum of the shards' versions after it, the layer's optimizer step, and the rows sent.
        """
        check_layer_id(layer_id)
        ids = as_int64_array(row_ids).reshape(-1)  # [N]
        unique, summed = sum_duplicate_rows(ids, grad_rows(grads, len(ids)))  # [U], [U, dim]
        owner = self._sharding.shard_of(unique)  # [U]

        deadline = time.monotonic() + (self.config.timeout_s if timeout is None else timeout)

        def push_to(shard: int) -> PushAck:
            mine = owner == shard  # empty parts are pushed too: every shard's optimizer steps together
            while True:
                primary = self._primaries[shard]
                try:
                    return self._primary(shard).push(
                        layer_id,
                        unique[mine],
                        summed[mine],
                        step_id=step_id,
                        lr_scale=lr_scale,
                        timeout=max(0.001, deadline - time.monotonic()),
                    )
                except UnavailableError:
                    # Failover: with discovery and a step id, the push is retried on the shard's next
                    # primary (a step id makes it exactly-once: a push the old primary applied and the new
                    # one holds is answered, not applied again). Without a step id a retry could apply it twice.
                    if (
                        self._discovery is None
                        or step_id <= 0
                        or not self._wait_for_new_primary(shard, primary, deadline)
                    ):
                        raise

        acks = self._on_every_shard(push_to)
        return PushAck(sum(a.version for a in acks), max(a.layer_step for a in acks), len(unique))

    # -- internals ---------------------------------------------------------------------------

    def _wait_for_new_primary(self, shard: int, old: MemstoreClient | None, deadline: float) -> bool:
        """Wait (polling what the discovery's watch installs) until the shard's primary is another one
        than `old`, or a short while: the same primary may take the push again once it leads. False
        once `deadline` passed."""
        wake = min(deadline, time.monotonic() + _FAILOVER_POLL_S * 10)
        while time.monotonic() < wake:
            if self._primaries[shard] is not old and self._primaries[shard] is not None:
                return True
            time.sleep(_FAILOVER_POLL_S)
        return time.monotonic() < deadline

    def _split(self, flat: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, positions of its ids in `flat`) for every shard that has some."""
        # Negative ids still route somewhere (numpy's % is non-negative); that shard rejects them.
        owner = self._sharding.shard_of(flat)  # [N]
        order = np.argsort(owner, kind="stable")  # positions grouped by shard
        ends = np.cumsum(np.bincount(owner, minlength=self.num_shards))  # [S]
        return [
            (shard, order[end - count : end])
            for shard, (end, count) in enumerate(zip(ends, np.diff(ends, prepend=0)))
            if count
        ]

    def _read(self, shard: int, layer_id: int, ids: np.ndarray, deadline: float) -> tuple[np.ndarray, int]:
        """One shard's rows [len(ids), dim] (raw storage dtype) and version, retried on another replica."""
        dtype = self._manifest.dtype

        def attempt(seconds: float) -> tuple[np.ndarray, int]:  # the shard's readers as they are now
            rows, version = self._reader(shard).lookup(layer_id, ids, timeout=seconds, return_version=True)
            return dtype.raw_view(rows).reshape(len(ids), -1), version

        return self._on_replicas(shard, attempt, deadline)

    def _on_replicas(self, shard: int, attempt: Any, deadline: float) -> Any:
        """`attempt(seconds)` on the shard's readers, again (on the next replica) after a replica failed
        or took `attempt_timeout_s`, within `deadline`."""
        for number in range(1, self.config.max_attempts + 1):
            remaining = deadline - time.monotonic()
            limit = self.config.attempt_timeout_s
            attempt_s = remaining if limit is None else min(remaining, limit)
            try:
                if remaining <= 0:
                    raise DeadlineExceededError(f"the lookup's deadline passed before shard {shard} answered")
                return attempt(attempt_s)
            except _RETRY_ON_ANOTHER_REPLICA as exc:
                if number == self.config.max_attempts or deadline - time.monotonic() <= 0:
                    raise _on_shard(exc, shard, self._shards[shard].addresses) from None
                log.info("shard %d lookup attempt %d failed (%s); trying another replica", shard, number, exc)
            except MemstoreError as exc:
                raise _on_shard(exc, shard, self._shards[shard].addresses) from None
        raise AssertionError("unreachable")

    def _on_every_shard(self, call: Any) -> list[Any]:
        """`call(shard)` for every shard in parallel; results in shard order, or the first shard's error."""
        futures = {shard: self._pool.submit(call, shard) for shard in range(self.num_shards)}
        return [_result(futures, shard, self._shards[shard].addresses) for shard in range(self.num_shards)]

    def _check_cluster(self) -> tuple[Manifest, Sharding]:
        """Describe every daemon; the table's manifest and the partition assignment they all agree on."""
        seen: list[tuple[int, str, Manifest]] = []
        for shard, addresses in enumerate(self._shards):
            reachable = []
            for address in addresses.addresses:
                try:
                    with MemstoreClient(address, replace(self.config, same_host=False)) as probe:
                        reachable.append((shard, address, probe.describe()))
                except (UnavailableError, DeadlineExceededError) as exc:  # down or hung: its shard needs one up
                    log.warning("shard %d daemon %s does not answer at connect: %s", shard, address, exc)
            if not reachable:
                raise UnavailableError(f"no daemon of shard {shard} answers: {list(addresses.addresses)}")
            seen += reachable
        first_shard, first_address, first = seen[0]
        table = replace(first, sharding=None)
        sharding = first.sharding or Sharding.spread(1, 0, 1)
        for shard, address, manifest in seen:
            self._check_member(shard, address, manifest, table, sharding, f"{first_address} (shard {first_shard})")
        return table, sharding

    def _check_member(
        self,
        shard: int,
        address: str,
        manifest: Manifest,
        table: Manifest | None = None,
        sharding: Sharding | None = None,
        other: str = "the rest of the cluster",
    ) -> None:
        """LayoutMismatchError unless the daemon at `address` serves shard `shard` of the cluster's table."""
        table = self._manifest if table is None else table
        sharding = self._sharding if sharding is None else sharding
        if replace(manifest, sharding=None) != table:
            raise LayoutMismatchError(
                f"{address} (shard {shard}) serves table {manifest.fingerprint}, but {other} "
                f"serves {table.fingerprint} (or another dtype or optimizer): "
                "every daemon of a cluster must serve the same table"
            )
        held = manifest.sharding or Sharding.spread(1, 0, 1)
        if held.assignment != sharding.assignment or held.num_partitions != sharding.num_partitions:
            raise LayoutMismatchError(
                f"{address} records another partition assignment than {other}: the shards come "
                "from different `memstore create --shards` / `memstore reshard` runs"
            )
        if held.num_shards != self.num_shards or held.shard != shard:
            raise LayoutMismatchError(
                f"{address} is listed as shard {shard} of {self.num_shards} but serves shard {held.shard} "
                f"of {held.num_shards}: list the shards in order (shard-0 first), each with its own daemons"
            )

    def _timeout(self, timeout: float | None) -> float:
        return self.config.timeout_s if timeout is None else check_timeout(timeout)

    def _primary(self, shard: int) -> MemstoreClient:
        primary = self._primaries[shard]
        if primary is None:
            raise UnavailableError(
                f"shard {shard} has no primary registered in etcd (its replicas serve reads; pushes wait for "
                "a primary to register)"
            )
        return primary

    def _reader(self, shard: int) -> MemstoreClient:
        reader = self._readers[shard]
        if reader is None:
            raise UnavailableError(f"shard {shard} has no daemon registered in etcd")
        return reader

    def _clients_of(self, shard: ShardAddresses) -> tuple[MemstoreClient | None, MemstoreClient | None]:
        """(the primary's client, the readers' client) of a shard's daemons."""
        primary = None if shard.primary is None else MemstoreClient(shard.primary, self.config)
        if len(shard.addresses) > 1 or shard.read_target:
            return primary, MemstoreClient(shard.reads(), self._reader_config)
        if primary is None and shard.addresses:
            return None, MemstoreClient(shard.addresses[0], self.config)
        return primary, primary

    def _membership_changed(self, view: ClusterView) -> None:
        """Use the daemons etcd now lists (called from the discovery's watch thread)."""
        with self._lock:
            shards = list(view.shards[: self.num_shards])
            if len(view.shards) > self.num_shards:
                log.error(
                    "etcd lists %d shards, this client serves %d: reconnect to use them",
                    len(view.shards),
                    self.num_shards,
                )
            shards += [ShardAddresses(None)] * (self.num_shards - len(shards))
            for shard, (old, new) in enumerate(zip(self._shards, shards)):
                new = self._admitted(shard, old, new)
                if new == old:
                    continue
                try:
                    primary, reader = self._clients_of(new)
                except MemstoreError as exc:  # e.g. a name that does not resolve: keep what works
                    log.error("shard %d: cannot use daemons %s: %s", shard, _describe_shard(new), exc)
                    continue
                log.info("shard %d: daemons %s -> %s", shard, _describe_shard(old), _describe_shard(new))
                now = time.monotonic()
                self._retired += [
                    (now, c) for c in {id(c): c for c in (self._primaries[shard], self._readers[shard]) if c}.values()
                ]
                self._primaries[shard], self._readers[shard] = primary, reader
                self._shards = (*self._shards[:shard], new, *self._shards[shard + 1 :])
            self.spec = ClusterView(self._shards)
            self._close_retired(older_than_s=2 * self.config.timeout_s)

    def _admitted(self, shard: int, old: ShardAddresses, new: ShardAddresses) -> ShardAddresses:
        """`new` without the daemons that joined serving another table or shard (each described once;
        one that does not answer yet is kept: its health decides whether it gets reads)."""
        keep = []
        for address in new.addresses:
            if address in old.addresses:
                keep.append(address)
                continue
            try:
                with MemstoreClient(address, replace(self.config, same_host=False)) as probe:
                    self._check_member(shard, address, probe.describe())
                keep.append(address)
            except (UnavailableError, DeadlineExceededError) as exc:
                log.warning(
                    "shard %d: new daemon %s does not answer yet (%s); using it once it does", shard, address, exc
                )
                keep.append(address)
            except MemstoreError as exc:
                log.error("shard %d: leaving out %s, registered in this cluster: %s", shard, address, exc)
        primary = new.primary if new.primary in keep else None
        return ShardAddresses(primary, tuple(a for a in new.replicas if a in keep))

    def _close_retired(self, older_than_s: float) -> None:
        now = time.monotonic()
        for retired_at, client in [item for item in self._retired if now - item[0] >= older_than_s]:
            client.close()
        self._retired = [item for item in self._retired if now - item[0] < older_than_s]

    def close(self) -> None:
        """Stop following etcd; close every channel and the worker pool."""
        if self._discovery is not None:
            self._discovery.close()
        with self._lock:
            for client in {id(c): c for c in (*self._primaries, *self._readers) if c is not None}.values():
                client.close()
            self._close_retired(older_than_s=0)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe_shard(shard: ShardAddresses) -> str:
    return f"primary {shard.primary or 'none'}, replicas [{', '.join(shard.replicas)}]"


def _result(futures: dict[int, Future], shard: int, addresses: tuple[str, ...] = ()) -> Any:
    """The shard's result; on an error, wait for every part first so no call outlives this one."""
    try:
        return futures[shard].result()
    except BaseException as exc:
        for future in futures.values():
            future.exception()  # waits; their own errors are secondary to this one
        if isinstance(exc, MemstoreError) and addresses:
            raise _on_shard(exc, shard, addresses) from None
        raise


def _on_shard(exc: MemstoreError, shard: int, addresses: tuple[str, ...]) -> MemstoreError:
    """The same kind of error, saying which shard failed (once)."""
    prefix = f"shard {shard} ({', '.join(addresses)}): "
    if str(exc).startswith(prefix):
        return exc
    error = type(exc)(prefix + str(exc))
    error.code = exc.code
    return error


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name a memstore: one daemon (--memstore) or a cluster (--cluster / --shard, or
    --etcd with --cluster-name)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--memstore", metavar="HOST:PORT", help="one daemon's address")
    group.add_argument("--cluster", type=Path, metavar="FILE", help="a cluster spec (TOML: shards, replicas)")
    group.add_argument(
        "--shard",
        action="append",
        metavar="PRIMARY[,REPLICA...]",
        help="a shard's daemons, primary first; repeat once per shard, in shard order (the spec as flags)",
    )
    group.add_argument(
        "--etcd",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="find the cluster's daemons in etcd (they register with `memstore serve --etcd`), with --cluster-name",
    )
    parser.add_argument("--cluster-name", metavar="NAME", help="with --etcd: the cluster to find")
    parser.add_argument(
        "--no-data-plane",
        action="store_true",
        help="look rows up over gRPC streaming even where a daemon offers its data plane (raw rows over TCP)",
    )
    add_client_arguments(parser)


def connect(
    args: argparse.Namespace, config: ClientConfig | None = None, *, expected_fingerprint: str | None = None
) -> MemstoreClient | ClusterClient | None:
    """The client the connection flags name (None when none is given), with their TLS and token."""
    tls, token = client_security(args)
    if tls is not None or token is not None:
        config = replace(config or ClientConfig(), tls=tls, token=token)
    if args.no_data_plane:
        config = replace(config or ClientConfig(), data_plane=False)
    if (args.etcd is None) != (args.cluster_name is None):
        raise InvalidArgumentError("--etcd and --cluster-name go together (the etcd, and the cluster to find in it)")
    if args.memstore:
        return MemstoreClient(args.memstore, config, expected_fingerprint=expected_fingerprint)
    if args.etcd is not None:
        return ClusterClient.discover(args.etcd, args.cluster_name, config, expected_fingerprint=expected_fingerprint)
    if args.cluster is not None or args.shard:
        spec = ClusterSpec.from_file(args.cluster) if args.cluster is not None else ClusterSpec.from_flags(args.shard)
        return ClusterClient(spec, config, expected_fingerprint=expected_fingerprint)
    return None
