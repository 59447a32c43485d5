"""Engram's multi-head N-gram hashing, bit for bit as the public reference (engram_demo_v1.py).

For every Engram layer, the suffix N-grams (orders 2..max_ngram) of the compressed token ids
are mixed with per-layer odd multipliers and reduced modulo each head's prime:

    multipliers = 2 * default_rng(seed + 10007 * layer_id).integers(0, half_bound, max_ngram) + 1
    half_bound  = max(1, (int64 max // compressed_vocab_size) // 2)
    tok[k][t]   = id at t - k, or pad_id before the start of the sequence
    mix_n       = tok[0]*m[0] XOR tok[1]*m[1] XOR ... XOR tok[n-1]*m[n-1]    (int64, wrapping)
    id[n][h]    = mix_n mod prime[n][h]                                       (non-negative)

The output is [B, T, (max_ngram-1)*heads], order-major (order 2's heads first): head-local ids.
`row_ids` adds each head's offset within the layer, giving the ids the memstore serves. The
primes come from `memstore.layout.engram_primes`, the one implementation of the prime rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memstore.errors import InvalidArgumentError
from memstore.layout import EngramLayout, engram_primes


class NgramHashMapping:
    """Compressed token ids [B, T] -> per-layer hash ids [B, T, (max_ngram-1)*heads]."""

    def __init__(
        self,
        layer_ids: Sequence[int],
        vocab_size_per_ngram: Sequence[int],
        max_ngram: int,
        heads_per_ngram: int,
        compressed_vocab_size: int,
        pad_id: int,
        seed: int,
    ) -> None:
        if not 0 <= pad_id < compressed_vocab_size:
            raise InvalidArgumentError(f"pad_id {pad_id} is not a compressed id (0..{compressed_vocab_size - 1})")
        self.layer_ids = [int(x) for x in layer_ids]
        self.vocab_size_per_ngram = [int(x) for x in vocab_size_per_ngram]
        self.max_ngram = int(max_ngram)
        self.heads_per_ngram = int(heads_per_ngram)
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self._primes = engram_primes(self.layer_ids, self.vocab_size_per_ngram, self.max_ngram, self.heads_per_ngram)
        half_bound = max(1, (np.iinfo(np.int64).max // self.compressed_vocab_size) // 2)
        self.multipliers = {
            layer_id: np.random.default_rng(self.seed + 10007 * layer_id).integers(
                0, half_bound, size=self.max_ngram, dtype=np.int64
            )
            * 2
            + 1
            for layer_id in self.layer_ids
        }

    def primes(self, layer_id: int) -> list[list[int]]:
        """[order - 2][head] prime table sizes of one layer."""
        return [list(heads) for heads in self._primes[layer_id]]

    def layout(self, dim: int) -> EngramLayout:
        """The memstore table layout for these hash tables with rows of `dim` values."""
        return EngramLayout(
            layer_ids=tuple(self.layer_ids),
            vocab_size_per_ngram=tuple(self.vocab_size_per_ngram),
            max_ngram=self.max_ngram,
            heads_per_ngram=self.heads_per_ngram,
            dim=dim,
        )

    def hash(self, compressed_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Head-local hash ids per layer: {layer_id: [B, T, (max_ngram-1)*heads] int64}."""
        shifts = self._shifted_tokens(compressed_ids)  # [max_ngram, B, T]
        return {layer_id: self._hash_layer(shifts, layer_id) for layer_id in self.layer_ids}

    def row_ids(self, compressed_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Ids into each layer's contiguous row range (head offsets added), as the memstore serves them."""
        layout = self.layout(dim=1)
        return {
            layer_id: ids + np.asarray(layout.head_offsets(layer_id), dtype=np.int64)  # [B, T, heads]
            for layer_id, ids in self.hash(compressed_ids).items()
        }

    def _shifted_tokens(self, compressed_ids: np.ndarray) -> np.ndarray:
        x = np.asarray(compressed_ids)
        if x.ndim != 2 or x.dtype.kind not in "iu":
            raise InvalidArgumentError(f"compressed ids must be an integer array [B, T]; got {x.dtype} {x.shape}")
        if x.size and (int(x.min()) < 0 or int(x.max()) >= self.compressed_vocab_size):
            raise InvalidArgumentError(f"compressed ids must be in 0..{self.compressed_vocab_size - 1}")
        B, T = x.shape
        shifts = np.full((self.max_ngram, B, T), self.pad_id, dtype=np.int64)  # [k, B, T]
        for k in range(min(self.max_ngram, T)):
            shifts[k, :, k:] = x[:, : T - k]  # token at t - k; pad before the start
        return shifts

    def _hash_layer(self, shifts: np.ndarray, layer_id: int) -> np.ndarray:
        multipliers = self.multipliers[layer_id]
        _, B, T = shifts.shape
        out = np.empty((B, T, (self.max_ngram - 1) * self.heads_per_ngram), dtype=np.int64)  # [B, T, heads]
        with np.errstate(over="ignore"):  # int64 products wrap around, as in the reference
            mix = shifts[0] * multipliers[0]  # [B, T]
            for n in range(2, self.max_ngram + 1):
                mix = np.bitwise_xor(mix, shifts[n - 1] * multipliers[n - 1])  # order-n mix, [B, T]
                for h, prime in enumerate(self._primes[layer_id][n - 2]):
                    out[:, :, (n - 2) * self.heads_per_ngram + h] = mix % prime
        return out
