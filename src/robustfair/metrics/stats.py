"""Paired statistics over seeds: per-seed differences between a method and its baseline, a
Student-t confidence interval on their mean, and the verdict on a claimed direction.

Two methods trained with the same seeds (same data order, same initial weights where the models
match) give paired figures m_s and b_s. The difference d_s = m_s − b_s removes what the seeds
share, so the interval is

    mean(d) ± t_{1−(1−level)/2, n−1} · sd(d) / √n      (sd with ddof 1)

A claim is *shown* when the whole interval lies on the claimed side of 0 (or, for a claim of "no
change", inside ±margin), *contradicted* when the whole interval lies on the other side (or
outside ±margin), and *not shown* otherwise (in particular when the interval includes 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from scipy import stats as _st

Direction = Literal["up", "down", "same"]
VERDICTS = ("shown", "not shown", "contradicted")


@dataclass(frozen=True)
class PairedInterval:
    """Mean per-seed difference (method − baseline) with its t-interval."""

    diffs: tuple[float, ...]
    mean: float
    sd: float
    low: float
    high: float
    level: float

    @property
    def n(self) -> int:
        return len(self.diffs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"n": self.n}


def paired_differences(method: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per-seed differences ``method[s] − base[s]`` (the two sequences in the same seed order)."""
    if len(method) != len(base):
        raise ValueError(f"paired figures need the same seeds: {len(method)} against "
                         f"{len(base)} values")
    return [float(m) - float(b) for m, b in zip(method, base, strict=True)]


def t_interval(values: Sequence[float], level: float = 0.95) -> PairedInterval:
    """Mean of ``values`` with the two-sided Student-t interval at ``level`` (n ≥ 2; with one
    value the interval is unbounded)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: use a value in (0, 1)")
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(v) / n
    if n == 1:
        return PairedInterval(tuple(v), mean, float("nan"), -math.inf, math.inf, level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1))
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return PairedInterval(tuple(v), mean, sd, mean - half, mean + half, level)


def paired_interval(method: Sequence[float], base: Sequence[float],
                    level: float = 0.95) -> PairedInterval:
    """The t-interval of the per-seed differences ``method − base``."""
    return t_interval(paired_differences(method, base), level)


def verdict(low: float, high: float, direction: Direction, margin: float = 0.0) -> str:
    """``shown``, ``not shown`` or ``contradicted`` for an interval [low, high] on a difference.

    - ``up``: shown if low > 0, contradicted if high < 0;
    - ``down``: shown if high < 0, contradicted if low > 0;
    - ``same`` (no change beyond ``margin``): shown if −margin ≤ low and high ≤ margin,
      contradicted if low > margin or high < −margin.
    """
    if math.isnan(low) or math.isnan(high):
        return "not shown"
    if direction == "up":
        return "shown" if low > 0 else "contradicted" if high < 0 else "not shown"
    if direction == "down":
        return "shown" if high < 0 else "contradicted" if low > 0 else "not shown"
    if direction == "same":
        if -margin <= low and high <= margin:
            return "shown"
        return "contradicted" if low > margin or high < -margin else "not shown"
    raise ValueError(f"direction={direction!r}: use up, down or same")
