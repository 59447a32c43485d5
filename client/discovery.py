"""Discovery: a cluster's daemons as they register in etcd (memstore serve --etcd --cluster-name).

`Discovery` lists the cluster's member keys (memstore.membership owns their layout and record),
then follows them with a watch: each change (a daemon joining, leaving, changing role) is a new
`ClusterView` handed to `on_change`. `ClusterClient.discover` builds on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from client.cluster_spec import ShardAddresses
from memstore.errors import InvalidArgumentError, UnavailableError
from memstore.etcd import EtcdClient, EventKind, Watch, WatchEvent
from memstore.membership import MemberRecord, Role, check_cluster_name, members_prefix

log = logging.getLogger("client.discovery")


@dataclass(frozen=True)
class ClusterView:
    """The members of each shard, as etcd last showed them."""

    shards: tuple[ShardAddresses, ...]  # shard order; a shard without a primary has primary None

    def complete(self) -> bool:
        """Every shard has a daemon."""
        return all(shard.addresses for shard in self.shards)


def view_of(records: Sequence[MemberRecord]) -> ClusterView:
    """The view the records describe: per shard, its primary (the one registered last, should there
    be two) and its replicas in address order. The number of shards is the largest the records say."""
    num_shards = max((r.num_shards for r in records), default=0)
    shards = []
    for shard in range(num_shards):
        mine = [r for r in records if r.shard == shard]
        # The highest leader epoch wins (a deposed primary may still be registered for a while), then
        # the one registered last.
        ranked = sorted((r for r in mine if r.role is Role.PRIMARY), key=lambda r: r.epoch)
        primaries = [r.address for r in ranked]
        replicas = tuple(sorted(r.address for r in mine if r.role is Role.REPLICA))
        shards.append(ShardAddresses(primaries[-1] if primaries else None, replicas))
    return ClusterView(tuple(shards))


class Discovery:
    """Follows a cluster's membership in etcd. Thread-safe; a context manager.

    `on_change(view)` is called from the watch thread after each change (never concurrently).
    """

    def __init__(self, endpoints: str | Sequence[str], cluster: str, *, timeout_s: float = 5.0) -> None:
        self.cluster = check_cluster_name(cluster)
        self._prefix = members_prefix(cluster)
        self._etcd = EtcdClient(endpoints, timeout_s=timeout_s)
        self._lock = threading.Lock()
        self._members: dict[bytes, tuple[int, MemberRecord]] = {}  # key -> (create revision, record)
        self._revision = 0  # of the last listing
        self._watch: Watch | None = None
        self._on_change: Callable[[ClusterView], None] | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._etcd.endpoints

    def view(self) -> ClusterView:
        """The members as last seen."""
        with self._lock:
            ordered = sorted(self._members.values(), key=lambda item: item[0])
        return view_of([record for _, record in ordered])

    def wait_for_complete(self, timeout_s: float) -> ClusterView:
        """List the members until every shard has one; UnavailableError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._list()
            view = self.view()
            if view.shards and view.complete():
                return view
            if time.monotonic() > deadline:
                missing = [s for s, shard in enumerate(view.shards) if not shard.addresses]
                said = f"shards {missing} have no daemon" if view.shards else "no daemon is registered"
                raise UnavailableError(
                    f"cluster {self.cluster!r} in etcd at {','.join(self.endpoints)}: {said} "
                    f"(waited {timeout_s:g}s): start them with `memstore serve --etcd ... "
                    f"--cluster-name {self.cluster}`"
                )
            time.sleep(0.1)

    def follow(self, on_change: Callable[[ClusterView], None]) -> None:
        """Watch for changes from the last listing on, calling `on_change` with each new view."""
        self._on_change = on_change
        self._watch = Watch(self._etcd, self._prefix, self._on_events, self._revision + 1, on_reset=self._relist)
        self._watch.start()

    def _list(self) -> int:
        kvs, revision = self._etcd.get_prefix(self._prefix)
        members = {}
        for kv in kvs:
            record = _record(kv.key, kv.value)
            if record is not None:
                members[kv.key] = (kv.create_revision, record)
        with self._lock:
            self._members, self._revision = members, revision
        return revision

    def _relist(self) -> int:
        revision = self._list()
        self._changed()
        return revision

    def _on_events(self, events: list[WatchEvent]) -> None:
        with self._lock:
            for event in events:
                if event.kind is EventKind.DELETE:
                    self._members.pop(event.kv.key, None)
                    continue
                record = _record(event.kv.key, event.kv.value)
                if record is not None:
                    self._members[event.kv.key] = (event.kv.create_revision, record)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.view())

    def close(self) -> None:
        """Stop following and close the connection to etcd."""
        if self._watch is not None:
            self._watch.stop()
        self._etcd.close()

    def __enter__(self) -> Discovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record(key: bytes, value: bytes) -> MemberRecord | None:
    try:
        return MemberRecord.decode(value)
    except InvalidArgumentError as exc:  # someone else's key under the prefix: not a member
        log.warning("ignoring %s: %s", key.decode(errors="replace"), exc)
        return None
