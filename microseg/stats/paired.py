"""Paired differences over patients: bootstrap confidence intervals, Wilcoxon tests, Holm's adjustment.

For two runs a, b and one per-patient metric, the paired differences d_i = a_i - b_i over the
patients both runs scored (NaN pairs left out; `microseg.reporting.paired_runs` pairs them) are
summarised by
- their mean and median;
- a percentile bootstrap 95% confidence interval of the mean difference: B resamples of the n
  patients with replacement (seeded), the mean of each, and the 2.5th and 97.5th percentiles of
  those B means (Efron and Tibshirani's percentile interval; the resamples of one call come from
  one `numpy.random.Generator.integers(0, n, (B, n))`, as `scipy.stats.bootstrap` draws them);
- the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, exact two-sided for small n without
  ties). With n patients its smallest reachable p is 2 / 2^n (every difference of one sign:
  the statistic 0 has probability 1 / 2^n under the null, doubled for two sides), so with
  n <= 5 patients no difference can reach p < 0.05.
The tests of one report are a family: every pair of runs x every metric tested. Their p-values are
Holm-adjusted over that family (`holm`; Holm, "A simple sequentially rejective multiple test
procedure", Scandinavian Journal of Statistics 1979), which keeps the chance of any false finding
in the family at most 0.05 whatever the tests' dependence.
A difference is called within noise when its interval covers 0 or its adjusted p >= 0.05 (or p
is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
ALPHA = 0.05


def bootstrap_ci(
    diffs: Sequence[float] | np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs` (vectorised: one [B, n] index draw).

    (lo, hi) = percentiles 100 (1 - level) / 2 and 100 (1 + level) / 2 (numpy's linear
    interpolation) of the B resampled means; (NaN, NaN) for no values.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if not d.size:
        return math.nan, math.nan
    index = np.random.default_rng(seed).integers(0, d.size, (n_resamples, d.size))
    lo, hi = np.percentile(d[index].mean(axis=1), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family, in the given order.

    With the m defined p sorted p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)). Rejecting where the adjusted p < alpha is Holm's procedure at level
    alpha. An undefined p (NaN: no test was possible) stays NaN and does not count in m.
    """
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, math.nan)
    defined = np.flatnonzero(~np.isnan(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    m = order.size
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def wilcoxon_test(d: np.ndarray) -> tuple[float, float]:
    """`scipy.stats.wilcoxon` of the paired differences `d`: (statistic, two-sided p); NaN, NaN when
    there is no difference or every difference is 0."""
    from scipy.stats import wilcoxon

    if not (d.size and np.any(d != 0)):
        return math.nan, math.nan
    test = wilcoxon(d)
    return float(test.statistic), float(test.pvalue)


def min_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p of the exact Wilcoxon signed-rank test on n differences: 2 / 2^n (at most 1)."""
    return min(1.0, 2.0 / 2.0**n)


@dataclass
class PairedDifference:
    """a - b on one per-patient metric, paired by patient (and by replicate slot: the same seed, and
    fold, for a and b): the mean difference, an interval of it, the pair's test, and the Wilcoxon
    signed-rank test of the per-patient differences. One type for both comparisons, each field
    meaning the same in both; what an analysis does not estimate is NaN:
    - two runs (`microseg.reporting.paired_runs`): one slot (R = 1); the pair's test is the Wilcoxon
      test (p_value = wilcoxon_p), the interval the percentile bootstrap 95% CI; no se, df or
      variance components;
    - two losses over replicate slots (`microseg.stats.differences`): the crossed-effects t test,
      its t interval at the Holm-matched level and the fitted variance components.
    """

    metric: str  # the per-patient key: "dsc", "hd95_mm", "hard_dsc"
    a: str
    b: str
    patients: int  # P: the patients paired
    replicates: int  # R: the replicate slots paired on each patient (two runs: 1)
    mean: float  # mean of the differences D[r, p]
    median: float  # median over the patients of their difference (mean over the slots)
    p_value: float  # two-sided p of the pair's test of mean = 0
    wilcoxon_statistic: float  # of the per-patient differences (means over the slots)
    wilcoxon_p: float
    ci: tuple[float, float] = (math.nan, math.nan)  # an interval of `mean` at `ci_level`
    ci_level: float = math.nan
    p_holm: float = math.nan  # p_value Holm-adjusted over the family the pair was tested in
    wilcoxon_p_holm: float = math.nan  # wilcoxon_p Holm-adjusted over the same family
    family: str = ""  # the family's name where a report has several (an experiment's primary, secondary)
    se: float = math.nan  # standard error of `mean` (the crossed-effects fit's)
    df: float = math.nan  # its degrees of freedom (Satterthwaite's)
    s2_pat: float = math.nan  # the fit's variance components: patient, replicate, residual
    s2_rep: float = math.nan
    s2_res: float = math.nan

    @property
    def significant(self) -> bool:
        """The adjusted p is below ALPHA and the interval excludes 0 (for the crossed-effects test each
        implies the other); otherwise the difference is within noise (an undefined p or interval too)."""
        lo, hi = self.ci
        return self.p_holm < ALPHA and not (math.isnan(lo) or lo <= 0 <= hi)

    @property
    def t(self) -> float:
        """mean / se (NaN without a positive se)."""
        return self.mean / self.se if self.se > 0 else math.nan

    def reversed(self) -> PairedDifference:
        """b - a: the same pair, its differences negated (the tests' p unchanged)."""
        lo, hi = self.ci
        return replace(self, a=self.b, b=self.a, mean=-self.mean, median=-self.median, ci=(-hi, -lo))


def summarize_differences(metric: str, a: str, b: str, d: np.ndarray) -> PairedDifference:
    """Mean, median, bootstrap CI and Wilcoxon test of the paired differences `d` = a - b over patients
    (one slot each; a family of one test, so p_holm = p_value)."""
    stat, p = wilcoxon_test(d)
    mean, median = (float(f(d)) if d.size else math.nan for f in (np.mean, np.median))
    return PairedDifference(metric, a, b, int(d.size), 1, mean, median, p, stat, p, bootstrap_ci(d), CI_LEVEL, p, p)
