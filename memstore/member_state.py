"""What a serving daemon registers in etcd: its `MemberRecord`, read from the live table and its follower.

Apart from memstore.membership so that the client, which reads the records, never imports the engine.
"""

from __future__ import annotations

from collections.abc import Callable

from memstore.election import LeaderState, ShardElection
from memstore.live import LiveTable
from memstore.membership import MemberRecord, Role
from memstore.replica import Follower


def daemon_state(
    table: LiveTable, replica: Follower | None, address: str, election: ShardElection | None = None
) -> Callable[[], MemberRecord]:
    """What a serving daemon registers, read anew at each refresh. With an election, a replica
    promoted to leader registers as the primary, and a deposed primary as a replica that does not serve."""
    manifest = table.manifest
    shard = manifest.sharding.shard if manifest.sharding is not None else 0
    num_shards = manifest.sharding.num_shards if manifest.sharding is not None else 1

    def state() -> MemberRecord:
        common = dict(address=address, shard=shard, num_shards=num_shards, fingerprint=manifest.fingerprint)
        if election is not None:
            common["epoch"] = election.epoch
            if election.state is LeaderState.DEPOSED:
                return MemberRecord(role=Role.REPLICA, version=table.version, lag=0, serving=False, **common)
        if replica is None or table.primary is None:
            return MemberRecord(role=Role.PRIMARY, version=table.version, lag=0, trainable=table.trainable, **common)
        status = replica.status()
        return MemberRecord(
            role=Role.REPLICA,
            version=status.applied_version,
            lag=status.lag,
            serving=status.serving,
            primary=status.primary,
            **common,
        )

    return state
