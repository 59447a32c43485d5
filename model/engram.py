"""The Engram module (Conditional Memory via Scalable Lookup), as in the paper and its demo.

For each position t the suffix N-grams (orders 2..N) of the compressed token ids are hashed by
K heads per order (model/hashing.py); each head owns a table of prime size, and a layer's heads
share one contiguous row range, so the ids arrive here as row ids [B, T, (N-1)*K]. Then:

1. lookup:   e_t = concat over heads of row[head id]                         [B, T, (N-1)*K*dim]
2. value:    v_t = W_V e_t                                                   [B, T, D]
3. gate:     per hyper-connection branch m (hc_mult of them, 1 by default),
             alpha_t = sigmoid(ssqrt(RMSNorm(h_t) . RMSNorm(W_K^m e_t) / sqrt(D)))  [B, T, HC, 1]
             with ssqrt(x) = sign(x) sqrt(|x|), the signed square root of the public demo
4. output:   y = alpha * v;  y = y + SiLU(CausalDepthwiseConv1d(RMSNorm(y)))   [B, T, HC, D]
             kernel 4, dilation N, the convolution initialised to zero; this RMSNorm's epsilon
             is 1e-5 (the reference's ShortConv), the gate's norms use PyTorch's default.

The block adds y to the residual stream before attention. Where the rows come from is
pluggable (model/sources.py): an in-process table or the memstore daemon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memstore.errors import InvalidArgumentError
from memstore.layout import EngramLayout
from model.sources import RowSource


@dataclass(frozen=True)
class EngramConfig:
    """Engram's hyper-parameters; defaults fit the small LM on a laptop."""

    layer_ids: tuple[int, ...] = (1, 2)  # 0-based transformer blocks that get an Engram module
    vocab_size_per_ngram: tuple[int, ...] = (20_000, 20_000)  # per order 2..max_ngram, before primes
    max_ngram: int = 3
    heads_per_ngram: int = 4
    n_embed_per_ngram: int = 128  # concatenated width of one order's heads
    kernel_size: int = 4
    hc_mult: int = 1  # hyper-connection branches (mHC uses 4)
    seed: int = 0  # hashing multipliers and the table's initial rows
    # Explicit head sizes [layer][order - 2][head] (a table imported from elsewhere), else the prime rule.
    head_sizes: tuple[tuple[tuple[int, ...], ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.n_embed_per_ngram % self.heads_per_ngram:
            raise InvalidArgumentError(
                f"n_embed_per_ngram {self.n_embed_per_ngram} must be a multiple of "
                f"heads_per_ngram {self.heads_per_ngram}"
            )
        if self.hc_mult < 1 or self.kernel_size < 1:
            raise InvalidArgumentError("hc_mult and kernel_size must be at least 1")

    @property
    def head_dim(self) -> int:
        """Values per table row."""
        return self.n_embed_per_ngram // self.heads_per_ngram

    @property
    def num_heads(self) -> int:
        """Hash heads per layer, all orders."""
        return (self.max_ngram - 1) * self.heads_per_ngram

    @property
    def memory_dim(self) -> int:
        """Width of e_t, all heads concatenated."""
        return (self.max_ngram - 1) * self.n_embed_per_ngram

    def layout(self) -> EngramLayout:
        """The memstore table layout these settings need."""
        return EngramLayout(
            layer_ids=self.layer_ids,
            vocab_size_per_ngram=self.vocab_size_per_ngram,
            max_ngram=self.max_ngram,
            heads_per_ngram=self.heads_per_ngram,
            dim=self.head_dim,
            head_sizes_override=self.head_sizes,
        )


SHORT_CONV_NORM_EPS = 1e-5  # DeepSeek's ShortConv norm_eps; the gate's key and query norms keep PyTorch's default


class ShortConv(nn.Module):
    """Causal depthwise Conv1d over time with RMSNorm before and SiLU after, per branch."""

    def __init__(
        self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int, norm_eps: float = SHORT_CONV_NORM_EPS
    ) -> None:
        super().__init__()
        channels = hidden_size * hc_mult
        # An explicit epsilon, as DeepSeek's ShortConv (norm_eps=1e-5): PyTorch's default (the dtype's
        # machine epsilon, 1.2e-7 in float32) changes the output wherever the gated value is small.
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult))
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            dilation=dilation,
            padding=(kernel_size - 1) * dilation,  # left context; the right overhang is cut below
            bias=False,
        )
        nn.init.zeros_(self.conv.weight)  # starts as the identity of the residual around it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, HC, D = x.shape
        normed = torch.stack([norm(x[:, :, m]) for m, norm in enumerate(self.norms)], dim=2)  # [B, T, HC, D]
        y = self.conv(normed.reshape(B, T, HC * D).transpose(1, 2))[..., :T]  # [B, HC*D, T], causal
        return F.silu(y).transpose(1, 2).reshape(B, T, HC, D)  # [B, T, HC, D]


class Engram(nn.Module):
    """One Engram layer: lookup -> value/key projections -> gate -> short convolution."""

    def __init__(self, layer_id: int, config: EngramConfig, hidden_size: int, table: RowSource) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        self.table = table  # a LocalTable or RemoteEmbedding registers as a submodule; the latter holds no parameters
        self.value_proj = nn.Linear(config.memory_dim, hidden_size)
        self.key_projs = nn.ModuleList(nn.Linear(config.memory_dim, hidden_size) for _ in range(config.hc_mult))
        self.key_norms = nn.ModuleList(nn.RMSNorm(hidden_size) for _ in range(config.hc_mult))
        self.query_norms = nn.ModuleList(nn.RMSNorm(hidden_size) for _ in range(config.hc_mult))
        self.short_conv = ShortConv(hidden_size, config.kernel_size, config.max_ngram, config.hc_mult)
        self.last_gate: torch.Tensor | None = None  # [B, T, HC], kept for inspection (gate heat maps)

    def forward(
        self, hidden: torch.Tensor, row_ids: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden [B, T, HC, D] and row_ids [B, T, heads] (or rows already fetched [B, T, heads, dim])
        -> Engram output [B, T, HC, D]."""
        B, T, HC, D = hidden.shape
        if (rows is None) == (row_ids is None):
            raise InvalidArgumentError("pass the layer's row ids, or its prefetched rows, not both")
        if rows is None:
            rows = self.table(row_ids.to(hidden.device))  # [B, T, heads, dim]
        memory = rows.reshape(B, T, self.config.memory_dim).to(hidden.device, hidden.dtype)  # [B, T, heads*dim] = e_t
        gates = []
        for m in range(HC):
            key = self.key_norms[m](self.key_projs[m](memory))  # [B, T, D]
            query = self.query_norms[m](hidden[:, :, m])  # [B, T, D]
            score = (key * query).sum(dim=-1) / math.sqrt(D)  # [B, T]
            gates.append(torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt()))
        gate = torch.stack(gates, dim=2)  # [B, T, HC]
        self.last_gate = gate.detach()
        value = gate.unsqueeze(-1) * self.value_proj(memory).unsqueeze(2)  # [B, T, HC, D]
        return value + self.short_conv(value)
