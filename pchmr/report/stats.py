"""Confidence intervals over seeds, by Student's t.

A sweep repeats every row with n seeds. For a metric's n final values x₁…xₙ, :func:`interval`
gives the mean x̄, the sample standard deviation s (n − 1 in the denominator) and the two-sided
confidence interval x̄ ± t₍₁₋α/₂, n−1₎ · s / √n (α = 0.05 for the 95 % interval). With n = 1
there is no spread to estimate, so there is no interval (``half_width`` is None) and the text
shows the one value alone.

:func:`paired_difference` pairs two rows by seed (the same seed draws the same partition, client
sampling and initialisation in both, so the pairs share their randomness) and gives the interval
of the per-seed differences dᵢ = rowᵢ − baselineᵢ the same way: the paired t-interval. It
excludes 0 exactly when a two-sided paired t-test rejects "no difference" at level α.

The t quantile is scipy's (``scipy.stats.t.ppf``; scipy is a dependency of pchmr), e.g.
t₀.₉₇₅ = 12.706 (1 dof), 4.303 (2), 2.776 (4), 2.045 (29).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CONFIDENCE", "Interval", "interval", "paired_difference", "t_quantile"]

#: The confidence level of every interval pchmr reports.
CONFIDENCE = 0.95
MISSING = "—"


def t_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of Student's t distribution with ``dof`` degrees of freedom
    (``t_quantile(0.975, 4)`` = 2.776…)."""
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise ValueError(f"Student's t needs a whole number of degrees of freedom >= 1, got {dof!r}")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"a quantile's probability must lie in (0, 1), got {probability!r}")
    from scipy.stats import t  # imported here: the report tables load without it

    return float(t.ppf(probability, dof))


@dataclass(frozen=True)
class Interval:
    """n values, their mean, sample standard deviation (None for n < 2) and the two-sided
    ``confidence`` interval of the mean by Student's t with n − 1 dof (None for n < 2)."""

    values: tuple[float, ...]
    mean: float | None
    std: float | None
    half_width: float | None
    confidence: float = CONFIDENCE

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0 (never for n < 2: there is none)."""
        low, high = self.low, self.high
        return low is not None and high is not None and (low > 0.0 or high < 0.0)

    def text(self, decimals: int = 1, signed: bool = False) -> str:
        """``"57.3 ± 1.2"``; ``"57.3"`` for n = 1; ``"—"`` without values. ``signed`` writes a
        difference's sign (``"+1.2 ± 0.8"``, ``"−2.0 ± 1.1"``)."""
        if self.mean is None:
            return MISSING
        mean = f"{self.mean:+.{decimals}f}".replace("-", "−") if signed else f"{self.mean:.{decimals}f}"
        return mean if self.half_width is None else f"{mean} ± {self.half_width:.{decimals}f}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "half_width": self.half_width,
            "low": self.low,
            "high": self.high,
            "confidence": self.confidence,
            "values": list(self.values),
        }


def interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` with its Student-t ``confidence`` interval (module docstring)."""
    vals = tuple(float(v) for v in values)
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"an interval needs finite values, got {list(vals)}")
    if not vals:
        return Interval((), None, None, None, confidence)
    n = len(vals)
    mean = math.fsum(vals) / n
    if n == 1:
        return Interval(vals, mean, None, None, confidence)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(vals, mean, std, half, confidence)


def paired_difference(
    row: Mapping[int, float], baseline: Mapping[int, float], confidence: float = CONFIDENCE
) -> tuple[Interval, tuple[int, ...]]:
    """The interval of ``row[s] − baseline[s]`` over the seeds ``s`` both have (in seed order),
    and those seeds; seeds only one side has are left out."""
    seeds = tuple(sorted(set(row) & set(baseline)))
    return interval((row[s] - baseline[s] for s in seeds), confidence), seeds
