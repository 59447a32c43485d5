"""Engram's multi-head N-gram hashing, bit for bit as DeepSeek's reference (engram_demo_v1.py).

Engram looks up, at every position t of a sequence of *compressed* token ids (model/compression.py),
one embedding row per (N-gram order, head): the suffix N-grams ending at t, of orders n = 2..N, are
each hashed by K heads, and every head indexes its own table, whose size is a distinct prime
(`memstore.layout.engram_primes`, the one implementation of that rule, shared with the tables).

The hash of one layer is a multiplicative-XOR mix reduced modulo the head's prime:

    V           = compressed vocabulary size
    half_bound  = max(1, ((2**63 - 1) // V) // 2)
    m[0..N-1]   = 2 * default_rng(seed + 10007 * layer_id).integers(0, half_bound, N, int64) + 1
    tok[k][t]   = id[t - k], or pad_id where t - k < 0          (every sequence starts padded)
    mix_n[t]    = (tok[0][t] * m[0]) XOR (tok[1][t] * m[1]) XOR ... XOR (tok[n-1][t] * m[n-1])
    hash[n][h]  = mix_n mod prime[n][h]                          (in [0, prime), int64)

The multipliers are odd, drawn per layer, one per position in the N-gram (so "a b" and "b a" hash
apart), and shared by all orders and heads of the layer; heads differ only in their prime. Because
m[k] < (2**63 - 1) // V and ids are below V, no product leaves int64 and every mix is non-negative;
the reference computes in int64 (wrapping), and so does this module, so they agree on any input.
The rows of a batch are independent sequences: each is padded at its own start.

`hash` returns, per layer, [B, T, (N-1)*K] head-local ids, order-major (order 2's K heads first).
`row_ids` adds each head's first row within the layer (`EngramLayout.head_offsets`): ids into the
layer's contiguous row range, as the memstore serves them.

Unlike the reference, which compresses raw token ids inside `hash` (and maps its configured pad id,
a raw id, through the compression), this class takes compressed ids and a compressed pad id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memstore.errors import InvalidArgumentError
from memstore.layout import EngramLayout, as_int

_LAYER_SEED_STRIDE = 10007  # the reference's PRIME_1: layer l draws from default_rng(seed + 10007 * l)
_CHUNK = 16_384  # positions reduced at a time, so a chunk's mixes, quotients and outputs stay in cache


def _multipliers(seed: int, layer_id: int, max_ngram: int, compressed_vocab_size: int) -> np.ndarray:
    """One odd int64 multiplier per N-gram position (max_ngram of them), for one layer."""
    half_bound = max(1, (int(np.iinfo(np.int64).max) // compressed_vocab_size) // 2)
    rng = np.random.default_rng(seed + _LAYER_SEED_STRIDE * layer_id)
    r = rng.integers(0, half_bound, size=max_ngram, dtype=np.int64)  # [max_ngram]
    return r * 2 + 1


def _prefixed(ids: np.ndarray, k: int, pad_id: int) -> np.ndarray:
    """The token k positions back: ids shifted right by k within each row, pad_id filling the start."""
    if k == 0:
        return ids
    length = ids.shape[1]
    shifted = np.empty_like(ids)  # [B, T]
    shifted[:, :k] = pad_id  # a slice past the end is clipped, so k >= T gives all padding
    shifted[:, k:] = ids[:, : max(length - k, 0)]
    return shifted


def _remainder(mix: np.ndarray, prime: int, out: np.ndarray, scratch: np.ndarray, offset: int = 0) -> None:
    """out = mix % prime + offset, with numpy's `%` (in [0, prime) for prime > 0), via a floor division.

    numpy divides an int64 array by a scalar with a multiply-and-shift (libdivide), several times
    faster than its `%`; `mix - (mix // prime) * prime` is the same value for any int64 mix, since
    wrapping arithmetic is exact modulo 2**64 and the result lies in [0, prime).
    """
    np.floor_divide(mix, prime, out=scratch)
    np.multiply(scratch, prime, out=scratch)
    if offset:
        np.subtract(scratch, offset, out=scratch)
    np.subtract(mix, scratch, out=out)


class NgramHashMapping:
    """Compressed token ids [B, T] -> per-layer N-gram hash ids [B, T, (max_ngram-1)*heads_per_ngram]."""

    def __init__(
        self,
        layer_ids: Sequence[int],
        vocab_size_per_ngram: Sequence[int],
        max_ngram: int,
        heads_per_ngram: int,
        compressed_vocab_size: int,
        pad_id: int,
        seed: int,
        head_sizes: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> None:
        """`head_sizes` ([layer][order - 2][head], in layer_ids order) replaces Engram's prime rule
        for a table whose head sizes came from elsewhere (a layout with explicit head sizes)."""
        # The table layout validates layer ids, orders, sizes and heads (InvalidArgumentError).
        self._layout = EngramLayout(
            layer_ids=tuple(layer_ids),
            vocab_size_per_ngram=tuple(vocab_size_per_ngram),
            max_ngram=max_ngram,
            heads_per_ngram=heads_per_ngram,
            dim=1,
            head_sizes_override=None if head_sizes is None else tuple(tuple(map(tuple, layer)) for layer in head_sizes),
        )
        self.layer_ids: list[int] = list(self._layout.layer_ids)
        self.vocab_size_per_ngram: list[int] = list(self._layout.vocab_size_per_ngram)
        self.max_ngram: int = self._layout.max_ngram
        self.heads_per_ngram: int = self._layout.heads_per_ngram
        self.compressed_vocab_size = as_int("compressed_vocab_size", compressed_vocab_size)
        self.pad_id = as_int("pad_id", pad_id)
        self.seed = as_int("seed", seed)
        if self.compressed_vocab_size < 1:
            raise InvalidArgumentError(f"compressed_vocab_size is {self.compressed_vocab_size}; it must be at least 1")
        if not 0 <= self.pad_id < self.compressed_vocab_size:
            raise InvalidArgumentError(
                f"pad_id {self.pad_id} is not a compressed id: it must be in [0, {self.compressed_vocab_size})"
            )
        if self.seed < 0:
            raise InvalidArgumentError(f"seed is {self.seed}; it must be non-negative")
        self.num_heads = (self.max_ngram - 1) * self.heads_per_ngram
        self._primes = {layer_id: self._layout.primes(layer_id) for layer_id in self.layer_ids}
        self.multipliers: dict[int, np.ndarray] = {
            layer_id: _multipliers(self.seed, layer_id, self.max_ngram, self.compressed_vocab_size)
            for layer_id in self.layer_ids
        }
        self._offsets = {
            layer_id: np.asarray(self._layout.head_offsets(layer_id), dtype=np.int64) for layer_id in self.layer_ids
        }

    def primes(self, layer_id: int) -> list[list[int]]:
        """[order - 2][head] table sizes of one layer (Engram's prime rule, or the explicit sizes)."""
        return [list(heads) for heads in self._primes[self._checked_layer(layer_id)]]

    def layout(self, dim: int) -> EngramLayout:
        """The memstore table layout these hashes index, with rows of `dim` values."""
        return EngramLayout(
            layer_ids=tuple(self.layer_ids),
            vocab_size_per_ngram=tuple(self.vocab_size_per_ngram),
            max_ngram=self.max_ngram,
            heads_per_ngram=self.heads_per_ngram,
            dim=dim,
            head_sizes_override=self._layout.head_sizes_override,
        )

    def hash(self, compressed_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Head-local ids per layer: {layer_id: [B, T, (max_ngram-1)*heads] int64}, order-major."""
        return self._hash(compressed_ids, with_offsets=False)

    def row_ids(self, compressed_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Ids into each layer's row range (head offsets added): {layer_id: [B, T, heads] int64}."""
        return self._hash(compressed_ids, with_offsets=True)

    def _hash(self, compressed_ids: np.ndarray, with_offsets: bool) -> dict[int, np.ndarray]:
        ids = self._checked_ids(compressed_ids)  # [B, T] int64
        shifted = [_prefixed(ids, k, self.pad_id) for k in range(self.max_ngram)]  # max_ngram x [B, T]
        return {layer_id: self._hash_layer(shifted, layer_id, with_offsets) for layer_id in self.layer_ids}

    def _hash_layer(self, shifted: list[np.ndarray], layer_id: int, with_offsets: bool) -> np.ndarray:
        """One layer's [B, T, heads] ids from the shifted tokens; plus each head's offset if asked."""
        multipliers = [int(m) for m in self.multipliers[layer_id]]
        batch, length = shifted[0].shape
        mixes = []  # one [B*T] mix per order 2..N
        with np.errstate(over="ignore"):  # int64 wraps as in the reference; valid ids never reach it
            mix = shifted[0] * multipliers[0]  # [B, T]
            term = np.empty_like(mix)  # [B, T] scratch
            for order in range(2, self.max_ngram + 1):
                np.multiply(shifted[order - 1], multipliers[order - 1], out=term)
                mix = mix ^ term  # the order-n mix: extends the order-(n-1) one by the token n-1 back
                mixes.append(mix.reshape(-1))  # [B, T] -> [B*T], a view
        positions = batch * length
        out = np.empty((positions, self.num_heads), dtype=np.int64)  # [B*T, (N-1)*K]
        scratch = np.empty(min(positions, _CHUNK), dtype=np.int64)
        offsets = self._offsets[layer_id].tolist() if with_offsets else [0] * self.num_heads
        for start in range(0, positions, _CHUNK):
            block = out[start : start + _CHUNK]  # [chunk, heads]
            column = 0
            for order, mix in enumerate(mixes, start=2):
                chunk = mix[start : start + _CHUNK]  # [chunk]
                for prime in self._primes[layer_id][order - 2]:
                    _remainder(chunk, prime, block[:, column], scratch[: len(chunk)], offsets[column])
                    column += 1
        return out.reshape(batch, length, self.num_heads)  # [B*T, heads] -> [B, T, heads]

    def _checked_ids(self, compressed_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(compressed_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise InvalidArgumentError(
                f"compressed ids must be a 2-D integer array [batch, seq_len]; got {ids.dtype} of shape {ids.shape}"
            )
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.compressed_vocab_size:
                bad = low if low < 0 else high
                raise InvalidArgumentError(
                    f"compressed id {bad} is out of range: ids must be in [0, {self.compressed_vocab_size})"
                )
        return np.ascontiguousarray(ids, dtype=np.int64)  # no copy for C-ordered int64 input

    def _checked_layer(self, layer_id: int) -> int:
        if layer_id not in self._primes:
            raise InvalidArgumentError(f"unknown Engram layer {layer_id}; this mapping has layers {self.layer_ids}")
        return layer_id
