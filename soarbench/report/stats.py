"""Bootstrap statistics for the report, in pure numpy.

Two procedures, both resampling with replacement (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993):

- `bootstrap_ci`: percentile confidence interval of a mean. The report uses it over seeds (one value per training
  run), where it says how much a method's score moves from seed to seed.
- `paired_bootstrap`: a paired test of mean(a - b) = 0, resampling the pairs. The report uses it over prompts,
  comparing two models evaluated on the same prompt set.

And the minimum detectable difference (MDE) of a comparison at 80% power, two-sided alpha 0.05 (normal
approximation): `mde_paired` from the per-prompt paired differences, `mde_two_groups` from the seeds' spread.

Both use a fixed RNG seed, so a report built twice from the same runs shows the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

N_RESAMPLES = 10_000
DEFAULT_SEED = 0
DEFAULT_ALPHA = 0.05  # 95% intervals

# Resampling draws an (n_resamples x n) index matrix; drawing it in blocks keeps memory near 32 MiB for any n.
_MAX_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ConfidenceInterval:
    """A sample mean with the percentile bootstrap interval around it; n is the number of values."""

    mean: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class PairedTest:
    """Result of a paired bootstrap: the mean difference a - b, its interval, a two-sided p-value, n pairs."""

    diff: float
    lo: float
    hi: float
    p_value: float
    n: int


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = DEFAULT_SEED,
    alpha: float = DEFAULT_ALPHA,
) -> ConfidenceInterval:
    """Percentile bootstrap (1 - alpha) interval of the mean of `values`.

    Draws `n_resamples` samples of size n with replacement, takes each one's mean, and reports the alpha/2 and
    1 - alpha/2 quantiles of those means. With very few values the interval is coarse: from 2 values the
    resampled means can only be min, midpoint or max, and the 95% interval is exactly [min, max].
    """
    arr = _finite_vector(values, "values")
    _check_params(n_resamples, alpha)
    means = _resampled_means(arr, n_resamples, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    bounds = (float(arr.min()), float(arr.max()))
    return ConfidenceInterval(
        mean=_clip(float(arr.mean()), bounds),
        lo=_clip(float(lo), bounds),
        hi=_clip(float(hi), bounds),
        n=int(arr.size),
    )


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = DEFAULT_SEED,
    alpha: float = DEFAULT_ALPHA,
    strata: Sequence[str] | None = None,
) -> PairedTest:
    """Paired bootstrap test of H0: mean(a - b) = 0, where a[i] and b[i] are measured on the same unit i.

    Procedure: d = a - b; observed statistic t = mean(d). Resample the n pairs with replacement `n_resamples`
    times (resampling d[i] keeps each pair together) and take each resample's mean t*.
    With `strata` (one label per unit, e.g. GenEval's task of each prompt) the statistic is the mean of the
    strata's means, as GenEval's overall score is, and each stratum is resampled within itself (a stratified
    bootstrap: every resample keeps each task's size).
    - Interval: the alpha/2 and 1 - alpha/2 percentiles of t*.
    - p-value: the t* distribution shifted to mean zero approximates t's distribution under H0 (Efron &
      Tibshirani 1993, section 16.4), so p = (1 + #{|t* - t| >= |t|}) / (1 + n_resamples). The +1 counts the
      observed sample itself, so p is never 0 (its floor is 1 / (1 + n_resamples)); identical inputs give 1.
    """
    a_arr = _finite_vector(a, "a")
    b_arr = _finite_vector(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples differ in length: {a_arr.size} vs {b_arr.size}")
    _check_params(n_resamples, alpha)
    diffs = a_arr - b_arr
    if strata is not None:
        groups = _strata_groups(strata, diffs.size)
        observed = float(np.mean([diffs[g].mean() for g in groups]))
        rng = np.random.default_rng(seed)
        means = np.mean([_resampled_means(diffs[g], n_resamples, rng) for g in groups], axis=0)
    else:
        observed = float(diffs.mean())
        means = _resampled_means(diffs, n_resamples, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    as_extreme = int(np.count_nonzero(np.abs(means - observed) >= abs(observed)))
    bounds = (float(diffs.min()), float(diffs.max()))
    return PairedTest(
        diff=_clip(observed, bounds),
        lo=_clip(float(lo), bounds),
        hi=_clip(float(hi), bounds),
        p_value=(1 + as_extreme) / (1 + n_resamples),
        n=int(diffs.size),
    )


def _strata_groups(strata: Sequence[str], n: int) -> list[np.ndarray]:
    """Unit indices per stratum, strata in order of first appearance."""
    labels = list(strata)
    if len(labels) != n:
        raise ValueError(f"strata has {len(labels)} labels for {n} units")
    order = list(dict.fromkeys(labels))
    return [np.flatnonzero(np.asarray([label == s for label in labels])) for s in order]


def _resampled_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_resamples` same-size resamples of `values`, drawn with replacement."""
    n = values.size
    block = max(1, _MAX_BLOCK_ELEMENTS // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[indices].mean(axis=1)
    return means


def _finite_vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_params(n_resamples: int, alpha: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _clip(value: float, bounds: tuple[float, float]) -> float:
    # Any mean of resampled values lies within [min, max] of the values; rounding can put the computed one an
    # ulp outside (the float mean of seven copies of 0.1 is not 0.1), which would make a degenerate interval
    # around a constant not quite degenerate.
    return min(max(value, bounds[0]), bounds[1])


# ---------------------------------------------------------------------------------------------------------------
# Minimum detectable difference

DEFAULT_POWER = 0.8


def mde_multiplier(alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER) -> float:
    """z_(1 - alpha/2) + z_power: 1.960 + 0.842 = 2.802 for a two-sided 5% test at 80% power."""
    _check_params(1, alpha)
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    normal = NormalDist()
    return normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)


def mde_paired(diffs: Sequence[float] | np.ndarray, alpha: float = DEFAULT_ALPHA,
               power: float = DEFAULT_POWER, strata: Sequence[str] | None = None) -> float:
    """Smallest true mean difference a paired test over these n units detects with `power` (normal approximation).

    MDE = (z_(1-alpha/2) + z_power) * sd(d) / sqrt(n), sd with n - 1 degrees of freedom; NaN for fewer than 2
    pairs, where no spread can be estimated. With `strata` (see paired_bootstrap) the statistic is the mean of
    the T strata's means, whose standard error is sqrt(sum_t sd_t^2 / n_t) / T; a stratum of one unit has no
    spread to estimate and contributes none.
    """
    d = _finite_vector(diffs, "diffs")
    if d.size < 2:
        return math.nan
    if strata is None:
        return mde_multiplier(alpha, power) * float(d.std(ddof=1)) / math.sqrt(d.size)
    groups = _strata_groups(strata, d.size)
    variance = sum(float(d[g].var(ddof=1)) / g.size for g in groups if g.size >= 2) / len(groups) ** 2
    return mde_multiplier(alpha, power) * math.sqrt(variance)


def mde_two_groups(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray | None,
                   alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER) -> float:
    """MDE of a difference of two means from independent units (seeds): multiplier * sqrt(s_a^2/n_a + s_b^2/n_b).

    `b` None compares `a`'s mean with a fixed number (a published value): multiplier * s_a / sqrt(n_a). Non-finite
    values (failed evaluations) are left out; NaN when a side has fewer than 2 values (no spread to estimate).
    """
    sides = [a] if b is None else [a, b]
    variance = 0.0
    for side in sides:
        values = np.asarray(side, dtype=float).ravel()
        values = values[np.isfinite(values)]
        if values.size < 2:
            return math.nan
        variance += float(values.var(ddof=1)) / values.size
    return mde_multiplier(alpha, power) * math.sqrt(variance)
