"""A small decoder-only Engram language model: RMSNorm, rotary attention, SwiGLU, Engram blocks.

Row ids for every Engram layer depend only on the input tokens (compress -> hash -> add head
offsets), so `EngramLM.row_ids` computes them once at the start of a step, before any layer
runs; that is what lets a prefetcher fetch the rows while earlier layers compute
(`forward(..., prefetched=handle)`, `generate(..., prefetcher=...)`; client/prefetch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.engram import Engram, EngramConfig
from model.hashing import NgramHashMapping
from model.sources import RowSource

if TYPE_CHECKING:
    from client.prefetch import Prefetcher
    from model.compression import CompressedTokenizer  # needs the optional `tokenizers` package


class PrefetchedRows(Protocol):
    """Rows fetched ahead for one step (a `PrefetchHandle`): `rows(layer)` waits for that layer only."""

    def rows(self, layer_id: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class LMConfig:
    """Model size; the defaults train on 2 CPU cores in minutes."""

    vocab_size: int = 4096
    max_seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 352  # SwiGLU width (about 8/3 x d_model, a multiple of 32)
    engram: EngramConfig | None = field(default_factory=EngramConfig)


class _Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int) -> None:
        super().__init__()
        inv_freq = 1.0 / 10_000 ** (torch.arange(0, head_dim, 2).float() / head_dim)  # [head_dim/2]
        angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # [T, head_dim/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        x1, x2 = x[..., 0::2], x[..., 1::2]  # [B, H, T, head_dim/2] each
        cos, sin = self.cos[:T], self.sin[:T]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)  # [B, H, T, head_dim]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rotary = _Rotary(config.d_model // config.n_heads, config.max_seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # [B, H, T, hd]
        y = F.scaled_dot_product_attention(self.rotary(q), self.rotary(k), v, is_causal=True)  # [B, H, T, hd]
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # [B, T, D]


class SwiGLU(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block; an Engram block adds the memory before attention."""

    def __init__(self, config: LMConfig, engram: Engram | None) -> None:
        super().__init__()
        self.engram = engram
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model)
        self.mlp = SwiGLU(config)

    def forward(
        self, x: torch.Tensor, row_ids: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.engram is not None:
            x = x + self.engram(x.unsqueeze(2), row_ids, rows).squeeze(2)  # one hyper-connection branch: [B, T, D]
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class EngramLM(nn.Module):
    """Token embedding -> blocks (some with Engram) -> norm -> tied output projection."""

    def __init__(
        self,
        config: LMConfig,
        compression: CompressedTokenizer | None = None,
        pad_id: int = 0,
        tables: dict[int, RowSource] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        engram = config.engram
        if engram is not None:
            if engram.hc_mult != 1:
                raise NotImplementedError(
                    "the LM keeps one residual stream; hyper-connections (hc_mult > 1) are not wired"
                )
            if compression is None or tables is None or set(tables) != set(engram.layer_ids):
                raise ValueError(
                    f"an Engram LM needs the tokenizer compression and a table per layer {engram.layer_ids}"
                )
            if max(engram.layer_ids) >= config.n_layers:
                raise ValueError(f"Engram layers {engram.layer_ids} must be blocks 0..{config.n_layers - 1}")
            self.compression = compression
            self.hashing = NgramHashMapping(
                layer_ids=list(engram.layer_ids),
                vocab_size_per_ngram=list(engram.vocab_size_per_ngram),
                max_ngram=engram.max_ngram,
                heads_per_ngram=engram.heads_per_ngram,
                compressed_vocab_size=compression.compressed_vocab_size,
                pad_id=int(compression.compressed_id(pad_id)),
                seed=engram.seed,
                head_sizes=engram.head_sizes,
            )
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            Block(
                config,
                Engram(i, engram, config.d_model, tables[i]) if engram and i in engram.layer_ids else None,
            )
            for i in range(config.n_layers)
        )
        self.final_norm = nn.RMSNorm(config.d_model)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and not module.sparse:  # Engram tables keep the memstore init
            nn.init.normal_(module.weight, std=0.02)

    def row_ids(self, input_ids: torch.Tensor | np.ndarray) -> dict[int, torch.Tensor]:
        """Every Engram layer's row ids [B, T, heads] for these tokens: known before any layer runs."""
        if self.config.engram is None:
            return {}
        tokens = input_ids.cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
        compressed = self.compression.compress(tokens)  # [B, T]
        return {layer: torch.from_numpy(ids) for layer, ids in self.hashing.row_ids(compressed).items()}

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        row_ids: dict[int, torch.Tensor] | None = None,
        prefetched: PrefetchedRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids [B, T] -> logits [B, T, vocab], and the mean cross-entropy when targets are given.

        Engram rows come from `prefetched` when given (each layer waits for its own rows only),
        else from the layers' tables for `row_ids` (computed from input_ids when not given).
        """
        if prefetched is None and row_ids is None:
            row_ids = self.row_ids(input_ids)
        x = self.token_embedding(input_ids)  # [B, T, D]
        for i, block in enumerate(self.blocks):
            if block.engram is None:
                x = block(x)
            elif prefetched is not None:
                x = block(x, rows=prefetched.rows(i))
            else:
                assert row_ids is not None
                x = block(x, row_ids=row_ids[i])
        logits = F.linear(self.final_norm(x), self.token_embedding.weight)  # [B, T, vocab], tied
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, without the token embedding and Engram tables when non_embedding."""
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if not (non_embedding and ("token_embedding" in name or ".table." in name))
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = 40,
        prefetcher: Prefetcher | None = None,
    ) -> torch.Tensor:
        """Sample continuations of prompt [B, T0] -> [B, T0 + max_new_tokens].

        N-gram ids are hashed over the whole sequence (a position's N-gram is the same whatever
        window the model sees). With a `prefetcher`, each position's rows are fetched once: as
        soon as a token is sampled, its rows for every Engram layer are requested, for the whole
        batch at once, and arrive while the embedding and the blocks before the first Engram
        layer compute.
        """
        if prefetcher is not None and self.config.engram is not None:
            return self._generate_prefetched(prompt, max_new_tokens, temperature, top_k, prefetcher)
        tokens = prompt
        for _ in range(max_new_tokens):
            start = max(0, tokens.shape[1] - self.config.max_seq_len)
            row_ids = {layer: ids[:, start:] for layer, ids in self.row_ids(tokens).items()}  # [B, <=T, heads]
            logits, _ = self(tokens[:, start:], row_ids=row_ids)
            tokens = torch.cat([tokens, self._sample(logits[:, -1], temperature, top_k)], dim=1)
        return tokens

    def _generate_prefetched(
        self, prompt: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None, prefetcher: Prefetcher
    ) -> torch.Tensor:
        engram = self.config.engram
        assert engram is not None
        B, T0 = prompt.shape
        cache: dict[int, torch.Tensor] = {}  # layer -> rows of every position so far [B, T0 + new, heads, dim]
        with prefetcher.submit(prompt) as handle:
            for layer in engram.layer_ids:
                rows = handle.rows(layer)  # [B, T0, heads, dim]
                cache[layer] = rows.new_empty(B, T0 + max_new_tokens, *rows.shape[2:])
                cache[layer][:, :T0] = rows
        tokens = prompt
        pending = None
        for _ in range(max_new_tokens):
            length = tokens.shape[1]
            window = _CachedWindow(cache, max(0, length - self.config.max_seq_len), length, pending)
            logits, _ = self(tokens[:, window.start :], prefetched=window)
            if pending is not None:
                pending.release()
            tokens = torch.cat([tokens, self._sample(logits[:, -1], temperature, top_k)], dim=1)
            if tokens.shape[1] < T0 + max_new_tokens:
                recent = tokens[:, -engram.max_ngram :]  # [B, N]: all the newest position's N-grams need
                pending = prefetcher.submit_row_ids({layer: ids[:, -1:] for layer, ids in self.row_ids(recent).items()})
        return tokens

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
        logits = logits / max(temperature, 1e-5)  # [B, vocab]
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1)  # [B, 1]


class _CachedWindow:
    """Rows of positions [start, end) from the decode cache; the newest position's arrive with `pending`."""

    def __init__(self, cache: dict[int, torch.Tensor], start: int, end: int, pending: PrefetchedRows | None) -> None:
        self.cache = cache
        self.start = start
        self.end = end
        self.pending = pending

    def rows(self, layer_id: int) -> torch.Tensor:
        if self.pending is not None:
            self.cache[layer_id][:, self.end - 1 : self.end] = self.pending.rows(layer_id)  # [B, 1, heads, dim]
        return self.cache[layer_id][:, self.start : self.end]  # [B, end - start, heads, dim]
