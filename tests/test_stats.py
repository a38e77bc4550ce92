"""Paired statistics used by the multi-seed benchmarks (hand-computed values)."""
import math

import pytest

from prunetune.report.stats import mean_std, paired_summary


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5 / 3))


def test_paired_interval_by_hand():
    # diffs 0.01, 0.00, 0.02: mean 0.01, sample std 0.01, t(0.975, 2) = 4.302653, half = 4.302653 * 0.01 / sqrt(3)
    s = paired_summary([0.80, 0.82, 0.81], [0.81, 0.82, 0.83])
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert s.n == 3
    assert s.diff_mean == pytest.approx(0.01)
    assert s.diff_std == pytest.approx(0.01)
    assert s.diff_ci95 == pytest.approx((0.01 - half, 0.01 + half))
    assert s.baseline_mean == pytest.approx(0.81) and s.method_mean == pytest.approx(0.82)


def test_pairing_removes_the_shared_seed_effect():
    # the seeds differ a lot, the method is always exactly 0.01 better: the interval collapses onto 0.01
    s = paired_summary([0.70, 0.80, 0.90], [0.71, 0.81, 0.91])
    assert s.baseline_std > 0.09
    assert s.diff_ci95 == pytest.approx((0.01, 0.01), abs=1e-9)


def test_one_seed_has_no_interval_and_bad_lengths_are_refused():
    assert paired_summary([0.5], [0.6]).diff_ci95 is None
    with pytest.raises(ValueError):
        paired_summary([0.5, 0.6], [0.6])
    with pytest.raises(ValueError):
        paired_summary([], [])
