"""The statistics behind the claims lab's verdicts: Welch's t-test, TOST equivalence, an exact permutation test
and a bootstrap interval, all on the difference of means of two sides (seeds are the unit of noise).

* :func:`welch` -- Welch (1947)'s unequal-variance t statistic of ``mean(a) - mean(b)``:
  ``se^2 = s_a^2 / n_a + s_b^2 / n_b`` and the Welch-Satterthwaite degrees of freedom
  ``df = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1))``; ``T = (diff - delta) / se`` is
  compared with Student's t with ``df`` degrees of freedom (one-sided p-values :meth:`Welch.p_greater` /
  :meth:`Welch.p_less`, the two-sided interval ``diff +- t_{1 - (1 - level) / 2, df} * se``). A constant side (a
  number, e.g. 0) has no variance: its term drops out and the test is the one-sample t-test (``df = n - 1``).
* :func:`tost` -- Schuirmann (1987)'s two one-sided tests for equivalence within a fixed ``+-tolerance``:
  ``p = max(P(T >= t(-tol)), P(T <= t(+tol)))``; at level alpha this is "the ``1 - 2 alpha`` interval lies inside
  ``(-tol, tol)``".
* :func:`permutation_p` -- the exact permutation test of the difference of means (every split of the pooled values
  into groups of ``n_a`` and ``n_b``; Fisher 1935). On 0/1 values it *is* Fisher's exact test.
* :func:`bootstrap_interval` -- the percentile bootstrap interval of the difference of means (Efron & Tibshirani
  1993, Ch. 13), seeded. With 3-5 seeds it is too narrow (each side has only a handful of distinct resamples), so
  the verdicts use Welch's interval; tests/test_lab_stats.py measures its coverage.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy

__all__ = ["Welch", "bootstrap_interval", "permutation_p", "tost", "welch"]

#: exact enumeration of the permutation test up to this many splits; random splits beyond
MAX_EXACT_SPLITS = 200_000


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of ``mean(a) - mean(b)``: the difference, its standard error and degrees of freedom."""

    difference: float
    se: float
    df: float

    def t(self, delta: float = 0.0) -> float:
        """The t statistic of ``H0: mean(a) - mean(b) = delta``."""
        return (self.difference - delta) / self.se if self.se > 0 else math.copysign(math.inf, self.difference - delta)

    def p_greater(self, delta: float = 0.0) -> float:
        """One-sided p-value of ``H1: mean(a) - mean(b) > delta``: ``P(T_df >= t)``. With no variance at all
        (``se == 0``) the difference is exact: 0 if it exceeds ``delta``, else 1."""
        if self.se == 0:
            return 0.0 if self.difference > delta else 1.0
        return float(_scipy.t.sf(self.t(delta), self.df))

    def p_less(self, delta: float = 0.0) -> float:
        """One-sided p-value of ``H1: mean(a) - mean(b) < delta``: ``P(T_df <= t)``."""
        if self.se == 0:
            return 0.0 if self.difference < delta else 1.0
        return float(_scipy.t.cdf(self.t(delta), self.df))

    def interval(self, level: float = 0.90) -> tuple[float, float]:
        """The two-sided ``level`` confidence interval of the difference; each end is a one-sided
        ``(1 + level) / 2`` bound (the 90% interval's ends are the one-sided 95% bounds)."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        if self.se == 0:
            return (self.difference, self.difference)
        half = float(_scipy.t.ppf(1 - (1 - level) / 2, self.df)) * self.se
        return (self.difference - half, self.difference + half)


def _side(values: Sequence[float] | float, name: str) -> tuple[float, float, int] | None:
    """``(mean, variance / n, n)`` of a side, or None for a constant."""
    if isinstance(values, (int, float)):
        return None
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"side {name} needs at least 2 values for a variance, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"side {name} has non-finite values: {values}")
    return statistics.fmean(values), statistics.variance(values) / len(values), len(values)


def welch(a: Sequence[float] | float, b: Sequence[float] | float) -> Welch:
    """Welch's t-test of ``mean(a) - mean(b)`` (see the module docstring); a side given as a number is a constant."""
    sides = [_side(a, "a"), _side(b, "b")]
    if sides[0] is None and sides[1] is None:
        raise ValueError("welch needs at least one side of measured values; both are constants")
    means = [float(v) if s is None else s[0] for v, s in zip((a, b), sides, strict=True)]
    terms = [(s[1], s[2]) for s in sides if s is not None]
    se2 = sum(v for v, _ in terms)
    denominator = sum(v * v / (n - 1) for v, n in terms)
    df = se2 * se2 / denominator if denominator > 0 else float(sum(n - 1 for _, n in terms))
    return Welch(means[0] - means[1], math.sqrt(se2), df)


def tost(test: Welch, tolerance: float) -> float:
    """Schuirmann's TOST p-value of equivalence, ``H1: |mean(a) - mean(b)| < tolerance`` (a fixed, positive
    tolerance): the larger of the two one-sided p-values."""
    if not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    return max(test.p_greater(-tolerance), test.p_less(tolerance))


def permutation_p(a: Sequence[float], b: Sequence[float], alternative: str = "greater", seed: int = 0,
                  resamples: int = 20_000) -> float:  # fmt: skip
    """One-sided p-value of the permutation test of ``mean(a) - mean(b)``: the share of the splits of the pooled
    values into ``len(a)`` and ``len(b)`` whose difference is at least (``greater``) or at most (``less``) the
    observed one. Exact (every split) when there are at most :data:`MAX_EXACT_SPLITS`, else ``resamples``
    random splits (seeded, with the observed split counted: ``(k + 1) / (resamples + 1)``)."""
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    a, b = [float(v) for v in a], [float(v) for v in b]
    if not a or not b:
        raise ValueError("permutation_p needs values on both sides")
    pooled, n = a + b, len(a)
    total, sign = sum(pooled), 1.0 if alternative == "greater" else -1.0

    def statistic(sum_a: float) -> float:  # the difference of means of a split, from the sum of its a-part
        return sign * (sum_a / n - (total - sum_a) / len(b))

    observed = statistic(sum(a)) - 1e-12 * (1 + abs(total))  # ties count as "at least as extreme"
    if math.comb(len(pooled), n) <= MAX_EXACT_SPLITS:
        splits = [statistic(sum(c)) for c in itertools.combinations(pooled, n)]
        return sum(s >= observed for s in splits) / len(splits)
    rng = np.random.default_rng(seed)
    sums = rng.permuted(np.tile(np.asarray(pooled), (resamples, 1)), axis=1)[:, :n].sum(1)
    hits = int((sign * (sums / n - (total - sums) / len(b)) >= observed).sum())
    return (hits + 1) / (resamples + 1)


def bootstrap_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """The percentile bootstrap ``level`` interval of ``mean(a) - mean(b)``: each side resampled with
    replacement ``resamples`` times (seeded), the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
    resampled differences."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        raise ValueError("bootstrap_interval needs values on both sides")
    rng = np.random.default_rng(seed)
    diffs = rng.choice(x, (resamples, x.size)).mean(1) - rng.choice(y, (resamples, y.size)).mean(1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
