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


def test_two_level_bootstrap_with_seeds_only_matches_the_exact_seed_bootstrap():
    """Every image of a seed has the same difference: only the seeds vary, and with 3 seeds the bootstrap
    distribution of the mean has 27 equally likely ordered draws, enumerated by hand here."""
    import itertools

    from mpp.evaluation.stats import two_level_bootstrap

    per_seed = [0.0, 0.5, 1.0]
    a = np.array([[d] * 40 for d in per_seed])
    b = np.zeros_like(a)
    atoms = np.array(sorted(np.mean(draw) for draw in itertools.product(per_seed, repeat=3)))  # 27, each 1/27
    cdf = np.arange(1, 28) / 27
    exact_low, exact_high = atoms[np.argmax(cdf >= 0.025)], atoms[np.argmax(cdf >= 0.975)]
    assert (exact_low, exact_high) == (0.0, 1.0)  # the extreme atoms carry 1/27 = 3.7% each, more than a 2.5% tail
    out = two_level_bootstrap(a, b, resamples=20_000)
    assert out["mean"] == pytest.approx(0.5)
    assert (out["low"], out["high"]) == (pytest.approx(exact_low), pytest.approx(exact_high))
    narrower = two_level_bootstrap(a, b, resamples=20_000, confidence=0.8)  # 10% tails: inside the extreme atoms
    assert (atoms[np.argmax(cdf >= 0.1)], atoms[np.argmax(cdf >= 0.9)]) == (pytest.approx(1 / 6), pytest.approx(5 / 6))
    assert (narrower["low"], narrower["high"]) == (pytest.approx(1 / 6), pytest.approx(5 / 6))


def test_two_level_bootstrap_with_one_seed_is_the_image_bootstrap():
    """One seed: the interval is the bootstrap over images, close to mean ± 1.96 sd / sqrt(N)."""
    from mpp.evaluation.stats import two_level_bootstrap

    rng = np.random.default_rng(1)
    a = (rng.random((1, 4000)) < 0.8).astype(float)
    b = (rng.random((1, 4000)) < 0.7).astype(float)
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    out = two_level_bootstrap(a, b, resamples=5000)
    assert out["low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert out["high"] == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_power_of_the_paired_t_test_against_simulation():
    from mpp.evaluation.stats import detectable_difference, power_of_paired_t

    rng = np.random.default_rng(0)
    effect, sd, n = 0.05, 0.0427, 3  # 3 seeds with a half-width of 0.106: a 5-point gain is found about 22% of the time
    diffs = rng.normal(effect, sd, size=(20_000, n))
    rejected = scipy_stats.ttest_1samp(diffs, 0, axis=1).pvalue < 0.05
    assert power_of_paired_t(effect, sd, n) == pytest.approx(rejected.mean(), abs=0.01)
    assert power_of_paired_t(effect, sd, n) == pytest.approx(0.22, abs=0.01)
    smallest = detectable_difference(0.01, 5)
    assert power_of_paired_t(smallest, 0.01, 5) == pytest.approx(0.8, abs=1e-6)
    assert detectable_difference(0.01, 1) is None


def test_convergence_of_smoothed_curves():
    from mpp.evaluation.stats import converged, smoothed

    assert smoothed([1, 2, 3, 4], 2).tolist() == [1, 1.5, 2.5, 3.5]
    flat = [[e, min(0.8, (e + 1) / 50)] for e in range(4, 100, 5)]  # rises until epoch 40, then flat
    rising = [[e, (e + 1) / 100] for e in range(4, 100, 5)]
    noisy_flat = [[e, 0.8 + (0.003 if (e // 5) % 2 else -0.003)] for e in range(4, 100, 5)]
    assert converged(flat, 100)["converged"] and not converged(rising, 100)["converged"]
    assert converged(noisy_flat, 100)["converged"]  # noise within the tolerance
    late_jump = [[e, 0.7 if e < 85 else 0.75] for e in range(4, 100, 5)]
    assert not converged(late_jump, 100)["converged"]
