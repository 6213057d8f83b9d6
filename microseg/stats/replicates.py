"""One metric over losses x replicate slots x patients: the completed grid, its means and its variance table.

An experiment trains every loss l several times -- its replicate slots r: the seeds, and with
cross-validation each seed's fold models, slot "seed s, fold f" being the same for every loss --
and scores every run on the same test patients p. `Scores.values[l, r, p]` holds one per-patient
metric; NaN where there is no score: a patient the run left empty (under the reference protocol
an empty prediction has no DSC or HD95), or a whole slot when the cell failed, is not trained or
not evaluated yet.

Missing is worst (challengeR's default: Wiesenfarth et al., "Methods and open-source toolkit for
analyzing and visualizing challenge results", Scientific Reports 2021): `fill_worst` gives every
NaN the worst value of its metric (DSC 0; HD95 a stated cap, the largest image diagonal in mm),
so a loss that fails is not flattered by its surviving runs and the grid is complete (a balanced
design for every statistic). `drop_incomplete` is the alternative (`compare --missing drop`):
drop the replicate slots (with folds: whole seeds, so seeds and folds stay crossed) that hold no
score at all, then the patients with any NaN left.

On a complete grid x[l, r, p]:
- per-patient means over replicates m[l, p] = mean_r x[l, r, p] (the patient stays the unit);
- a loss's mean M[l] = mean_p m[l, p] = mean_rp x[l, r, p];
- run means u[l, r] = mean_p x[l, r, p] and their sd over r (ddof 1): how far one run moves;
- the variance of the run means (`variance_table`): an additive two- or three-way ANOVA
  u[l, s, f] = mu + loss_l + seed_s (+ fold_f) + residual, the residual being every interaction.
  Runs that share a seed share their initialisation and data order, so the seed is a block
  factor. In the balanced grid SS_loss = S F sum_l (ubar_l.. - ubar)^2, SS_seed = L F sum_s
  (ubar_.s. - ubar)^2, SS_fold = L S sum_f (ubar_..f - ubar)^2, SS_res = SS_total - the others,
  with df L - 1, S - 1, F - 1 and the rest; each factor's share is SS_factor / SS_total and its
  F test F = MS_factor / MS_res on (df_factor, df_res) (normal, independent residuals of equal
  variance). The seed and fold sds are the random-effect sds from the expected mean squares,
  sigma_seed^2 = max(0, (MS_seed - MS_res) / (L F)) and sigma_fold^2 = max(0, (MS_fold - MS_res)
  / (L S)) (method of moments, a negative estimate set to 0), reported apart.
Out-of-fold tables reuse the NaN-aware means (NaN left out) of `Scores`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    """A per-patient metric the experiment report ranks and tests."""

    key: str
    title: str
    higher_is_better: bool
    digits: int
    unit: str

    @property
    def short(self) -> str:
        """The title without its unit: "HD95"."""
        return self.title.split(" ")[0]


METRICS = (Metric("dsc", "DSC", True, 4, ""), Metric("hd95_mm", "HD95 (mm)", False, 3, " mm"))
"""The metrics of an experiment report; the plan's `primary` is one of their keys."""


def metric(key: str) -> Metric:
    return next(m for m in METRICS if m.key == key)


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


def fill_worst(scores: Scores, worst: float) -> Scores:
    """The grid completed by missing-is-worst: every NaN becomes `worst`."""
    values = np.where(np.isnan(scores.values), worst, scores.values)
    return Scores(scores.losses, scores.replicates, scores.patients, values, scores.higher_is_better)


def drop_incomplete(scores: Scores, blocks: Sequence[Sequence[int]] | None = None) -> Scores:
    """The grid made complete by dropping: first every block of replicate slots (default: each slot
    alone; with folds a seed's slots) in which some loss has a slot with no score at all, then
    every patient with a NaN left in the kept slots. May leave no slot or no patient."""
    x = scores.values
    blocks = [[r] for r in range(x.shape[1])] if blocks is None else blocks
    empty_slot = np.isnan(x).all(axis=2).any(axis=0)  # [replicate]: some loss has no score there
    kept = [r for block in blocks if not empty_slot[list(block)].any() for r in block]
    patients = [p for p in range(x.shape[2]) if not np.isnan(x[:, kept, p]).any()] if kept else []
    return Scores(
        scores.losses,
        [scores.replicates[r] for r in kept],
        [scores.patients[p] for p in patients],
        x[:, kept][:, :, patients],
        scores.higher_is_better,
    )


@dataclass
class VarianceSource:
    """One row of the ANOVA of the run means: a factor, the residual or the total."""

    source: str  # loss, seed, fold, residual, total
    df: int
    ss: float
    share: float  # ss / SS_total
    f: float = math.nan  # MS / MS_res (factors)
    p: float = math.nan  # P(F(df, df_res) > f)
    sd: float = math.nan  # seed and fold: the random-effect sd; residual: sqrt(MS_res)

    @property
    def ms(self) -> float:
        return self.ss / self.df if self.df > 0 else math.nan


def variance_table(run_means: np.ndarray) -> list[VarianceSource]:
    """The additive ANOVA of the complete run means u[l, s, f] (loss, seed, fold; F = 1 without
    folds, when the fold is no factor): rows loss, seed, (fold,) residual, total."""
    from scipy.stats import f as f_distribution

    u = np.asarray(run_means, dtype=np.float64)
    n_loss, n_seed, n_fold = u.shape
    grand = u.mean()
    total = float(((u - grand) ** 2).sum())
    factors = [("loss", (1, 2), n_seed * n_fold), ("seed", (0, 2), n_loss * n_fold)]
    if n_fold > 1:
        factors.append(("fold", (0, 1), n_loss * n_seed))
    rows = []
    for name, other_axes, weight in factors:
        means = u.mean(axis=other_axes)
        rows.append(VarianceSource(name, means.size - 1, float(weight * ((means - grand) ** 2).sum()), math.nan))
    residual = VarianceSource(
        "residual", u.size - 1 - sum(r.df for r in rows), max(0.0, total - sum(r.ss for r in rows)), 0
    )
    ms_res = residual.ms
    for row, (_, _, weight) in zip(rows, factors, strict=True):
        if residual.df > 0 and row.df > 0 and ms_res > 0:
            row.f = row.ms / ms_res
            row.p = float(f_distribution.sf(row.f, row.df, residual.df))
        if row.source != "loss" and residual.df > 0 and row.df > 0:
            row.sd = math.sqrt(max(0.0, (row.ms - ms_res) / weight))
    residual.sd = math.sqrt(ms_res) if residual.df > 0 else math.nan
    rows += [residual, VarianceSource("total", u.size - 1, total, 1.0 if total > 0 else math.nan)]
    for row in rows[:-1]:
        row.share = row.ss / total if total > 0 else math.nan
    return rows
