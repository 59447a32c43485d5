"""An Engram layer written out from the paper's formulas in float64, independent of model/engram.py.

Plain loops and elementwise float64 arithmetic only (no nn modules, no conv or linear kernels),
so a fault in the module's use of PyTorch layers (an epsilon, a kernel's direction, a dilation,
a branch order) cannot be shared with this reference. For position t of a sequence and branch m:

    e_t     = the layer's rows at t, all heads concatenated                       [heads*dim]
    v_t     = W_V e_t + b_V                                                       [D]
    k_t^m   = RMSNorm_{eps_k}(W_K^m e_t + b_K^m) * g_K^m                          [D]
    q_t^m   = RMSNorm_{eps_q}(h_t^m) * g_Q^m                                      [D]
    s       = <k_t^m, q_t^m> / sqrt(D);   alpha_t^m = sigmoid(sign(s) sqrt(max(|s|, 1e-6)))
    u_t^m   = alpha_t^m v_t
    z_t^m   = RMSNorm_{eps_c}(u_t^m) * g_C^m   (eps_c = 1e-5, DeepSeek's ShortConv norm_eps)
    c_t^m[d] = sum_{j=0}^{K-1} w^m[d, j] z_{t-(K-1-j)*dil}^m[d]   (zero before the sequence starts)
    y_t^m   = u_t^m + SiLU(c_t^m)

with RMSNorm_eps(x) = x / sqrt(mean(x^2) + eps). The key and query norms use PyTorch's default
epsilon for the module's float dtype, as DeepSeek's demo does (nn.RMSNorm without eps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONV_NORM_EPS = 1e-5
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # nn.RMSNorm(eps=None) on float32 inputs
GATE_FLOOR = 1e-6


@dataclass(frozen=True)
class EngramWeights:
    """Every parameter of one Engram layer, as float64 arrays (shapes as in nn.Linear / nn.Conv1d)."""

    value_w: np.ndarray  # [D, M]
    value_b: np.ndarray  # [D]
    key_w: np.ndarray  # [HC, D, M]
    key_b: np.ndarray  # [HC, D]
    key_norm: np.ndarray  # [HC, D]
    query_norm: np.ndarray  # [HC, D]
    conv_norm: np.ndarray  # [HC, D]
    conv_w: np.ndarray  # [HC*D, K] (depthwise: one kernel per channel, branch-major)


def _rms_normed(x: list[float], gain: np.ndarray, eps: float) -> list[float]:
    scale = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
    return [v * scale * float(g) for v, g in zip(x, gain)]


def _affine(w: np.ndarray, b: np.ndarray, x: list[float]) -> list[float]:
    return [sum(float(w[i, j]) * x[j] for j in range(len(x))) + float(b[i]) for i in range(w.shape[0])]


def _silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def engram_reference(
    weights: EngramWeights,
    hidden: np.ndarray,
    memory: np.ndarray,
    dilation: int,
    conv_norm_eps: float = CONV_NORM_EPS,
    qk_norm_eps: float = FLOAT32_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """(output [B, T, HC, D], gate [B, T, HC]) for hidden [B, T, HC, D] and memory e_t [B, T, M]."""
    B, T, HC, D = hidden.shape
    K = weights.conv_w.shape[1]
    out = np.zeros((B, T, HC, D))
    gates = np.zeros((B, T, HC))
    for b in range(B):
        u = np.zeros((T, HC, D))  # the gated value, every position first: the convolution looks back
        z = np.zeros((T, HC, D))
        for t in range(T):
            e = [float(v) for v in memory[b, t]]
            value = _affine(weights.value_w, weights.value_b, e)
            for m in range(HC):
                key = _rms_normed(_affine(weights.key_w[m], weights.key_b[m], e), weights.key_norm[m], qk_norm_eps)
                query = _rms_normed([float(v) for v in hidden[b, t, m]], weights.query_norm[m], qk_norm_eps)
                s = sum(k * q for k, q in zip(key, query)) / math.sqrt(D)
                signed_root = math.copysign(math.sqrt(max(abs(s), GATE_FLOOR)), s) if s != 0 else 0.0
                gate = 1.0 / (1.0 + math.exp(-signed_root))
                gates[b, t, m] = gate
                u[t, m] = [gate * v for v in value]
                z[t, m] = _rms_normed(list(u[t, m]), weights.conv_norm[m], conv_norm_eps)
        for t in range(T):
            for m in range(HC):
                for d in range(D):
                    acc = 0.0
                    for j in range(K):
                        source = t - (K - 1 - j) * dilation
                        if source >= 0:
                            acc += float(weights.conv_w[m * D + d, j]) * z[source, m, d]
                    out[b, t, m, d] = u[t, m, d] + _silu(acc)
    return out, gates
