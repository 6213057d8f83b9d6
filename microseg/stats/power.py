"""What a design of R replicate slots x P patients can resolve: power of the report's test, by simulation.

The variance components of the paired differences D = delta + u_p + v_r + e_rp
(`microseg.stats.differences`) of the primary metric, pooled over its pairs of losses (the
mean of each pair's REML estimates s2_pat, s2_rep, s2_res: one loss's failures or strengths
shared by two pairs count in both), define the null and the alternatives. For a design (R, P)
the test sees D only through its mean and its three sums of squares, which under the model are
independent (Cochran's theorem): Dbar ~ N(delta, (L_rep + L_pat - L_res) / (R P)) and SS_i ~ L_i
chi^2(df_i) with L_rep = s2_res + P s2_rep, L_pat = s2_res + R s2_pat, L_res = s2_res. So each of
`SIMULATIONS` simulated experiments draws those four numbers (`numpy.random.default_rng(POWER_SEED)`:
the standard normals of Dbar, then the chi-square draws of SS_rep, SS_pat and SS_res; the same
numbers every time), fits them with the report's own REML fit and Satterthwaite t test, and
rejects at the family's alpha: alpha / m, the Bonferroni level of Holm's first step over the m
pairs of losses (a pair resolved at that level is resolved by Holm whatever the other pairs do).
The power at delta is the share of rejections; the same draws serve every delta (common random
numbers: no fresh noise between deltas), and the smallest difference detectable with 80% power is
found by bisection on them. With one replicate (R = 1) a seed's effect cannot be told from the
loss's, so `seeds_needed` starts at 2 replicate slots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from microseg.stats.differences import reml_fit
from microseg.stats.paired import PairedDifference

POWER = 0.8
SIMULATIONS = 4000
POWER_SEED = 0
MAX_SEEDS = 200
"""The most seeds `seeds_needed` considers."""


@dataclass(frozen=True)
class Components:
    """Variance components of the paired differences of one metric (pooled over its pairs)."""

    s2_pat: float
    s2_rep: float
    s2_res: float
    pairs: int = 1

    def sds(self) -> tuple[float, float, float]:
        return math.sqrt(self.s2_pat), math.sqrt(self.s2_rep), math.sqrt(self.s2_res)


def pooled_components(differences: Sequence[PairedDifference]) -> Components | None:
    """The mean of the pairs' fitted components (None without a pair whose components are known, or
    when they are all 0: differences without variance, nothing to simulate)."""
    known = [d for d in differences if not any(math.isnan(v) for v in (d.s2_pat, d.s2_rep, d.s2_res))]
    if not known or all(d.s2_pat == d.s2_rep == d.s2_res == 0 for d in known):
        return None
    s2_pat, s2_rep, s2_res = (
        float(np.mean([getattr(d, name) for d in known])) for name in ("s2_pat", "s2_rep", "s2_res")
    )
    return Components(s2_pat, s2_rep, s2_res, len(known))


@dataclass
class SimulatedTest:
    """The report's test on `SIMULATIONS` simulated null experiments of one design: the centred
    mean difference z and the half-width q of the rejection region (reject when |z + delta| > q)."""

    z: np.ndarray
    q: np.ndarray

    def power(self, delta: float) -> float:
        return float(np.mean(np.abs(self.z + delta) > self.q))

    def detectable(self, power: float = POWER) -> float:
        """The smallest delta >= 0 with at least `power` (bisection on the common draws; inf when none)."""
        high = float(np.nanmax(np.where(np.isfinite(self.q), self.q, np.nan), initial=0.0)) + 4 * float(self.z.std())
        if not high > 0 or self.power(high) < power:
            return math.inf
        low = 0.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (low, middle) if self.power(middle) >= power else (middle, high)
        return high


def simulate_test(
    components: Components, n_reps: int, n_pat: int, alpha: float, n: int = SIMULATIONS, seed: int = POWER_SEED
) -> SimulatedTest:
    """`SimulatedTest` of the design n_reps x n_pat at two-sided level `alpha` (see the module docstring)."""
    from scipy.stats import t

    c = components
    l_rep, l_pat, l_res = c.s2_res + n_pat * c.s2_rep, c.s2_res + n_reps * c.s2_pat, c.s2_res
    dfs = (n_reps - 1, n_pat - 1, (n_reps - 1) * (n_pat - 1))
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n) * math.sqrt(max(0.0, (l_rep + l_pat - l_res) / (n_reps * n_pat)))
    ss = tuple(
        lam * rng.chisquare(df, n) if df > 0 else np.zeros(n)
        for lam, df in zip((l_rep, l_pat, l_res), dfs, strict=True)
    )
    fit = reml_fit(np.zeros(n), ss, n_reps, n_pat)
    with np.errstate(invalid="ignore"):
        q = t.ppf(1 - alpha / 2, fit.df) * np.sqrt(fit.var)
    return SimulatedTest(z, np.where(np.isnan(q), np.inf, q))


def family_alpha(n_losses: int, alpha: float) -> tuple[float, int]:
    """(alpha / m, m) for the m = L (L - 1) / 2 pairs of L losses."""
    m = max(1, n_losses * (n_losses - 1) // 2)
    return alpha / m, m


def seeds_needed(
    components: Components, delta: float, folds: int, n_pat: int, alpha: float, power: float = POWER
) -> int | None:
    """The fewest seeds (each `folds` replicate slots, 1 without folds) whose design reaches `power`
    at difference `delta`; None when even MAX_SEEDS do not (the patients' variance bounds it).
    A bisection over the number of seeds (the power grows with it)."""
    per_seed = max(1, folds)

    def enough(seeds: int) -> bool:
        return simulate_test(components, seeds * per_seed, n_pat, alpha).power(delta) >= power

    low, high = (1 if per_seed == 1 else 0), MAX_SEEDS  # enough(low) is taken as False: R >= 2
    if not enough(high):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high
