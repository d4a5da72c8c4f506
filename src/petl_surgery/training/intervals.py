"""Confidence intervals for the gain of one init over another: Student's t on paired differences.

The one statistics module of the study (:mod:`.gains`) and the demonstration. Every few-shot cell
trains two models that differ only in the init of the PETL modules (random or pre-trained): same few-shot
draw, head init, steps and learning rate. The gain of one pair is the pre-trained model's accuracy minus
the random one's; pairs from different seeds (each seed a new few-shot draw and head init) are
independent. The mean gain's two-sided 95% interval is then
Student's t interval on the paired differences, ``mean ± t(0.975, n-1) · sd / sqrt(n)``: it assumes the
gains are roughly normal, which for a handful of pairs nothing can check, so the reports say which method
they use and draw conclusions only where the whole interval lies on one side of zero.

No SciPy: the t quantile comes from the regularised incomplete beta function (continued fraction,
evaluated by the modified Lentz method) and bisection.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

MIN_PAIRS = 3
METHOD = "two-sided 95% Student t interval on paired differences (pre-trained minus random init) over seeds"


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function I_x(a, b), by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval; ``low``/``high`` are NaN with fewer than 2 values."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        """``"higher"`` or ``"lower"`` when the whole interval lies above or below zero, else
        ``"inconclusive"``; always inconclusive below :data:`MIN_PAIRS` values (two pairs that happen to
        agree give a zero-width interval that supports nothing)."""
        if self.n >= MIN_PAIRS and self.low > 0:
            return "higher"
        if self.n >= MIN_PAIRS and self.high < 0:
            return "lower"
        return "inconclusive"


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``differences`` and its Student t interval at ``confidence`` (two-sided)."""
    values = [float(v) for v in differences]
    if not values:
        raise ValueError("paired_interval needs at least one difference")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, len(values))
    half = t_quantile(0.5 + confidence / 2.0, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))
