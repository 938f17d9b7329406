"""Percentiles and the small summaries the report is built from (pure functions, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN for no values."""
    return _sorted_percentile(sorted(values), q)


def _sorted_percentile(s: Sequence[float], q: float) -> float:
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, mean and the percentiles the report uses, plus a 201-point quantile curve for CDF plots."""
    s = sorted(values)
    n = len(s)
    out: dict[str, float] = {"n": n, "mean": sum(s) / n if n else math.nan}
    for q in (50, 90, 99, 99.9):
        out[f"p{q:g}"] = _sorted_percentile(s, q)
    out["max"] = s[-1] if s else math.nan
    return out


def quantile_curve(values: Sequence[float], points: int = 201) -> list[float]:
    s = sorted(values)
    return [_sorted_percentile(s, 100 * i / (points - 1)) for i in range(points)] if s else []
