"""A discrete power law fitted to frequencies, as Clauset, Shalizi and Newman (SIAM Review, 2009).

For samples x >= 1 (here: how often each distinct row was read), P(x) = x**-alpha / zeta(alpha, x_min)
for x >= x_min. For each candidate x_min, alpha is the exact discrete maximum-likelihood estimate
(the Hurwitz-zeta likelihood maximised numerically: scipy is not a dependency, so the Hurwitz zeta
is computed here by Euler-Maclaurin summation); x_min is the candidate whose fit has the smallest
Kolmogorov-Smirnov distance to the tail's empirical distribution. The standard error of alpha is
(alpha - 1) / sqrt(n_tail).

alpha is the exponent of the frequency distribution; the rank-frequency ("Zipf") exponent of the
same data is s = 1 / (alpha - 1) (Zipf's law s = 1 is alpha = 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# B_2j / (2j)! for j = 1..7: the Euler-Maclaurin tail terms.
_BERNOULLI = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730, 7 / 6)
_EM_TERMS = tuple(b / math.factorial(2 * j) for j, b in enumerate(_BERNOULLI, start=1))
_DIRECT = 12  # terms summed directly before the Euler-Maclaurin tail
_ALPHA_RANGE = (1.0 + 1e-6, 20.0)


def hurwitz_zeta(s: float, q: np.ndarray | float) -> np.ndarray:
    """zeta(s, q) = sum_k (q + k)**-s for s > 1, q > 0; relative error below 1e-12 for s <= 20, q >= 1."""
    if s <= 1:
        raise ValueError(f"the Hurwitz zeta diverges for s = {s} <= 1")
    q = np.asarray(q, dtype=np.float64)
    total = np.zeros_like(q)
    for k in range(_DIRECT):
        total += (q + k) ** -s
    a = q + _DIRECT
    total += a ** (1 - s) / (s - 1) + 0.5 * a**-s
    rising = s  # s (s+1) ... (s+2j-2)
    power = a ** (-s - 1)
    for j, term in enumerate(_EM_TERMS, start=1):
        total += term * rising * power
        rising *= (s + 2 * j - 1) * (s + 2 * j)
        power = power / (a * a)
    return total


@dataclass(frozen=True)
class PowerLawFit:
    """The fit: exponent, where the power law starts, how many samples it covers, its KS distance."""

    alpha: float
    x_min: int
    n_tail: int
    n: int
    ks: float

    @property
    def sigma(self) -> float:
        """Standard error of alpha (Clauset et al., eq. 3.2)."""
        return (self.alpha - 1) / math.sqrt(self.n_tail)

    @property
    def rank_exponent(self) -> float:
        """The rank-frequency exponent s = 1 / (alpha - 1)."""
        return 1 / (self.alpha - 1)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "alpha": self.alpha,
            "alpha_stderr": self.sigma,
            "rank_exponent": self.rank_exponent,
            "x_min": self.x_min,
            "n_tail": self.n_tail,
            "n": self.n,
            "ks": self.ks,
        }


def mle_alpha(n: int, sum_log: float, x_min: int) -> float:
    """The discrete MLE of alpha for n samples >= x_min whose logarithms sum to sum_log."""

    def neg_log_likelihood(alpha: float) -> float:
        return n * math.log(float(hurwitz_zeta(alpha, x_min))) + alpha * sum_log

    # Start from the continuous approximation (Clauset et al., eq. 3.7) and bracket around it;
    # the likelihood is concave in alpha, so a golden-section search finds its maximum.
    approx = 1 + n / max(sum_log - n * math.log(x_min - 0.5), 1e-300)
    lo, hi = max(_ALPHA_RANGE[0], approx - 1), min(_ALPHA_RANGE[1], approx + 1)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = neg_log_likelihood(a), neg_log_likelihood(b)
    while hi - lo > 1e-9:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = neg_log_likelihood(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = neg_log_likelihood(b)
    return (lo + hi) / 2


def _ks(values: np.ndarray, multiplicity: np.ndarray, alpha: float, x_min: int) -> float:
    """KS distance between the tail's empirical CDF and the fitted discrete power law."""
    empirical = np.cumsum(multiplicity) / multiplicity.sum()
    model = 1 - hurwitz_zeta(alpha, values + 1.0) / float(hurwitz_zeta(alpha, x_min))
    return float(np.max(np.abs(empirical - model)))


def fit_power_law(
    samples: np.ndarray, x_min: int | None = None, min_tail: int = 50, max_candidates: int = 200
) -> PowerLawFit:
    """Fit a discrete power law to positive integer samples; x_min given, or chosen by minimal KS distance.

    Candidates for x_min are the distinct sample values leaving at least `min_tail` samples in the tail;
    where there are more than `max_candidates`, a geometric subset of them (the KS scan's cost)."""
    x = np.asarray(samples)
    x = x[x > 0].astype(np.int64)
    if len(x) < 2:
        raise ValueError("a power-law fit needs at least two positive samples")
    values, multiplicity = np.unique(x, return_counts=True)  # ascending
    # tail_n[i], tail_log[i]: samples and their log sum at or above values[i]
    tail_n = np.cumsum(multiplicity[::-1])[::-1]
    tail_log = np.cumsum((multiplicity * np.log(values))[::-1])[::-1]
    if x_min is not None:
        candidates = np.flatnonzero(values >= x_min)[:1]
        if len(candidates) == 0:
            raise ValueError(f"no sample reaches x_min {x_min}")
    else:
        candidates = np.flatnonzero(tail_n >= min(min_tail, len(x)))
        candidates = candidates[values[candidates] < values[-1]] if len(candidates) > 1 else candidates
        if len(candidates) > max_candidates:
            picks = np.unique(np.geomspace(1, len(candidates), max_candidates).astype(np.int64) - 1)
            candidates = candidates[picks]
    best: PowerLawFit | None = None
    for i in candidates.tolist():
        start = int(values[i]) if x_min is None else int(x_min)
        n_tail, sum_log = int(tail_n[i]), float(tail_log[i])
        alpha = mle_alpha(n_tail, sum_log, start)
        ks = _ks(values[i:].astype(np.float64), multiplicity[i:], alpha, start)
        if best is None or ks < best.ks:
            best = PowerLawFit(alpha=alpha, x_min=start, n_tail=n_tail, n=len(x), ks=ks)
    assert best is not None
    return best
