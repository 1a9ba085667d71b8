"""Small statistics for verdicts: means, spreads, differences and slopes with standard errors.

A verdict compares an effect with its standard error (SE): an effect is *shown* when it is
more than :data:`Z` standard errors from zero in the claimed direction, *contradicted* when it
is more than :data:`Z` SEs in the other direction, and otherwise the spread over seeds swamps
it (inconclusive at this scale). With one seed per point there is no spread: every verdict is
then inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Z = 2.0  # standard errors for "shown" (about a 95% two-sided interval)

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive at this scale"


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); NaN for fewer than 2 values."""
    if len(xs) < 2:
        return math.nan
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def se(xs: Sequence[float]) -> float:
    """Standard error of the mean; NaN for fewer than 2 values."""
    return std(xs) / math.sqrt(len(xs)) if len(xs) >= 2 else math.nan


@dataclass(frozen=True)
class Estimate:
    """An effect and its standard error."""

    value: float
    se: float

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.value + other.value, math.hypot(self.se, other.se))

    def __sub__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.value - other.value, math.hypot(self.se, other.se))

    def scaled(self, k: float) -> "Estimate":
        return Estimate(k * self.value, abs(k) * self.se)

    @property
    def defined(self) -> bool:
        return math.isfinite(self.value) and math.isfinite(self.se)

    def shown(self) -> bool:
        """More than Z SEs above zero."""
        return self.defined and self.value > Z * self.se and self.value > 0

    def contradicted(self) -> bool:
        """More than Z SEs below zero."""
        return self.defined and self.value < -Z * self.se and self.value < 0

    def text(self, digits: int = 3) -> str:
        if not math.isfinite(self.se):
            return f"{self.value:+.{digits}f} (no spread: one seed)"
        return f"{self.value:+.{digits}f} ± {self.se:.{digits}f} (SE)"


def estimate(xs: Sequence[float]) -> Estimate:
    """The mean of ``xs`` with its SE."""
    return Estimate(mean(xs), se(xs))


def difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """mean(a) - mean(b) with the SE of two independent means (Welch)."""
    return estimate(a) - estimate(b)


def pooled_std(groups: Sequence[Sequence[float]]) -> float:
    """The pooled within-group standard deviation (NaN without any group of 2+)."""
    num = sum((len(g) - 1) * std(g) ** 2 for g in groups if len(g) >= 2)
    den = sum(len(g) - 1 for g in groups if len(g) >= 2)
    return math.sqrt(num / den) if den else math.nan


def slope(xs: Sequence[float], ys: Sequence[float]) -> Estimate:
    """Least-squares slope of ys on xs with its standard error (NaN SE with < 3 points or
    no spread in x)."""
    n = len(xs)
    if n < 2:
        return Estimate(math.nan, math.nan)
    mx, my = mean(xs), mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return Estimate(math.nan, math.nan)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return Estimate(b, math.nan)
    a = my - b * mx
    rss = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return Estimate(b, math.sqrt(rss / (n - 2) / sxx))


def judge(supports: bool, contradicts: bool) -> str:
    """The verdict from whether the numbers show the claim and whether they show its
    opposite (contradiction wins a tie: it is a measured effect against the claim)."""
    if contradicts:
        return NOT_REPRODUCED
    if supports:
        return REPRODUCED
    return INCONCLUSIVE
