"""Statistics over seeds: mean ± sample std, and paired per-seed differences with a t-interval.

With three seeds a sample std (ddof=1) and a Student-t interval (2 degrees of freedom, t = 4.30)
are the honest summary; np.std's default (ddof=0) understates the spread by a factor sqrt(3/2).
"""

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _scipy_stats


def mean_std(values) -> dict:
    """{'mean', 'std', 'n'}: std is the sample std (ddof=1), None for a single value."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None, "n": int(x.size)}


@dataclass
class PairedDifference:
    """a - b paired by seed: mean, sample std, and a t-interval for the mean difference."""

    mean: float
    std: float | None  # None with one pair
    n: int
    low: float | None  # the interval's ends; None with one pair
    high: float | None
    confidence: float

    @property
    def covers_zero(self) -> bool | None:
        return None if self.low is None else self.low <= 0 <= self.high

    def to_dict(self) -> dict:
        return {**asdict(self), "covers_zero": self.covers_zero, "phrase": self.phrase()}

    def phrase(self, digits: int = 3) -> str:
        """'+0.032 ± 0.010 (95% CI [+0.007, +0.057], n=3): excludes 0' and the like."""
        f = f"{{:+.{digits}f}}"
        if self.std is None:
            return f"{f.format(self.mean)} (n=1: no interval)"
        ci = f"{round(100 * self.confidence)}% CI [{f.format(self.low)}, {f.format(self.high)}]"
        verdict = "covers 0" if self.covers_zero else "excludes 0"
        return f"{f.format(self.mean)} ± {self.std:.{digits}f} ({ci}, n={self.n}): {verdict}"


def paired_difference(a, b, confidence: float = 0.95) -> PairedDifference:
    """Per-seed differences a[i] - b[i]: mean, sample std, and mean ± t_{(1+c)/2, n-1} · std / sqrt(n)."""
    a, b = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values need the same positive count, got {a.size} and {b.size}")
    d = a - b
    n = d.size
    if n == 1:
        return PairedDifference(float(d[0]), None, 1, None, None, confidence)
    std = float(d.std(ddof=1))
    half = float(_scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    m = float(d.mean())
    return PairedDifference(m, std, n, m - half, m + half, confidence)


def verdict(diff: PairedDifference) -> str:
    """For a finding 'a beats b' tested by diff = a - b: agrees when the interval lies above 0,
    disagrees when it lies below 0, inconclusive when it covers 0 (or there is one seed)."""
    if diff.covers_zero is None or diff.covers_zero:
        return "inconclusive"
    return "agrees" if diff.mean > 0 else "disagrees"


def two_level_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Mean of a - b over seeds and test images, with a percentile interval that covers both sources of
    chance: a and b are (seeds, images) 0/1 correctness of two arms, paired by seed and image. Each
    resample draws seeds with replacement and, independently, test images with replacement (seeds and
    images are crossed: every seed scores the same images). {'mean', 'low', 'high', 'resamples'}."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)  # (S, N)
    seeds, images = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for start in range(0, resamples, 500):
        n = min(500, resamples - start)
        image_weights = (
            rng.multinomial(images, np.full(images, 1 / images), size=n) / images
        )  # (n, N): one image draw each
        per_seed = image_weights @ d.T  # (n, S): each seed's mean difference on that image draw
        seed_weights = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=n) / seeds  # (n, S)
        stats[start : start + n] = (per_seed * seed_weights).sum(1)
    tail = (1 - confidence) / 2
    return {
        "mean": float(d.mean()),
        "low": float(np.quantile(stats, tail)),
        "high": float(np.quantile(stats, 1 - tail)),
        "resamples": resamples,
        "confidence": confidence,
    }


def power_of_paired_t(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """The chance that a two-sided paired t-test at level alpha over n pairs rejects 0 when the true mean
    difference is `effect` and the per-pair differences have standard deviation `sd` (noncentral t)."""
    df = n - 1
    crit = _scipy_stats.t.ppf(1 - alpha / 2, df)
    shift = effect / (sd / math.sqrt(n))
    return float(_scipy_stats.nct.sf(crit, df, shift) + _scipy_stats.nct.cdf(-crit, df, shift))


def detectable_difference(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float | None:
    """The smallest true mean difference that a paired t-test over n pairs detects with `power` (None for
    fewer than two pairs: no test)."""
    from scipy.optimize import brentq

    if n < 2:
        return None
    high = sd
    while power_of_paired_t(high, sd, n, alpha) < power:
        high *= 2
    return float(brentq(lambda e: power_of_paired_t(e, sd, n, alpha) - power, 0.0, high))


def smoothed(values, window: int) -> np.ndarray:
    """Moving average over `window` consecutive values (the first window - 1 entries average what there is)."""
    x = np.asarray(values, np.float64)
    sums = np.cumsum(np.concatenate([[0.0], x]))
    ends = np.arange(1, len(x) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def converged(curve: list, budget: float, tail: float = 0.2, window: float = 0.1, tolerance: float = 0.005) -> dict:
    """Is a validation curve [[epoch, score], ...] flat at its end? Smoothed over `window` of the budget, the
    best point of the last `tail` of the budget must not beat the best point before it by more than
    `tolerance`. {'converged', 'best_tail', 'best_before', 'window_points'}."""
    epochs = np.array([e for e, _ in curve], np.float64)
    scores = [s for _, s in curve]
    spacing = np.median(np.diff(epochs)) if len(epochs) > 1 else budget
    points = max(1, int(round(window * budget / spacing)))
    smooth = smoothed(scores, points)
    in_tail = epochs + 1 > (1 - tail) * budget  # epoch e ends at e + 1
    if in_tail.all() or not in_tail.any():
        return {"converged": False, "best_tail": None, "best_before": None, "window_points": points}
    best_tail, best_before = float(smooth[in_tail].max()), float(smooth[~in_tail].max())
    return {
        "converged": best_tail <= best_before + tolerance,
        "best_tail": best_tail,
        "best_before": best_before,
        "window_points": points,
    }
