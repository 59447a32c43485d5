"""The device tier: a per-layer row cache on the model's device, in front of the store.

A step's rows are looked up in the cache first; only the distinct ids it misses go to the store;
the cache then assembles the step's rows on its device (CUDA memory when the model is on a GPU,
host memory otherwise). Rows are held in the table's STORED dtype (the bytes that travel), so a
quantized table is decoded after the cache, where the prefetcher decodes it today.

Frozen tables cache freely. A trainable table is kept coherent: every row a training step reads is
pushed right after, so the cache follows the daemon's pushes (client.coherence, `WatchRows`) and
serves no row more than `CacheConfig.cache_max_lag` versions behind the newest version the client
knows of (docs/cache.md says exactly what that covers). That needs a MemstoreClient as the reader;
`CacheConfig.generation_only` skips it for a process that only generates from a table nobody trains.

Batch semantics (what the tests' brute force follows): a step is one lookup of a layer's ids.

1. Its distinct ids are looked up together, against the residents at the start of the step. An
   access (one id of the step, repeats included) hits when its row was resident then.
2. Resident rows read in the step are updated: their stamp becomes the access time of the row's last
   use in the step (accesses are numbered across steps, in the order given), their count grows by
   the row's accesses in the step.
3. The missed distinct ids are fetched once from the store and offered for admission, best first
   (LRU: latest last use; LFU: most accesses in the step, then latest; TinyLFU: highest sketch
   estimate, then latest). Free slots take the best candidates; the rest may only displace residents
   not read in this step, the victims in the policy's order (LRU and TinyLFU: oldest stamp; LFU:
   fewest counted accesses, then oldest). LRU and LFU always admit; TinyLFU admits the i-th best
   remaining candidate only if its estimate beats the i-th victim's; a static hot set admits its own
   rows only and never evicts. Candidates beyond the victims available are not admitted.

With one access per step this is plain per-access LRU (the same hits as `model.cache_sim`'s LRU),
LFU with counts kept while a row is resident (up to 2**20: hotter rows tie), and TinyLFU (a
count-min sketch, halved every `sketch_reset` x capacity additions) in front of an LRU cache.
`model.cache_sim`'s LFU counts every row's accesses forever, which needs memory for every row of
the layer; TinyLFU is the bounded version of that idea.

Everything per step is tensor work (unique, gathers, scatters, sorts of the step's ids) on the cache's
device: no Python loop per row, and no pass over every slot. The lookup index is a hash table probed
for all of a step's ids at once (one round per probe length); free slots are a stack; victims come
from queues of slots in stamp order, whose stale entries are dropped when passed. A step's work is
proportional to its ids, plus an index rebuild or queue compaction every ~capacity / step steps;
LFU scans every slot only when no resident read fewer than 16 times is left to evict.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client import metrics
from memstore.errors import InvalidArgumentError

if TYPE_CHECKING:
    from client.coherence import CoherentRows
    from client.protocol import RowReader
    from memstore.tabledir.manifest import Manifest

_SKETCH_DEPTH = 4
_STAMP_BITS = 43  # LFU's victim key: count above the access time (8.8e12 accesses before it wraps)
_LFU_COUNT_CAP = (1 << 20) - 1
_LFU_BUCKETS = 16  # LFU: a victim queue per count below this
_INDEX_SPACE = 4  # index positions per slot (a power of two at least this)
_INDEX_REBUILD = 2  # the index is rebuilt before more than 1 / this of its positions would be in use
_INDEX_MULTIPLIER = 0x1F6A_B3C5_9E37_79B9 & 0x7FFF_FFFF_FFFF_FFFF  # odd: multiplicative hashing of row ids
_EMPTY, _DELETED = -1, -2  # index positions that hold no slot
# Odd 63-bit multipliers of the sketch's rows (multiplicative hashing; the top bits are the column).
_SKETCH_MULTIPLIERS = (0x1F6A_B3C5_9E37_79B9, 0x2545_F491_4F6C_DD1D, 0x5851_F42D_4C95_7F2D, 0x14057_B7EF_767B_14F)


class CachePolicy(Enum):
    """How the device cache admits and evicts rows."""

    LRU = "lru"
    LFU = "lfu"
    TINYLFU = "tinylfu"  # a count-min frequency sketch decides whether a miss displaces the LRU victim
    STATIC = "static"  # a hot set given up front (CacheConfig.hot_rows): admitted on first use, never evicted


@dataclass(frozen=True)
class CacheConfig:
    """A device cache per layer, bounded by rows and/or bytes (the smaller bound wins)."""

    policy: CachePolicy = CachePolicy.LRU
    max_rows: int | None = 65536  # rows per layer
    max_bytes: int | None = None  # bytes of stored rows per layer
    generation_only: bool = False  # the process only generates from a table nobody trains: cache it anyway
    hot_rows: Mapping[int, Any] | None = None  # STATIC: layer id -> row ids to keep
    sketch_width_factor: int = 4  # TINYLFU: sketch columns per cached row (rounded up to a power of two)
    sketch_reset: int = 10  # TINYLFU: counters halve after this many x capacity additions
    # Trainable tables: a step is served from the cache only when its rows are at most this many
    # versions (pushes) behind the newest version the client knows of (0: none behind).
    cache_max_lag: int = 0
    coherence_wait_s: float = 5.0  # how long a step waits for that before it is served from the store
    coherence_heartbeat_s: float = 0.5  # the row watch's heartbeat when no push lands
    coherence_silence_s: float = 10.0  # a row watch silent this long is presumed dead and reopened

    def __post_init__(self) -> None:
        if self.max_rows is None and self.max_bytes is None:
            raise InvalidArgumentError("CacheConfig needs max_rows or max_bytes: the device cache is bounded")
        for name in ("max_rows", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgumentError(f"CacheConfig.{name} must be at least 1; got {value}")
        if not isinstance(self.policy, CachePolicy):
            raise InvalidArgumentError(f"CacheConfig.policy must be a CachePolicy; got {self.policy!r}")
        if (self.policy is CachePolicy.STATIC) != (self.hot_rows is not None):
            raise InvalidArgumentError("CacheConfig.hot_rows goes with CachePolicy.STATIC, and STATIC needs it")
        if self.sketch_width_factor < 1 or self.sketch_reset < 1:
            raise InvalidArgumentError("CacheConfig.sketch_width_factor and sketch_reset must be at least 1")
        if self.cache_max_lag < 0:
            raise InvalidArgumentError(
                f"CacheConfig.cache_max_lag must be 0 or more versions; got {self.cache_max_lag}"
            )
        if not self.coherence_wait_s >= 0:
            raise InvalidArgumentError(f"CacheConfig.coherence_wait_s must be 0 or more; got {self.coherence_wait_s}")
        if not 0 < self.coherence_heartbeat_s < self.coherence_silence_s:
            raise InvalidArgumentError(
                "CacheConfig needs 0 < coherence_heartbeat_s < coherence_silence_s; got "
                f"{self.coherence_heartbeat_s} and {self.coherence_silence_s}"
            )

    def capacity(self, row_bytes: int) -> int:
        """Rows per layer under both bounds."""
        bounds = [b for b in (self.max_rows, None if self.max_bytes is None else self.max_bytes // row_bytes) if b]
        if self.max_bytes is not None and self.max_bytes < row_bytes:
            raise InvalidArgumentError(f"CacheConfig.max_bytes {self.max_bytes} holds no row of {row_bytes} bytes")
        return min(bounds)


@dataclass
class CacheStats:
    """What the device tier saved: accesses served from it, and the store's rows and bytes it spared.

    `hits`/`misses` count accesses (a step's repeats included); `rows_fetched` the distinct missed rows
    fetched from the store; `rows_saved` the distinct rows served from the cache that a lookup without
    it would have fetched (the client deduplicates a step's ids either way).
    """

    tier: str = "device"
    hits: int = 0
    misses: int = 0
    rows_fetched: int = 0
    rows_saved: int = 0
    bytes_fetched: int = 0
    bytes_saved: int = 0
    admitted: int = 0
    evicted: int = 0
    rejected: int = 0  # missed rows the policy did not admit
    # Coherence under training (client.coherence); all zero for a frozen table.
    coherent: bool = False  # whether the cache follows the table's pushes
    rows_refreshed: int = 0  # resident rows overwritten with a push's after-image
    coherence_bytes: int = 0  # bytes of ids and rows the row watch received
    coherence_waits: int = 0  # steps that waited for the watch to catch up
    coherence_wait_s: float = 0.0  # their waiting time
    served_from_store: int = 0  # steps served from the store because the watch stayed too far behind (not in hits)
    resyncs: int = 0  # times the cache dropped every row (the daemon no longer held the pushes it missed)
    hits_per_layer: dict[int, int] = field(default_factory=dict)
    accesses_per_layer: dict[int, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Accesses served from the cache, over all accesses."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.tier} cache: hit rate {self.hit_rate:.1%} ({self.hits:,}/{self.hits + self.misses:,} accesses); "
            f"{self.rows_fetched:,} rows ({self.bytes_fetched:,} B) fetched, {self.rows_saved:,} rows "
            f"({self.bytes_saved:,} B) saved; {self.admitted:,} admitted, {self.evicted:,} evicted, "
            f"{self.rejected:,} rejected"
            + (
                f"; coherent: {self.rows_refreshed:,} rows refreshed ({self.coherence_bytes:,} B received), "
                f"{self.coherence_waits:,} waits ({self.coherence_wait_s:.3f}s), {self.served_from_store:,} steps "
                f"served from the store, {self.resyncs:,} resyncs"
                if self.coherent
                else ""
            )
        )


def check_cacheable(reader: Any, manifest: Manifest, config: CacheConfig) -> bool:
    """Whether the cache must follow the table's pushes (a trainable table or a replica, not `generation_only`);
    InvalidArgumentError when it must and `reader` cannot (only a MemstoreClient watches a daemon's rows)."""
    changes = getattr(reader, "mutable", None)  # a MemstoreClient: trainable, or a replica of a trained table
    if not isinstance(changes, bool):
        changes = getattr(reader, "trainable", None)
    if not isinstance(changes, bool):  # an in-process reader: trainable when the table has an optimizer
        changes = manifest.optimizer is not None
    if not changes or config.generation_only:
        return False
    if not callable(getattr(reader, "watch_rows", None)):
        raise InvalidArgumentError(
            f"the table is trainable, and a device cache over a {type(reader).__name__} cannot follow its pushes "
            "(coherence watches one daemon through a MemstoreClient): a cached row would go stale at the next "
            "push. Read through a MemstoreClient, serve the table read-only (or without an optimizer), or set "
            "CacheConfig(generation_only=True) if this process only generates from a table nobody trains"
        )
    return True


def _wide(rows: torch.Tensor) -> torch.Tensor:
    """The same bytes [n, width] viewed as the widest integer words that divide a row: CPU row copies move words."""
    row_bytes = rows.shape[1] * rows.element_size()
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        aligned = rows.storage_offset() * rows.element_size() % size == 0
        if size > rows.element_size() and row_bytes % size == 0 and aligned:
            return rows.view(dtype)
    return rows


class _StampQueue:
    """Slots in the order of their stamps (oldest first), with lazy deletion: an entry is live while its slot
    still holds that stamp, since stamps are distinct access times. Pushes append newer stamps; pops take the
    oldest live entries, dropping stale ones on the way: O(entries passed), amortised O(step) per step."""

    def __init__(self, cache: _LayerCache, size: int = 64) -> None:
        self.cache = cache
        self.stamp = torch.empty(size, dtype=torch.int64, device=cache.device)
        self.slot = torch.empty(size, dtype=torch.int64, device=cache.device)
        self.head = self.tail = 0
        self.compactions = 0

    def push(self, stamps: torch.Tensor, slots: torch.Tensor) -> None:
        """Append entries, ascending stamps newer than every entry held."""
        m = len(slots)
        if self.tail + m > len(self.slot):
            self._compact(m)
        self.stamp[self.tail : self.tail + m] = stamps
        self.slot[self.tail : self.tail + m] = slots
        self.tail += m

    def _compact(self, room: int) -> None:
        """Keep the live entries at the front, and grow so that the next compaction is at least as far away."""
        live = self.cache.live(self.stamp[self.head : self.tail], self.slot[self.head : self.tail])
        keep = torch.nonzero(live).squeeze(1) + self.head
        stamps, slots = self.stamp.index_select(0, keep), self.slot.index_select(0, keep)
        need = len(keep) + room
        if 2 * need > len(self.slot):
            size = max(2 * need, 64)
            self.stamp = torch.empty(size, dtype=torch.int64, device=self.cache.device)
            self.slot = torch.empty(size, dtype=torch.int64, device=self.cache.device)
        self.stamp[: len(keep)] = stamps
        self.slot[: len(keep)] = slots
        self.head, self.tail = 0, len(keep)
        self.compactions += 1

    def pop(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stamps, slots) of up to k oldest live entries, oldest first; the entries passed leave the queue."""
        stamps, slots = [], []
        chunk = max(2 * k, 1024)
        while k > 0 and self.head < self.tail:
            end = min(self.tail, self.head + chunk)
            st, sl = self.stamp[self.head : end], self.slot[self.head : end]
            live = torch.nonzero(self.cache.live(st, sl)).squeeze(1)
            if len(live) >= k:
                live = live[:k]
                end = self.head + int(live[-1]) + 1
            stamps.append(st.index_select(0, live))
            slots.append(sl.index_select(0, live))
            k -= len(live)
            self.head = end
            chunk *= 2
        if not slots:
            empty = torch.empty(0, dtype=torch.int64, device=self.cache.device)
            return empty, empty
        return torch.cat(stamps), torch.cat(slots)

    def unpop(self, stamps: torch.Tensor, slots: torch.Tensor) -> None:
        """Put back popped entries (oldest first) that stay resident: they are older than every entry held."""
        m = len(slots)
        self.head -= m  # pop passed at least these m entries, so the room before the head is theirs
        self.stamp[self.head : self.head + m] = stamps
        self.slot[self.head : self.head + m] = slots


class _LayerCache:
    """One layer's rows on the device, its lookup index, and the policy's per-slot state.

    `find(ids)` and `data` [capacity, width] are the cache's interface to the rest of the client. The index
    is a hash table with open addressing (linear probing) holding slots; the victims come from stamp-ordered
    queues with lazy deletion (LRU and TinyLFU: one; LFU: one per count below _LFU_BUCKETS, and a topk over
    the slots for rows read more often, needed only when every lower bucket is spent). A step's work is
    proportional to its ids, plus amortised rebuilds and compactions.
    """

    def __init__(self, capacity: int, width: int, dtype: torch.dtype, device: torch.device, config: CacheConfig,
                 hot: np.ndarray | None) -> None:  # fmt: skip
        self.policy = config.policy
        self.device = device
        if hot is not None:
            hot_ids = torch.unique(torch.as_tensor(np.asarray(hot, dtype=np.int64), device=device))
            if len(hot_ids) > capacity:
                raise InvalidArgumentError(f"the hot set has {len(hot_ids):,} rows; the cache holds {capacity:,}")
            self.hot = hot_ids  # sorted
            capacity = max(1, len(hot_ids))
        self.capacity = capacity
        self.data = torch.empty(capacity, width, dtype=dtype, device=device)  # [C, width] stored rows
        self.slot_key = torch.full((capacity,), -1, dtype=torch.int64, device=device)  # -1: free
        self.stamp = torch.zeros(capacity, dtype=torch.int64, device=device)  # access time of the last use
        self.count = torch.zeros(capacity, dtype=torch.int64, device=device)  # accesses while resident
        self.free = torch.arange(capacity - 1, -1, -1, dtype=torch.int64, device=device)  # a stack: free[:n_free]
        self.n_free = capacity
        # The index: table positions hold a slot, _EMPTY or _DELETED; a key's position is in slot_pos.
        bits = max(4, int(np.ceil(np.log2(capacity * _INDEX_SPACE))))
        self.index_shift = 64 - bits
        self.index = torch.full((1 << bits,), _EMPTY, dtype=torch.int64, device=device)
        self.index_used = 0  # positions not _EMPTY (live keys and deletion marks): probes end at _EMPTY
        self.index_rebuilds = 0
        self.slot_pos = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.queues = [_StampQueue(self) for _ in range(_LFU_BUCKETS if self.policy is CachePolicy.LFU else 1)]
        self.overflow_scans = 0  # LFU: steps whose victims needed the topk over all slots
        self.clock = 0  # accesses seen
        self.lock = threading.Lock()  # steps of one layer may run on two workers (prefetch depth 2)
        if self.policy is CachePolicy.TINYLFU:
            width_bits = max(4, int(np.ceil(np.log2(capacity * config.sketch_width_factor))))
            self.sketch_shift = 64 - width_bits
            self.sketch = torch.zeros(_SKETCH_DEPTH, 1 << width_bits, dtype=torch.int32, device=device)
            self.sketch_mult = torch.tensor(
                [m & 0x7FFF_FFFF_FFFF_FFFF for m in _SKETCH_MULTIPLIERS], dtype=torch.int64, device=device
            )
            self.sketch_added = 0
            self.sketch_period = config.sketch_reset * capacity

    def _columns(self, ids: torch.Tensor) -> torch.Tensor:
        """[depth, n] sketch columns: the top bits of ids * multiplier (wrapping int64 products)."""
        product = ids.unsqueeze(0) * self.sketch_mult.unsqueeze(1)  # [depth, n]
        return (product >> self.sketch_shift) & ((1 << (64 - self.sketch_shift)) - 1)

    def _estimate(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.gather(self.sketch, 1, self._columns(ids)).amin(dim=0).to(torch.int64)  # min(dim) is slow on CPU

    def _record(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        self.sketch.scatter_add_(1, self._columns(ids), counts.to(torch.int32).unsqueeze(0).expand(_SKETCH_DEPTH, -1))
        self.sketch_added += int(counts.sum())
        if self.sketch_added >= self.sketch_period:  # aging: old popularity fades
            self.sketch >>= 1
            self.sketch_added //= 2

    def _home(self, ids: torch.Tensor) -> torch.Tensor:
        """Index positions where the ids' probes start (multiplicative hashing: the product's top bits)."""
        return ((ids * _INDEX_MULTIPLIER) >> self.index_shift) & (len(self.index) - 1)

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Slots of `ids` (-1 where not resident)."""
        slots = torch.full_like(ids, -1)
        active = torch.arange(len(ids), dtype=torch.int64, device=self.device)
        pos = self._home(ids)
        mask = len(self.index) - 1
        while len(active):  # one round per probe length: every id still probing moves one position on
            held = self.index.index_select(0, pos)
            key = self.slot_key.index_select(0, held.clamp(min=0))
            found = (held >= 0) & (key == ids.index_select(0, active))
            slots.index_copy_(0, active.masked_select(found), held.masked_select(found))
            going = ~found & (held != _EMPTY)
            active, pos = active.masked_select(going), (pos.masked_select(going) + 1) & mask
        return slots

    def _index_insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Add ids (none resident, distinct) that now hold `slots`: each takes the first free position of its probe."""
        if self.index_used + len(ids) > len(self.index) // _INDEX_REBUILD:
            self._index_rebuild()
        mask = len(self.index) - 1
        pos = self._home(ids)
        while len(slots):  # ids probing for the same free position: one of them takes it, the rest move on
            held = self.index.index_select(0, pos)
            vacant = held < 0
            claim, claimers = pos.masked_select(vacant), slots.masked_select(vacant)
            self.index.index_put_((claim,), claimers)
            won = torch.zeros_like(vacant)
            won[vacant] = self.index.index_select(0, claim) == claimers
            self.slot_pos.index_copy_(0, slots.masked_select(won), pos.masked_select(won))
            self.index_used += int((held.masked_select(won) == _EMPTY).sum())
            going = ~won
            slots, pos = slots.masked_select(going), (pos.masked_select(going) + 1) & mask

    def _index_remove(self, slots: torch.Tensor) -> None:
        """Take the ids held in `slots` out of the index (a deletion mark keeps later probes going)."""
        self.index.index_fill_(0, self.slot_pos.index_select(0, slots), _DELETED)

    def _index_rebuild(self) -> None:
        """Drop the deletion marks: reinsert every resident into an empty index (O(capacity), every
        ~capacity / step insertions)."""
        self.index.fill_(_EMPTY)
        self.index_used = 0
        self.index_rebuilds += 1
        occupied = torch.nonzero(self.slot_key >= 0).squeeze(1)
        if len(occupied):
            self._index_insert(self.slot_key.index_select(0, occupied), occupied)

    def live(self, stamps: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Which queue entries still stand for their slot's resident (stamps are distinct access times)."""
        return (self.stamp.index_select(0, slots) == stamps) & (self.slot_key.index_select(0, slots) >= 0)

    def _enqueue(self, slots: torch.Tensor) -> None:
        """Queue the slots read or filled in this step at their new stamps (LFU: in their count's bucket)."""
        if self.policy is CachePolicy.STATIC or len(slots) == 0:
            return
        stamps = self.stamp.index_select(0, slots)
        if self.policy is not CachePolicy.LFU:
            order = torch.argsort(stamps)
            self.queues[0].push(stamps.index_select(0, order), slots.index_select(0, order))
            return
        bucket = self.count.index_select(0, slots).clamp(max=_LFU_BUCKETS)
        order = torch.argsort((bucket << _STAMP_BITS) | stamps)
        sizes = torch.bincount(bucket, minlength=_LFU_BUCKETS + 1).tolist()
        at = 0
        for b, size in enumerate(sizes[:_LFU_BUCKETS]):  # counts of _LFU_BUCKETS and above are found by topk
            if size and b:
                part = order[at : at + size]
                self.queues[b].push(stamps.index_select(0, part), slots.index_select(0, part))
            at += size

    def _victims(self, k: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stamps, slots) of the k first victims in the policy's order, among residents not read in this step."""
        if self.policy is not CachePolicy.LFU:
            return self.queues[0].pop(k)
        stamps, slots = [self.stamp[:0]], [self.stamp[:0]]
        for queue in self.queues[1:]:  # fewest accesses first, then oldest
            if k == 0:
                break
            st, sl = queue.pop(k)
            stamps.append(st)
            slots.append(sl)
            k -= len(sl)
        if k:  # rows read _LFU_BUCKETS times or more: counts above 2**20 tie
            self.overflow_scans += 1
            key = (self.count.clamp(max=_LFU_COUNT_CAP) << _STAMP_BITS) | self.stamp
            untouched = (self.slot_key >= 0) & (self.stamp < start) & (self.count >= _LFU_BUCKETS)
            key = torch.where(untouched, key, torch.full_like(key, torch.iinfo(torch.int64).max))
            sl = torch.topk(key, k, largest=False, sorted=True).indices
            stamps.append(self.stamp.index_select(0, sl))
            slots.append(sl)
        return torch.cat(stamps), torch.cat(slots)

    def step(self, ids: torch.Tensor, fetch: Callable[[torch.Tensor], torch.Tensor], stats: CacheStats,
             stats_lock: threading.Lock, layer: int, row_bytes: int) -> torch.Tensor:  # fmt: skip
        """Rows [N, width] for flat `ids` [N]: hits from the cache, misses from `fetch(distinct ids)`."""
        n = len(ids)
        uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        times = torch.arange(self.clock, self.clock + n, dtype=torch.int64, device=self.device)
        last = torch.zeros(len(uniq), dtype=torch.int64, device=self.device)
        last.scatter_reduce_(0, inverse, times, reduce="amax", include_self=False)
        start = self.clock
        self.clock += n
        slots = self.find(uniq)
        hit = slots >= 0
        hit_at = torch.nonzero(hit).squeeze(1)
        miss_at = torch.nonzero(~hit).squeeze(1)
        hit_slots = slots.index_select(0, hit_at)
        hit_counts = counts.index_select(0, hit_at)
        self.stamp.index_copy_(0, hit_slots, last.index_select(0, hit_at))
        self.count.index_add_(0, hit_slots, hit_counts)
        if self.policy is CachePolicy.TINYLFU:
            self._record(uniq, counts)
        rows = torch.empty(len(uniq), self.data.shape[1], dtype=self.data.dtype, device=self.device)
        wide = _wide(rows)
        # The hits' rows before the fill below may reuse victims' slots.
        wide.index_copy_(0, hit_at, _wide(self.data).index_select(0, hit_slots))
        admitted = evicted = 0
        filled = hit_slots[:0]
        if len(miss_at):
            miss_ids = uniq.index_select(0, miss_at)
            fetched = fetch(miss_ids).to(self.device, non_blocking=False).reshape(len(miss_ids), -1).contiguous()
            wide.index_copy_(0, miss_at, _wide(fetched))
            filled, evicted = self._fill(miss_ids, fetched, counts.index_select(0, miss_at),
                                         last.index_select(0, miss_at), start, len(hit_at))  # fmt: skip
            admitted = len(filled)
        self._enqueue(torch.cat([hit_slots, filled]))
        hit_accesses = int(hit_counts.sum())
        distinct_hits = len(hit_at)
        with stats_lock:  # the layers' workers share one CacheStats
            self._count(stats, layer, n, hit_accesses, distinct_hits, len(miss_at), admitted, evicted, row_bytes)
        metrics.count_cache(layer, stats.tier, hit_accesses, n - hit_accesses, distinct_hits * row_bytes)
        return wide.index_select(0, inverse).view(self.data.dtype)  # [N, width]

    @staticmethod
    def _count(stats: CacheStats, layer: int, n: int, hit_accesses: int, distinct_hits: int, misses: int,
               admitted: int, evicted: int, row_bytes: int) -> None:  # fmt: skip
        stats.admitted += admitted
        stats.evicted += evicted
        stats.rejected += misses - admitted
        stats.hits += hit_accesses
        stats.misses += n - hit_accesses
        stats.rows_fetched += misses
        stats.bytes_fetched += misses * row_bytes
        stats.rows_saved += distinct_hits
        stats.bytes_saved += distinct_hits * row_bytes
        stats.hits_per_layer[layer] = stats.hits_per_layer.get(layer, 0) + hit_accesses
        stats.accesses_per_layer[layer] = stats.accesses_per_layer.get(layer, 0) + n

    def _fill(self, ids: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, last: torch.Tensor, start: int,
              hits: int) -> tuple[torch.Tensor, int]:  # fmt: skip
        """Admit missed rows under the policy (the module docstring's batch semantics, step 3), given the
        step's distinct hits: (the slots filled, rows evicted)."""
        none = torch.empty(0, dtype=torch.int64, device=self.device)
        if self.policy is CachePolicy.STATIC:
            if len(self.hot) == 0:
                return none, 0
            pos = torch.searchsorted(self.hot, ids).clamp_(max=len(self.hot) - 1)
            order = torch.nonzero(self.hot.index_select(0, pos) == ids).squeeze(1)
            free = self._take_free(len(order))  # every hot row fits: capacity is the hot set
            self._write(free, ids, rows, counts, last, order)
            return free, 0
        # Candidates best first: the policy's key, then the latest use (sorts are stable: ties keep id order).
        if self.policy is CachePolicy.TINYLFU:
            estimate = self._estimate(ids)
            primary = estimate
        else:
            estimate = None
            primary = counts if self.policy is CachePolicy.LFU else None
        order = torch.argsort(last, descending=True, stable=True)
        if primary is not None:
            order = order[torch.argsort(primary.index_select(0, order), descending=True, stable=True)]
        untouched = self.capacity - self.n_free - hits  # residents not read in this step
        into_free = order[: self.n_free]
        rest = order[self.n_free :]
        free = self._take_free(len(into_free))
        victims = none
        if len(rest):
            stamps, victims = self._victims(min(len(rest), untouched), start)
            rest = rest[: len(victims)]
            if estimate is not None:
                admit = estimate.index_select(0, rest) > self._estimate(self.slot_key.index_select(0, victims))
                self.queues[0].unpop(stamps[~admit], victims[~admit])  # kept: still the oldest residents
                rest, victims = rest[admit], victims[admit]
            self._index_remove(victims)
        slots = torch.cat([free, victims])
        self._write(slots, ids, rows, counts, last, torch.cat([into_free, rest]))
        return slots, len(victims)

    def _take_free(self, m: int) -> torch.Tensor:
        """Pop m free slots off the stack."""
        self.n_free -= m
        return self.free[self.n_free : self.n_free + m].flip(0)

    def _write(self, slots: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
               last: torch.Tensor, chosen: torch.Tensor) -> None:  # fmt: skip
        """Store the chosen candidates' rows in slots (any previous ids of theirs already left the index)."""
        if len(slots) == 0:
            return
        new_ids = ids.index_select(0, chosen)
        _wide(self.data).index_copy_(0, slots, _wide(rows).index_select(0, chosen))
        self.slot_key.index_copy_(0, slots, new_ids)
        self.stamp.index_copy_(0, slots, last.index_select(0, chosen))
        self.count.index_copy_(0, slots, counts.index_select(0, chosen))
        self._index_insert(new_ids, slots)

    def resident(self) -> torch.Tensor:
        """The resident ids, ascending."""
        return torch.sort(self.slot_key.masked_select(self.slot_key >= 0)).values


class DeviceCache:
    """Per-layer row caches on one device, for a table's stored rows (`manifest` gives width and dtype).

    `follow(client)` keeps them coherent with a trainable table (client.coherence); `close()` stops that.
    """

    def __init__(self, manifest: Manifest, config: CacheConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.storage = manifest.dtype
        self.width = manifest.dtype.stored_width(manifest.layout.dim)
        self.row_bytes = manifest.dtype.row_bytes(manifest.layout.dim)
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._capacity = config.capacity(self.row_bytes)
        self._hot = dict(config.hot_rows or {})
        unknown = set(self._hot) - set(manifest.layout.layer_ids)
        if unknown:
            raise InvalidArgumentError(f"CacheConfig.hot_rows names layers {sorted(unknown)} the table does not have")
        self.layers = {layer: self._new_layer(layer) for layer in manifest.layout.layer_ids}
        # Coherence (client.coherence): a lock per layer taken around every lookup, change and reset (the
        # layer's cache object is replaced on a reset), and each slot's version: the table version its row
        # was fetched at or last changed to (-1: never).
        self._locks = {layer: threading.Lock() for layer in self.layers}
        self.slot_version = {layer: self._new_versions(layer) for layer in self.layers}
        self.coherence: CoherentRows | None = None
        # The CUDA stream the lookups run on (a Prefetcher's copy stream; None: the thread's current one):
        # changes are written on it too, so a queued fill never lands after a newer change of its slot.
        self.stream: torch.cuda.Stream | None = None

    def _on_stream(self) -> contextlib.AbstractContextManager:
        if self.stream is None:
            return contextlib.nullcontext()
        return _both(torch.cuda.device(self.device), torch.cuda.stream(self.stream))

    def _new_layer(self, layer: int) -> _LayerCache:
        hot = None if self.config.policy is not CachePolicy.STATIC else self._hot.get(layer, np.empty(0, np.int64))
        return _LayerCache(self._capacity, self.width, self.storage.torch, self.device, self.config, hot)

    def _new_versions(self, layer: int) -> torch.Tensor:
        return torch.full((self.layers[layer].data.shape[0],), -1, dtype=torch.int64, device=self.device)

    def follow(self, client: Any, timeout: float | None = None) -> None:
        """Keep the cached rows coherent with the pushes of the table `client` (a MemstoreClient) reads."""
        from client.coherence import CoherentRows  # the coherence module builds on this one

        if self.coherence is None:
            self.stats.coherent = True
            self.coherence = CoherentRows(client, self, self.config, timeout)

    def lookup(self, layer_id: int, row_ids: Any, fetch: Callable[[np.ndarray], Any]) -> torch.Tensor:
        """Rows [*row_ids.shape, width] of one layer on the cache's device, in the stored dtype.

        `fetch(ids)` reads distinct missed ids (int64 numpy, ascending) from the store: rows [len(ids), width],
        or (rows, the table version they show) when the cache is coherent (MemstoreClient's `return_version`).
        """
        cache = self.layers.get(layer_id)
        if cache is None:
            raise InvalidArgumentError(f"the table has layers {sorted(self.layers)}, not {layer_id}")
        ids = torch.as_tensor(np.asarray(row_ids, dtype=np.int64) if not isinstance(row_ids, torch.Tensor) else row_ids)
        shape = tuple(ids.shape)
        flat = ids.to(self.device, torch.int64).reshape(-1)
        if self.coherence is not None and not self.coherence.ready():  # too far behind: the store serves the step
            uniq, inverse = torch.unique(flat, return_inverse=True)
            rows, _ = _rows_and_version(fetch(uniq.cpu().numpy()))
            return rows.to(self.device).reshape(len(uniq), -1)[inverse].view(*shape, self.width)
        fetched: list[tuple[torch.Tensor, int]] = []

        def fetch_missed(miss: torch.Tensor) -> torch.Tensor:
            rows, version = _rows_and_version(fetch(miss.cpu().numpy()))
            fetched.append((miss, version))
            return rows

        with self._locks[layer_id]:
            cache = self.layers[layer_id]  # a reset may have replaced it
            with cache.lock:
                rows = cache.step(flat, fetch_missed, self.stats, self._stats_lock, layer_id, self.row_bytes)
            for miss, version in fetched:  # the rows admitted in this step show `version`
                slots = cache.find(miss)
                self.slot_version[layer_id][slots[slots >= 0]] = version
        return rows.view(*shape, self.width)

    def apply_change(self, layer_id: int, version: int, ids: np.ndarray, rows: np.ndarray) -> int:
        """Write a push's rows (ids [N], stored rows [N, width]) into the slots holding them, where the
        slot's row is older than `version`; returns the rows written."""
        with self._locks[layer_id], self._on_stream():
            cache = self.layers[layer_id]
            slots = cache.find(
                torch.from_numpy(np.array(ids, dtype=np.int64)).to(self.device)
            )  # a copy: ids are read-only
            versions = self.slot_version[layer_id]
            resident = torch.nonzero(slots >= 0).squeeze(1)
            resident = resident[versions[slots[resident]] < version]
            if len(resident) == 0:
                return 0
            take = resident.cpu().numpy()
            values = self.storage.to_torch(np.ascontiguousarray(rows[take])).to(self.device)
            target = slots[resident]
            cache.data[target] = values
            versions[target] = version
            return len(take)

    def invalidate(self) -> None:
        """Drop every cached row (all layers at once: no lookup runs meanwhile)."""
        for lock in self._locks.values():
            lock.acquire()
        try:
            if self.stream is not None:  # queued work of the lookups still uses the old tensors
                self.stream.synchronize()
            for layer in self.layers:
                self.layers[layer] = self._new_layer(layer)
                self.slot_version[layer] = self._new_versions(layer)
        finally:
            for lock in self._locks.values():
                lock.release()

    def count_coherence(self, *, rows_refreshed: int = 0, bytes_received: int = 0, waits: int = 0,
                        wait_s: float = 0.0, served_from_store: int = 0, resyncs: int = 0) -> None:  # fmt: skip
        """Add to the coherence counters (stats and, when enabled, the client's metrics)."""
        with self._stats_lock:
            stats = self.stats
            stats.rows_refreshed += rows_refreshed
            stats.coherence_bytes += bytes_received
            stats.coherence_waits += waits
            stats.coherence_wait_s += wait_s
            stats.served_from_store += served_from_store
            stats.resyncs += resyncs
        metrics.count_coherence(rows_refreshed, bytes_received, waits, wait_s, served_from_store, resyncs)

    def memory_bytes(self) -> int:
        """Device memory the cached rows take, over all layers (their capacity, allocated up front)."""
        return sum(c.data.numel() * c.data.element_size() for c in self.layers.values())

    def close(self) -> None:
        """Stop following the table's pushes (idempotent); the cached rows stay readable."""
        if self.coherence is not None:
            self.coherence.close()


def open_cache(reader: Any, manifest: Manifest, config: CacheConfig, device: torch.device | str = "cpu",
               timeout: float | None = None) -> DeviceCache:  # fmt: skip
    """A DeviceCache for the table `reader` serves, following its pushes when it is trainable
    (`check_cacheable` says when, and refuses a reader that cannot)."""
    coherent = check_cacheable(reader, manifest, config)
    cache = DeviceCache(manifest, config, device)
    if coherent:
        cache.follow(reader, timeout)
    return cache


@contextlib.contextmanager
def _both(first: Any, second: Any) -> Any:
    with first, second:
        yield


def _rows_and_version(fetched: Any) -> tuple[torch.Tensor, int]:
    """A fetch's (rows, version); a reader without versions (a frozen table's) reports -1."""
    if isinstance(fetched, tuple):
        return fetched[0], int(fetched[1])
    return fetched, -1


class CachedReader:
    """A `RowReader` with a device cache in front: lookups fetch only the distinct ids the cache misses.

    Rows come back on the CPU as `RowReader.lookup` promises (in `out` when given); a `Prefetcher` with
    `PrefetchConfig(cache=...)` keeps them on its device instead. Over a trainable table's MemstoreClient
    the cache follows the pushes (client.coherence): `close()` stops that.
    """

    def __init__(self, reader: RowReader, config: CacheConfig, device: torch.device | str = "cpu",
                 timeout: float | None = None) -> None:  # fmt: skip
        self.reader = reader
        manifest = reader.describe(timeout)
        self.cache = open_cache(reader, manifest, config, device, timeout)
        self._manifest = manifest

    @property
    def stats(self) -> CacheStats:
        """The cache's counters."""
        return self.cache.stats

    def describe(self, timeout: float | None = None) -> Manifest:
        """The table's manifest (as read when the cache was made)."""
        return self._manifest

    def lookup(
        self, layer_id: int, row_ids: Any, *, timeout: float | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows [*row_ids.shape, width] in the stored dtype on the CPU, hits from the cache."""
        versioned = self.cache.coherence is not None

        def fetch(miss: np.ndarray) -> Any:
            if versioned:
                return self.reader.lookup(layer_id, miss, timeout=timeout, return_version=True)  # type: ignore[call-arg]
            return self.reader.lookup(layer_id, miss, timeout=timeout)

        rows = self.cache.lookup(layer_id, row_ids, fetch)
        if out is not None:
            return out.view(rows.shape).copy_(rows)
        return rows.cpu() if rows.device.type != "cpu" else rows

    def close(self) -> None:
        """Stop following the table's pushes (idempotent)."""
        self.cache.close()

    def __enter__(self) -> CachedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
