"""Statistics of one metric over losses x replicate runs x patients: what an experiment's report states.

An experiment trains every loss l several times -- its replicates r: the seeds, and with
cross-validation each seed's fold models -- and scores every run on the same patients p.
`Scores.values[l, r, p]` holds one per-patient metric (NaN where a run is missing or did not
score the patient; replicate r is the same (seed, fold) for every loss). From it:
- per-patient means over replicates m[l, p] = mean_r x[l, r, p]: the patient stays the unit;
- a loss's mean M[l] = mean_p m[l, p];
- run means u[l, r] = mean_p x[l, r, p] and their seed-to-seed sd over r (ddof 1);
- aggregate-then-rank: the ranks of M, 1 the best, ties sharing the smallest rank (challengeR:
  Wiesenfarth et al., "Methods and open-source toolkit for analyzing and visualizing challenge
  results", Scientific Reports 2021);
- a two-level bootstrap: each of B resamples draws the P patients and the R replicate slots with
  replacement -- the same draws for every loss, since the patients are paired and loss a's and
  loss b's runs of one seed share their initialisation and data order -- and recomputes M from
  the resampled x as above. Its ranks give how often each loss takes each rank (the blob plot);
  its differences M_a - M_b the percentile 95% CI of a difference over patients and seeds;
- paired Wilcoxon signed-rank tests (`scipy.stats.wilcoxon`) of m[a, p] - m[b, p] over the
  patients, for every pair of losses and every metric, Holm-adjusted over that whole family
  (`microseg.significance.holm`);
- the share of the variance of the run means that the loss explains, a one-way sum-of-squares
  decomposition of the N runs u[l, r] into k loss groups (`variance_share`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from microseg.significance import ALPHA, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL, holm, wilcoxon_test


@dataclass
class Scores:
    """One metric of every (loss, replicate, patient); NaN where absent."""

    losses: list[str]
    replicates: list[str]
    patients: list[str]
    values: np.ndarray  # [loss, replicate, patient]
    higher_is_better: bool

    def patient_means(self) -> np.ndarray:
        """m[l, p]: each patient's mean over the loss's replicates (NaN when none scored it)."""
        return _nanmean(self.values, axis=1)

    def loss_means(self) -> np.ndarray:
        """M[l] = mean over patients of m[l, p]."""
        return _nanmean(self.patient_means(), axis=1)

    def run_means(self) -> np.ndarray:
        """u[l, r] = mean over patients of x[l, r, p] (NaN for a missing run)."""
        return _nanmean(self.values, axis=2)

    def seed_sd(self) -> np.ndarray:
        """The sd (ddof 1) of each loss's run means over its replicates; NaN with fewer than 2."""
        return np.array(
            [np.std(u[~np.isnan(u)], ddof=1) if np.sum(~np.isnan(u)) > 1 else math.nan for u in self.run_means()]
        )

    def runs(self) -> np.ndarray:
        """How many replicates each loss has (runs with at least one scored patient)."""
        return np.sum(~np.isnan(self.run_means()), axis=1)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """numpy's nanmean without its warning for an all-NaN slice (which gives NaN)."""
    valid = ~np.isnan(x)
    count = valid.sum(axis=axis)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), math.nan)


def build_scores(
    per_run: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]],
    key: str,
    higher_is_better: bool,
    losses: Sequence[str],
    replicates: Sequence[str],
    patients: Sequence[str],
) -> Scores:
    """`Scores` of metric `key` from {(loss, replicate): {patient: {metric: value}}}, in the given orders."""
    values = np.full((len(losses), len(replicates), len(patients)), math.nan)
    for (loss, replicate), rows in per_run.items():
        i, r = losses.index(loss), replicates.index(replicate)
        for p, patient in enumerate(patients):
            values[i, r, p] = rows.get(patient, {}).get(key, math.nan)
    return Scores(list(losses), list(replicates), list(patients), values, higher_is_better)


def ranks(means: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Ranks of the last axis, 1 the best; ties share the smallest rank; NaN ranks last."""
    from scipy.stats import rankdata

    key = np.where(np.isnan(means), math.inf, -means if higher_is_better else means)
    return rankdata(key, method="min", axis=-1).astype(int)


def bootstrap_means(scores: Scores, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """M[l] of B resamples of the patients and the replicate slots (with replacement), [B, loss].

    One generator draws the replicate indices [B, R] then the patient indices [B, P]; a resample's
    M is computed from the multiplicities of the drawn indices (a patient drawn twice counts twice).
    """
    _, n_reps, n_patients = scores.values.shape
    rng = np.random.default_rng(seed)
    reps = rng.integers(0, n_reps, (n_resamples, n_reps))
    patients = rng.integers(0, n_patients, (n_resamples, n_patients))
    rep_count = np.stack([np.bincount(row, minlength=n_reps) for row in reps]).astype(np.float64)
    patient_count = np.stack([np.bincount(row, minlength=n_patients) for row in patients]).astype(np.float64)
    valid = ~np.isnan(scores.values)
    x = np.where(valid, scores.values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.einsum("br,lrp->blp", rep_count, x) / np.einsum("br,lrp->blp", rep_count, valid.astype(np.float64))
        m_valid = ~np.isnan(m)
        return np.einsum("bp,blp->bl", patient_count, np.where(m_valid, m, 0.0)) / np.einsum(
            "bp,blp->bl", patient_count, m_valid.astype(np.float64)
        )


def rank_frequencies(boot_means: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """[loss, rank - 1]: the share of resamples in which each loss takes each rank."""
    boot_ranks = ranks(boot_means, higher_is_better)
    n_losses = boot_means.shape[1]
    return np.stack([(boot_ranks == r).mean(axis=0) for r in range(1, n_losses + 1)], axis=1)


@dataclass
class LossDifference:
    """Loss a - loss b on one metric: the difference of the means, its tests and its seed noise."""

    metric: str
    a: str
    b: str
    n: int  # patients with both per-patient means
    mean: float  # M_a - M_b
    ci95: tuple[float, float]  # percentile bootstrap over patients and replicates
    statistic: float
    p_value: float
    p_holm: float
    seed_noise: float  # max of the two losses' seed-to-seed sd of run means (NaN with one run each)

    @property
    def significant(self) -> bool:
        """The adjusted p is below ALPHA."""
        return self.p_holm < ALPHA

    @property
    def within_seed_noise(self) -> bool:
        """|M_a - M_b| is smaller than what another seed moves either loss's mean by (one seed sd)."""
        return abs(self.mean) < self.seed_noise


def loss_differences(all_scores: Mapping[str, Scores], boot: Mapping[str, np.ndarray]) -> list[LossDifference]:
    """Every pair of losses (in order, a before b) x every metric of `all_scores` ({metric: Scores},
    `boot` its `bootstrap_means`): the paired Wilcoxon test of the per-patient means, Holm-adjusted
    over the whole family (pairs x metrics; tests with no defined p left out), and the bootstrap CI."""
    lo_q, hi_q = 50 * (1 - CI_LEVEL), 50 * (1 + CI_LEVEL)
    found = []
    for metric, scores in all_scores.items():
        m, means, sd = scores.patient_means(), scores.loss_means(), scores.seed_sd()
        for a, b in itertools.combinations(range(len(scores.losses)), 2):
            both = ~(np.isnan(m[a]) | np.isnan(m[b]))
            stat, p = wilcoxon_test(m[a][both] - m[b][both])
            diffs = boot[metric][:, a] - boot[metric][:, b]
            diffs = diffs[~np.isnan(diffs)]
            lo, hi = np.percentile(diffs, [lo_q, hi_q]) if diffs.size else (math.nan, math.nan)
            noise = float(np.nanmax(sd[[a, b]])) if not np.isnan(sd[[a, b]]).all() else math.nan
            found.append(
                LossDifference(
                    metric,
                    scores.losses[a],
                    scores.losses[b],
                    int(both.sum()),
                    float(means[a] - means[b]),
                    (float(lo), float(hi)),
                    stat,
                    p,
                    math.nan,
                    noise,
                )
            )
    for difference, adjusted in zip(found, holm([d.p_value for d in found])):
        difference.p_holm = float(adjusted)
    return found


@dataclass
class VarianceShare:
    """One-way decomposition of the run means by loss.

    With n_l runs of loss l, their mean ubar_l and the grand mean ubar of all N runs:
    SS_loss = sum_l n_l (ubar_l - ubar)^2, SS_seed = sum_l sum_r (u_lr - ubar_l)^2 and
    SS_total = sum_lr (u_lr - ubar)^2 = SS_loss + SS_seed; the loss's share is
    eta^2 = SS_loss / SS_total. With k losses and no loss effect at all (runs independent and
    normal) eta^2 is still (k - 1) / (N - 1) on average (its Beta((k-1)/2, (N-k)/2) mean): a share
    near that says nothing.
    """

    ss_loss: float
    ss_seed: float
    ss_total: float
    n_losses: int
    n_runs: int

    @property
    def loss_share(self) -> float:
        return self.ss_loss / self.ss_total if self.ss_total > 0 else math.nan

    @property
    def chance_share(self) -> float:
        """E[eta^2] with no loss effect: (k - 1) / (N - 1)."""
        return (self.n_losses - 1) / (self.n_runs - 1) if self.n_runs > 1 else math.nan


def variance_share(run_means: np.ndarray) -> VarianceShare:
    """`VarianceShare` of the run means u[l, r] (NaN = no such run)."""
    groups = [row[~np.isnan(row)] for row in run_means]
    groups = [g for g in groups if g.size]
    every = np.concatenate(groups) if groups else np.empty(0)
    grand = every.mean() if every.size else math.nan
    ss_loss = float(sum(g.size * (g.mean() - grand) ** 2 for g in groups))
    ss_seed = float(sum(((g - g.mean()) ** 2).sum() for g in groups))
    return VarianceShare(ss_loss, ss_seed, float(((every - grand) ** 2).sum()), len(groups), int(every.size))
