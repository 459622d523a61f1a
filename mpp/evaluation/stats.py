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
