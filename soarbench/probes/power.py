"""How small a difference a comparison of n items can detect: the minimum detectable difference.

    from soarbench.probes.power import min_detectable_difference
    min_detectable_difference(diffs_std=0.5, n=64)            # paired: sd of per-item differences
    min_detectable_difference(diffs_std=0.5, n=64, paired=False)  # two independent groups of n each

Normal approximation of a two-sided test at level alpha with the given power:

    MDD = (z_{1 - alpha/2} + z_{power}) * SE,   SE = sd / sqrt(n) (paired),   SE = sd * sqrt(2 / n) (unpaired)

where, paired, `diffs_std` is the standard deviation of the per-item differences (e.g. per-prompt score of model
A minus model B on the same prompts and seeds), and, unpaired, the common per-item standard deviation of each
group. A measured difference smaller than the MDD is one the comparison could not reliably have detected.
"""
from __future__ import annotations

import math

from scipy.stats import norm


def min_detectable_difference(diffs_std: float, n: int, alpha: float = 0.05, power: float = 0.8,
                              paired: bool = True) -> float:
    """The smallest true difference a two-sided level-`alpha` test detects with probability `power`."""
    if not diffs_std >= 0 or math.isinf(diffs_std):
        raise ValueError(f"diffs_std must be a finite number >= 0, got {diffs_std}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    standard_error = diffs_std / math.sqrt(n) if paired else diffs_std * math.sqrt(2.0 / n)
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * standard_error)
