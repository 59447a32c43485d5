"""Cache statistics of one Engram layer's row-id stream, read from disk in chunks (bounded memory).

A stream is the layer's rows in access order: token after token, each token's (N-1)*K rows in storage
order (order 2's K heads first), so access t belongs to order 2 + (t % heads) // K. One cache per
layer holds whole rows; a hit is an access to a resident row. Three policies:

- LRU, for every cache size at once: the stack distance of an access (distinct rows used since the
  row's previous use, itself included) is found with a Fenwick tree over last-use times; an access
  hits a cache of S rows exactly when its distance is at most S (Mattson et al. 1970). Markers deeper
  than the largest size simulated are forgotten at compaction: a depth only grows until the row is used
  again, so their next use misses every cache simulated.
- LFU ("perfect" LFU, as FBGEMM's): a row's count is every access to it so far, resident or not; a
  miss always admits the row and evicts the resident row with the fewest accesses (the least recently
  used among equals).
- OPT, the offline optimum (Belady's MIN with bypass): on a miss with a full cache, the row among the
  residents and the new one whose next use is farthest is left out, so the new row is not admitted
  when it is that row. Next-use times come from a backward pass, kept on disk.

A first pass (`remap_pass`) renames rows to dense ids in order of first touch, so that the others work
on arrays the size of the rows the text touched. Memory follows the rows touched (at most the layer's
rows), never the stream's length: the renaming map (4 bytes x the layer's rows, during the first pass
only), then per touched row a few uint32 arrays, the LRU tree (8 bytes x 2 x the largest size, at most
the touched rows) and a heap (12 bytes x cache size); the streams are read a chunk at a time. The hot
loops are model/_cachesim.c when it is built; otherwise the pure-Python functions below run the same
algorithms (correct, about 100x slower; the tests check they agree).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

try:
    from model import _cachesim as _compiled
except ImportError:  # built without a C compiler: the Python functions below run instead
    _compiled = None

NONE = 0xFFFFFFFF  # no slot / no next use / not resident
LOG2_BINS = 64  # log2 stack-distance bins; then "deeper than the largest cache", then compulsory
DEFAULT_CHUNK = 1 << 22  # accesses read at a time (16 MiB of uint32)


class Policy(Enum):
    """The cache replacement policies simulated."""

    LRU = "lru"
    LFU = "lfu"
    OPT = "opt"


@dataclass(frozen=True)
class StreamShape:
    """How to read a layer's stream: rows in the layer, accesses per token, heads per order."""

    num_rows: int
    heads: int
    per_order: int

    @property
    def orders(self) -> int:
        return self.heads // self.per_order


@dataclass
class LruResult:
    """The LRU pass: accesses per row, and per order the hits of every cache size and the distances."""

    counts: np.ndarray  # uint32 [rows]: accesses per row
    hits: np.ndarray  # int64 [orders, sizes]: hits of an LRU cache of each size
    accesses: np.ndarray  # int64 [orders]
    compulsory: np.ndarray  # int64 [orders]: first touches
    log2hist: np.ndarray  # int64 [orders, 66]: stack distances in (2**(b-1), 2**b], then deeper, then compulsory
    growth: list[tuple[int, np.ndarray]]  # (accesses so far, first touches so far per order) at each checkpoint


def compiled_available() -> bool:
    """Whether the C extension was built."""
    return _compiled is not None


def _check(shape: StreamShape, n: int) -> None:
    if shape.num_rows >= NONE or n >= NONE:
        raise ValueError(f"a layer of {shape.num_rows:,} rows and {n:,} accesses exceeds the uint32 stream format")
    if shape.heads % shape.per_order:
        raise ValueError(f"{shape.heads} accesses per token is not a multiple of {shape.per_order} heads per order")


def chunks(path: Path, n: int, chunk: int = DEFAULT_CHUNK, reverse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """(first access time, uint32 rows) of a raw little-endian uint32 file, one chunk in memory at a time."""
    starts = list(range(0, n, chunk))
    with open(path, "rb") as f:
        for start in reversed(starts) if reverse else starts:
            count = min(chunk, n - start)
            f.seek(start * 4)
            rows = np.fromfile(f, dtype="<u4", count=count)
            if len(rows) != count:
                raise ValueError(f"{path} holds fewer than {n:,} accesses")
            yield start, rows


def remap_pass(
    path: Path,
    n: int,
    num_rows: int,
    out: Path,
    compiled: bool | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Write the stream with dense ids (0, 1, ... in order of first touch) to `out`; return the rows the
    dense ids stand for (uint32 [distinct rows]). Every later pass then works on arrays the size of the
    rows the text touched, a few million, instead of the layer's hundreds of millions: the same hits
    (a cache never looks at a row id's value), in memory that fits the processor's caches far better."""
    _check(StreamShape(num_rows, 1, 1), n)
    run = _compiled.remap if _use_compiled(compiled) else _remap_py
    idmap = np.full(num_rows, NONE, dtype=np.uint32)
    state = np.zeros(1, dtype=np.uint64)
    touched = []
    with open(out, "wb") as f:
        for _, rows in chunks(path, n, chunk):
            dense = np.empty(len(rows), dtype=np.uint32)
            fresh = np.empty(len(rows), dtype=np.uint32)
            k = run(rows, idmap, state, dense, fresh)
            touched.append(fresh[:k].copy())
            f.write(dense.astype("<u4", copy=False).tobytes())
            if progress:
                progress(len(rows))
    return np.concatenate(touched) if touched else np.zeros(0, dtype=np.uint32)


def lru_pass(
    path: Path,
    n: int,
    shape: StreamShape,
    sizes: np.ndarray,
    compiled: bool | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], object] | None = None,
    checkpoint: int | None = None,
) -> LruResult:
    """Accesses per row, compulsory misses and LRU hits for every size in `sizes` (ascending rows); the
    first touches so far after every `checkpoint` accesses and at the end (how distinct rows grow)."""
    _check(shape, n)
    sizes = np.asarray(sizes, dtype=np.uint64)
    if len(sizes) == 0 or np.any(np.diff(sizes.astype(np.int64)) <= 0) or sizes[0] < 1:
        raise ValueError("cache sizes must be ascending positive row counts")
    run = _compiled.lru if _use_compiled(compiled) else _lru_py
    orders = shape.orders
    counts = np.zeros(shape.num_rows, dtype=np.uint32)
    last_slot = np.full(shape.num_rows, NONE, dtype=np.uint32)
    # Compaction every ~largest-size accesses: amortised O(1) each. Never more live markers than rows.
    capacity = 2 * min(int(sizes[-1]), shape.num_rows) + 1024
    tree = np.zeros(capacity, dtype=np.uint32)
    slot_row = np.zeros(capacity, dtype=np.uint32)
    state = np.zeros(2, dtype=np.uint64)
    binned = np.zeros((orders, len(sizes) + 2), dtype=np.uint64)
    log2hist = np.zeros((orders, LOG2_BINS + 2), dtype=np.uint64)
    growth: list[tuple[int, np.ndarray]] = []
    for t0, rows in chunks(path, n, chunk):
        start = 0
        while start < len(rows):  # pieces that end on checkpoints
            end = len(rows) if not checkpoint else min(len(rows), ((t0 + start) // checkpoint + 1) * checkpoint - t0)
            piece = rows[start:end]
            run(piece, t0 + start, shape.heads, shape.per_order, counts, last_slot, tree, slot_row, state, sizes,
                binned, log2hist)  # fmt: skip
            if checkpoint and ((t0 + end) % checkpoint == 0 or t0 + end == n):
                growth.append((t0 + end, binned[:, -1].astype(np.int64)))
            start = end
        if progress:
            progress(len(rows))
    binned = binned.astype(np.int64)
    return LruResult(
        counts=counts,
        hits=np.cumsum(binned[:, : len(sizes)], axis=1),
        accesses=binned.sum(axis=1),
        compulsory=binned[:, -1].copy(),
        log2hist=log2hist.astype(np.int64),
        growth=growth,
    )


def next_use_pass(
    path: Path,
    n: int,
    shape: StreamShape,
    out: Path,
    compiled: bool | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Write each access's next-use time (uint32, NONE if never) to `out`, walking the stream backwards."""
    _check(shape, n)
    run = _compiled.next_use if _use_compiled(compiled) else _next_use_py
    last_seen = np.full(shape.num_rows, NONE, dtype=np.uint32)
    with open(out, "wb") as f:
        f.truncate(n * 4)
        for t0, rows in chunks(path, n, chunk, reverse=True):
            nexts = np.empty(len(rows), dtype=np.uint32)
            run(rows, t0, last_seen, nexts)
            f.seek(t0 * 4)
            f.write(nexts.astype("<u4", copy=False).tobytes())
            if progress:
                progress(len(rows))


def simulate(
    policy: Policy,
    path: Path,
    n: int,
    shape: StreamShape,
    capacity: int,
    nexts_path: Path | None = None,
    compiled: bool | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Hits per order (int64 [orders]) of one LFU or OPT cache of `capacity` rows over the stream."""
    _check(shape, n)
    if policy is Policy.LRU:
        raise ValueError("LRU hit rates come from lru_pass, for every size at once")
    if policy is Policy.OPT and nexts_path is None:
        raise ValueError("OPT needs the next-use file of next_use_pass")
    run = _compiled.simulate if _use_compiled(compiled) else _simulate_py
    capacity = min(capacity, shape.num_rows)  # a cache of every row never evicts: larger ones are the same
    key = np.zeros(capacity, dtype=np.uint64)
    row = np.zeros(capacity, dtype=np.uint32)
    pos = np.full(shape.num_rows, NONE, dtype=np.uint32)
    counts = np.zeros(shape.num_rows if policy is Policy.LFU else 1, dtype=np.uint32)
    state = np.zeros(1, dtype=np.uint64)
    hits = np.zeros(shape.orders, dtype=np.uint64)
    code = 0 if policy is Policy.LFU else 1
    next_chunks = chunks(nexts_path, n, chunk) if nexts_path is not None and code == 1 else None
    for t0, rows in chunks(path, n, chunk):
        nexts = next(next_chunks)[1] if next_chunks is not None else np.zeros(0, dtype=np.uint32)
        run(code, rows, nexts, t0, n, shape.heads, shape.per_order, capacity, key, row, pos, counts, state, hits)
        if progress:
            progress(len(rows))
    return hits.astype(np.int64)


def _use_compiled(compiled: bool | None) -> bool:
    if compiled and _compiled is None:
        raise RuntimeError("model._cachesim is not built (pip install -e . with a C compiler)")
    return _compiled is not None if compiled is None else compiled


# ---- The same algorithms in Python: the fallback, and the reference the C code is tested against ----


def _remap_py(rows, idmap, state, out, fresh) -> int:
    k, next_id = 0, int(state[0])
    for i, row in enumerate(rows.tolist()):
        if idmap[row] == NONE:
            idmap[row] = next_id
            next_id += 1
            fresh[k] = row
            k += 1
        out[i] = idmap[row]
    state[0] = next_id
    return k


def _lru_py(rows, t0, heads, per_order, counts, last_slot, tree, slot_row, state, sizes, binned, log2hist) -> None:
    cap, k = len(tree), len(sizes)
    max_size = int(sizes[-1])
    sizes_list = [int(s) for s in sizes]
    used, live = int(state[0]), int(state[1])
    for i, row in enumerate(rows.tolist()):
        order = ((t0 + i) % heads) // per_order
        if counts[row] == 0:
            column, bin_ = k + 1, LOG2_BINS + 1
        elif last_slot[row] == NONE:
            column, bin_ = k, LOG2_BINS
        else:
            slot = int(last_slot[row])
            d = live - _fen_prefix(tree, slot) + 1
            _fen_add(tree, slot, -1)
            live -= 1
            last_slot[row] = NONE  # its old marker is gone: a compaction before its new one must not keep it
            if d > max_size:
                column, bin_ = k, LOG2_BINS
            else:
                column = next(j for j, s in enumerate(sizes_list) if s >= d)
                bin_ = (d - 1).bit_length()
        binned[order, column] += 1
        log2hist[order, bin_] += 1
        counts[row] += 1
        if used == cap:
            used = live = _compact_py(tree, slot_row, last_slot, used, live, max_size)
        _fen_add(tree, used, 1)
        slot_row[used] = row
        last_slot[row] = used
        used += 1
        live += 1
    state[0], state[1] = used, live


def _fen_add(tree: np.ndarray, i: int, delta: int) -> None:
    i += 1
    while i <= len(tree):
        tree[i - 1] = int(tree[i - 1]) + delta
        i += i & -i


def _fen_prefix(tree: np.ndarray, i: int) -> int:
    total, i = 0, i + 1
    while i > 0:
        total += int(tree[i - 1])
        i -= i & -i
    return total


def _compact_py(tree, slot_row, last_slot, used, live, keep) -> int:
    skip, j = max(live - keep, 0), 0
    for s in range(used):
        row = int(slot_row[s])
        if last_slot[row] != s:
            continue
        if skip:
            skip -= 1
            last_slot[row] = NONE
            continue
        slot_row[j] = row
        last_slot[row] = j
        j += 1
    tree[:] = 0
    for i in range(j):
        _fen_add(tree, i, 1)
    return j


def _next_use_py(rows, t0, last_seen, out) -> None:
    for i in range(len(rows) - 1, -1, -1):
        row = int(rows[i])
        out[i] = last_seen[row]
        last_seen[row] = t0 + i


def _simulate_py(policy, rows, nexts, t0, n, heads, per_order, capacity, key, row, pos, counts, state, hits) -> None:
    # A heap with lazy deletion (keys are unique). The residents and their keys carry over from chunk to
    # chunk in the first state[0] entries of `row` and `key`; the heap is rebuilt from them.
    resident: dict[int, int] = {int(r): int(k) for r, k in zip(row[: int(state[0])], key[: int(state[0])])}
    sign = 1 if policy == 0 else -1  # LFU evicts the smallest key, OPT the largest
    heap = [(sign * k, r) for r, k in resident.items()]
    heapq.heapify(heap)
    for i, r in enumerate(rows.tolist()):
        t = t0 + i
        if policy == 0:
            counts[r] += 1
            k = (int(counts[r]) << 32) | (t & 0xFFFFFFFF)
        else:
            k = n + t if nexts[i] == NONE else int(nexts[i])
        if r in resident:
            hits[(t % heads) // per_order] += 1
            resident[r] = k
            heapq.heappush(heap, (sign * k, r))
            continue
        if capacity == 0:
            continue
        if len(resident) == capacity:
            while sign * heap[0][0] != resident.get(heap[0][1]):  # drop stale entries
                heapq.heappop(heap)
            if policy == 1 and k >= -heap[0][0]:
                continue  # the new row's next use is the farthest: bypass
            _, victim = heapq.heappop(heap)
            del resident[victim]
            pos[victim] = NONE
        resident[r] = k
        pos[r] = 0
        heapq.heappush(heap, (sign * k, r))
    for j, (r, k) in enumerate(resident.items()):  # carry the resident set to the next chunk
        row[j], key[j] = r, k
    state[0] = len(resident)
