"""Loss a - loss b on one metric: one seed-aware analysis gives the difference, its p and its CI.

For a pair of losses the paired differences D[r, p] = x[a, r, p] - x[b, r, p] over the complete
grid of R replicate slots x P patients (slot r is the same seed, and fold, for both losses, so
the runs that share a seed are blocks) are modelled as

    D[r, p] = delta + u_p + v_r + e_rp,   u_p ~ N(0, s2_pat), v_r ~ N(0, s2_rep), e_rp ~ N(0, s2_res)

a linear mixed model with crossed random intercepts for patient and replicate (all independent).
delta is the loss effect: how much better a is than b on an average patient and seed. Its
estimate is delta_hat = mean D (the GLS estimate in this balanced design) with

    Var(delta_hat) = s2_pat / P + s2_rep / R + s2_res / (R P) = (L_rep + L_pat - L_res) / (R P),

L_rep = s2_res + P s2_rep, L_pat = s2_res + R s2_pat and L_res = s2_res the expected mean squares
of the two-way ANOVA of D (replicate x patient, one value per cell): SS_rep = P sum_r (Dbar_r. -
Dbar)^2 on R - 1 df, SS_pat = R sum_p (Dbar_.p - Dbar)^2 on P - 1 df, SS_res the rest on (R - 1)
(P - 1) df. The L are fitted by REML, which in this balanced design has a closed form: when both
components come out >= 0, L_i = MS_i (the ANOVA estimates); otherwise a component is set to 0 and
its sum of squares pooled into the residual (MS_res' = (SS_rep + SS_res) / (df_rep + df_res),
say), the candidate with the largest restricted likelihood, -1/2 sum_i (df_i log L_i + SS_i /
L_i), among those with non-negative components (an exact maximisation: the three sums of squares
are independent L_i chi^2(df_i) variables and the constraints L_rep, L_pat >= L_res are linear in
1 / L). So s2 = 0 replaces a negative estimate, and the test stays the REML fit's (as statsmodels'
MixedLM finds it). The t test and the t interval use SE = sqrt(Var_hat) with Satterthwaite's df,
(sum_i c_i L_i)^2 / sum_i (c_i L_i)^2 / df_i for Var_hat = sum_i c_i L_i / (R P). With s2_rep = 0
this is the paired t test of the per-patient means (P - 1 df); with one replicate (R = 1) the
paired t test over patients (the seed cannot be told from the loss then); with one patient the
t test over replicates. Assumptions: normal effects, additive on the metric's scale, the same
variances for every pair (the fit is per pair, so not even that), patients and seeds exchangeable.

The family: the pairs of losses on the primary metric; Holm's adjustment (Holm 1979, "A simple
sequentially rejective multiple test procedure") over it, and the secondary metric's pairs over
their own family. The CI of test j is at level 1 - alpha / c_j with c_j = p_holm_j / p_j, Holm's
multiplier of that test (1 - alpha / m for the smallest p; 1 - alpha p_j when p_holm is 1), so the
interval excludes 0 exactly when p_holm_j < alpha: the CIs and the adjusted tests never disagree
(each is a per-test interval at its own adjusted level, not a simultaneous band). The paired
Wilcoxon signed-rank test of the per-patient means (seeds averaged, their variation ignored),
Holm-adjusted over the same family, stays as a secondary check. Each pair's result is a
`microseg.stats.paired.PairedDifference`, the type of two runs' differences too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from microseg.stats.paired import ALPHA, PairedDifference, holm, wilcoxon_test
from microseg.stats.replicates import Scores, drop_incomplete


@dataclass
class CrossedFit:
    """The REML fit of D = delta + u_p + v_r + e_rp (arrays over any leading axes of D)."""

    delta: np.ndarray
    var: np.ndarray  # Var(delta_hat), fitted
    df: np.ndarray  # Satterthwaite's
    s2_pat: np.ndarray
    s2_rep: np.ndarray
    s2_res: np.ndarray

    def p_value(self) -> np.ndarray:
        """Two-sided t test of delta = 0 (p = 1 when D is constant 0, 0 when constant otherwise; NaN
        with one replicate and one patient)."""
        from scipy.stats import t

        se = np.sqrt(self.var)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = 2 * t.sf(np.abs(self.delta) / se, self.df)
        return np.where(se > 0, p, np.where(np.isnan(se), math.nan, np.where(self.delta == 0, 1.0, 0.0)))


def sums_of_squares(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(SS_rep, SS_pat, SS_res) of the two-way ANOVA of d[..., R, P] (no replication within a cell)."""
    n_rep, n_pat = d.shape[-2:]
    grand = d.mean(axis=(-2, -1), keepdims=True)
    rep = d.mean(axis=-1, keepdims=True)
    pat = d.mean(axis=-2, keepdims=True)
    ss_rep = n_pat * ((rep - grand) ** 2).sum(axis=(-2, -1))
    ss_pat = n_rep * ((pat - grand) ** 2).sum(axis=(-2, -1))
    ss_res = ((d - rep - pat + grand) ** 2).sum(axis=(-2, -1))
    return ss_rep, ss_pat, ss_res


def reml_fit(delta: np.ndarray, ss: Sequence[np.ndarray], n_rep: int, n_pat: int) -> CrossedFit:
    """`CrossedFit` from the mean and the three sums of squares of D (see the module docstring)."""
    delta = np.asarray(delta, dtype=np.float64)
    ss_rep, ss_pat, ss_res = (np.broadcast_to(np.asarray(s, dtype=np.float64), delta.shape) for s in ss)
    df_rep, df_pat, df_res, n = n_rep - 1, n_pat - 1, (n_rep - 1) * (n_pat - 1), n_rep * n_pat
    zero = np.zeros(delta.shape)
    if df_res == 0:  # one replicate or one patient: the other factor's t test (none with one of each)
        ss_one, df_one = (ss_pat, df_pat) if n_rep == 1 else (ss_rep, df_rep)
        ms = ss_one / df_one if df_one else np.full(delta.shape, math.nan)
        s2_pat, s2_rep = (ms, zero) if n_rep == 1 else (zero, ms)
        return CrossedFit(delta, ms / n, np.full(delta.shape, df_one or math.nan), s2_pat, s2_rep, zero * math.nan)
    ms_rep, ms_pat, ms_res = ss_rep / df_rep, ss_pat / df_pat, ss_res / df_res
    pooled_rep = (ss_rep + ss_res) / (df_rep + df_res)  # the residual with s2_rep = 0
    pooled_pat = (ss_pat + ss_res) / (df_pat + df_res)  # ... with s2_pat = 0
    pooled_all = (ss_rep + ss_pat + ss_res) / (n - 1)  # ... with both 0
    with np.errstate(divide="ignore", invalid="ignore"):
        full_df = (ms_rep + ms_pat - ms_res) ** 2 / (ms_rep**2 / df_rep + ms_pat**2 / df_pat + ms_res**2 / df_res)
    # per candidate: L_rep, L_pat, L_res, Var_hat * n, Satterthwaite df, allowed (components >= 0)
    candidates = np.stack(
        [
            (ms_rep, ms_pat, ms_res, ms_rep + ms_pat - ms_res, full_df, (ms_rep >= ms_res) & (ms_pat >= ms_res)),
            (pooled_rep, ms_pat, pooled_rep, ms_pat, zero + df_pat, ms_pat >= pooled_rep),
            (ms_rep, pooled_pat, pooled_pat, ms_rep, zero + df_rep, ms_rep >= pooled_pat),
            (pooled_all, pooled_all, pooled_all, pooled_all, zero + n - 1, zero == 0),
        ]
    )  # [candidate, field, ...]
    lam = np.maximum(candidates[:, :3], np.finfo(np.float64).tiny)
    dfs = np.array([df_rep, df_pat, df_res], dtype=np.float64).reshape((1, 3) + (1,) * delta.ndim)
    ss_all = np.stack([ss_rep, ss_pat, ss_res])[None]
    likelihood = np.where(candidates[:, 5] > 0, -(dfs * np.log(lam) + ss_all / lam).sum(axis=1), -np.inf)
    best = np.argmax(likelihood, axis=0)[None, None]
    l_rep, l_pat, l_res, var_n, df = np.take_along_axis(candidates, best, axis=0)[0][:5]
    return CrossedFit(delta, var_n / n, df, (l_pat - l_res) / n_rep, (l_rep - l_res) / n_pat, l_res)


def crossed_fit(d: np.ndarray) -> CrossedFit:
    """`reml_fit` of the differences d[..., R, P] (a complete grid)."""
    d = np.asarray(d, dtype=np.float64)
    return reml_fit(d.mean(axis=(-2, -1)), sums_of_squares(d), *d.shape[-2:])


def holm_levels(p_values: Sequence[float], p_holm: Sequence[float] | np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The CI level matching each Holm-adjusted test: 1 - alpha p_j / p_holm_j (1 - alpha / m when
    p_holm_j is 0; NaN where p is undefined), so the CI excludes 0 exactly when p_holm_j < alpha."""
    p, adjusted = np.asarray(p_values, dtype=np.float64), np.asarray(p_holm, dtype=np.float64)
    m = int(np.sum(~np.isnan(p)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(adjusted > 0, 1 - alpha * p / adjusted, 1 - alpha / max(m, 1))


def pair_grid(scores: Scores, a: int, b: int, drop: bool) -> np.ndarray:
    """D[r, p] = x[a, r, p] - x[b, r, p]; with `drop` over the pair's own complete grid
    (`drop_incomplete` of the two losses: slots with no score for either, then patients with a NaN)."""
    if not drop:
        return scores.values[a] - scores.values[b]
    pair = Scores([scores.losses[a], scores.losses[b]], scores.replicates, scores.patients, scores.values[[a, b]], True)
    kept = drop_incomplete(pair).values
    return kept[0] - kept[1]


def pair_difference(metric: str, family: str, scores: Scores, a: int, b: int, drop: bool) -> PairedDifference:
    """One pair's fit, unadjusted test and Wilcoxon check of the per-patient means (NaN throughout for
    an empty grid)."""
    d = pair_grid(scores, a, b, drop)
    n_rep, n_pat = d.shape
    names = (metric, scores.losses[a], scores.losses[b])
    if not d.size:
        nan = math.nan
        return PairedDifference(*names, 0, 0, nan, nan, nan, nan, nan, family=family)
    fit = crossed_fit(d)
    per_patient = d.mean(axis=0)
    stat, wp = wilcoxon_test(per_patient)
    mean, se, df, s2_pat, s2_rep, s2_res = (
        float(v) for v in (fit.delta, np.sqrt(fit.var), fit.df, fit.s2_pat, fit.s2_rep, fit.s2_res)
    )
    return PairedDifference(
        *names,
        patients=n_pat,
        replicates=n_rep,
        mean=mean,
        median=float(np.median(per_patient)),
        p_value=float(fit.p_value()),
        wilcoxon_statistic=stat,
        wilcoxon_p=wp,
        family=family,
        se=se,
        df=df,
        s2_pat=s2_pat,
        s2_rep=s2_rep,
        s2_res=s2_res,
    )


def loss_differences(all_scores: Mapping[str, Scores], primary: str, drop: bool = False) -> list[PairedDifference]:
    """Every pair of losses (a before b) x every metric of `all_scores` ({metric key: Scores}, complete
    grids unless `drop`), the primary metric's family first; Holm within each family, CIs at the
    matching levels."""
    found = []
    for key in sorted(all_scores, key=lambda k: k != primary):
        scores, family = all_scores[key], "primary" if key == primary else "secondary"
        pairs = [
            pair_difference(key, family, scores, a, b, drop)
            for a, b in itertools.combinations(range(len(scores.losses)), 2)
        ]
        adjusted = holm([d.p_value for d in pairs])
        levels = holm_levels([d.p_value for d in pairs], adjusted)
        w_adjusted = holm([d.wilcoxon_p for d in pairs])
        for d, p_holm, level, w_holm in zip(pairs, adjusted, levels, w_adjusted, strict=True):
            d.p_holm, d.ci_level, d.wilcoxon_p_holm = float(p_holm), float(level), float(w_holm)
            if not math.isnan(level):
                d.ci = t_interval(d.mean, d.se, d.df, float(level))
        found += pairs
    return found


def t_interval(mean: float, se: float, df: float, level: float) -> tuple[float, float]:
    """mean +- t_{(1 + level) / 2, df} se (the point itself when se is 0)."""
    from scipy.stats import t

    half = float(t.ppf((1 + level) / 2, df)) * se if se > 0 else 0.0
    return mean - half, mean + half
