"""Paired statistics over seeds: the same seeds run on both sides, so a difference is judged per seed.

>>> s = paired_summary([0.80, 0.82, 0.81], [0.81, 0.82, 0.83])
>>> round(s.diff_mean, 4), s.n
(0.01, 3)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PairedSummary:
    n: int
    baseline_mean: float
    baseline_std: float  # sample std (n - 1); 0.0 for one seed
    method_mean: float
    method_std: float
    diff_mean: float  # mean over seeds of method - baseline
    diff_std: float
    diff_ci95: tuple[float, float] | None  # Student-t interval of the mean paired difference; None for one seed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["diff_ci95"] = list(self.diff_ci95) if self.diff_ci95 is not None else None
        return d


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def paired_summary(baseline: list[float], method: list[float]) -> PairedSummary:
    """Mean +- std of both sides and the paired difference (method - baseline) with a 95% t interval."""
    if len(baseline) != len(method) or not baseline:
        raise ValueError(f"paired values need equal, non-zero lengths (got {len(baseline)} and {len(method)})")
    diffs = [m - b for b, m in zip(baseline, method)]
    b_mean, b_std = mean_std(baseline)
    m_mean, m_std = mean_std(method)
    d_mean, d_std = mean_std(diffs)
    ci = None
    if len(diffs) > 1:
        from scipy.stats import t

        # one seed gives no interval; with n seeds the mean difference has n - 1 degrees of freedom
        half = float(t.ppf(0.975, len(diffs) - 1)) * d_std / math.sqrt(len(diffs))
        ci = (d_mean - half, d_mean + half)
    return PairedSummary(len(diffs), b_mean, b_std, m_mean, m_std, d_mean, d_std, ci)
