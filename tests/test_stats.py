"""mpp.evaluation.stats against hand computations (a t-table value) and scipy's paired t-test."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mpp.evaluation.stats import mean_std, paired_difference, verdict

T_975_2DF = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)


def test_mean_std_is_the_sample_std():
    s = mean_std([0.70, 0.72, 0.69])
    assert s["mean"] == pytest.approx(0.70333333333)
    # by hand: deviations -0.00333, 0.01667, -0.01333; squares sum 0.00046667; / (3 - 1)
    assert s["std"] == pytest.approx(math.sqrt(0.00046666667 / 2))
    assert s["n"] == 3
    assert mean_std([0.5])["std"] is None


def test_paired_difference_by_hand():
    d = paired_difference([0.70, 0.72, 0.69], [0.65, 0.68, 0.66])  # differences 0.05, 0.04, 0.03
    assert d.mean == pytest.approx(0.04) and d.std == pytest.approx(0.01) and d.n == 3
    half = T_975_2DF * 0.01 / math.sqrt(3)  # 0.02484
    assert (d.low, d.high) == (pytest.approx(0.04 - half), pytest.approx(0.04 + half))
    assert d.covers_zero is False
    assert d.phrase() == "+0.040 ± 0.010 (95% CI [+0.015, +0.065], n=3): excludes 0"


def test_paired_difference_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        a, b = rng.normal(size=n), rng.normal(size=n)
        d = paired_difference(a, b)
        ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
        assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert d.std == pytest.approx(np.std(a - b, ddof=1))


def test_covering_interval_and_one_seed():
    d = paired_difference([0.75, 0.69, 0.72], [0.70, 0.70, 0.70])  # 0.05, -0.01, 0.02: mean 0.02, std 0.03
    assert d.std == pytest.approx(0.03)
    assert d.high - d.mean == pytest.approx(T_975_2DF * 0.03 / math.sqrt(3))
    assert d.covers_zero is True and d.phrase().endswith("covers 0")
    one = paired_difference([0.7], [0.6])
    assert one.mean == pytest.approx(0.1) and one.std is None and one.covers_zero is None
    assert "no interval" in one.phrase()
    with pytest.raises(ValueError, match="same positive count"):
        paired_difference([1, 2], [1])


def test_verdict_on_synthetic_seeds():
    assert verdict(paired_difference([0.70, 0.72, 0.69], [0.65, 0.68, 0.66])) == "agrees"
    assert verdict(paired_difference([0.65, 0.68, 0.66], [0.70, 0.72, 0.69])) == "disagrees"
    assert verdict(paired_difference([0.75, 0.69, 0.72], [0.70, 0.70, 0.70])) == "inconclusive"
    assert verdict(paired_difference([0.75], [0.70])) == "inconclusive"  # one seed decides nothing
