"""challengeR's two rankings of the losses and their bootstrap stability, on a complete grid x[l, r, p].

Wiesenfarth et al., "Methods and open-source toolkit for analyzing and visualizing challenge
results" (Scientific Reports 2021):
- aggregate-then-rank: rank the losses by their mean M[l] = mean_rp x[l, r, p];
- rank-then-aggregate: rank the losses on every patient p by the per-patient mean over
  replicates m[l, p] = mean_r x[l, r, p], average each loss's ranks over the patients, and rank
  those mean ranks (lower is better).
Ranks are 1 for the best, ties sharing the smallest rank (challengeR's ties.method "min").

Stability: B resamples, each drawing the R replicate slots and then the P patients with
replacement (one generator: the replicate indices [B, R], then the patient indices [B, P]) --
the same draws for every loss, since the patients are paired and the runs of one seed share
their initialisation and data order -- recompute each ranking from the resampled grid (a slot
or patient drawn twice counts twice). Per loss, the share of resamples in which it takes each
rank (the blob plot), and per resample Kendall's tau-b between its ranking and the full-data
ranking (`scipy.stats.kendalltau`'s default; NaN when either ranking ties every loss), summarised
by its median and interquartile range: 1 when every resample reproduces the ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from microseg.stats.paired import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from microseg.stats.replicates import Scores

SCHEMES = ("aggregate-then-rank", "rank-then-aggregate")


def ranks(scores: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Ranks along the last axis, 1 the best; ties share the smallest rank; NaN ranks last."""
    from scipy.stats import rankdata

    key = np.where(np.isnan(scores), math.inf, -scores if higher_is_better else scores)
    return rankdata(key, method="min", axis=-1).astype(int)


def resample_counts(
    n_reps: int, n_patients: int, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """How often each replicate slot [B, R] and each patient [B, P] is drawn in each resample."""
    rng = np.random.default_rng(seed)
    reps = rng.integers(0, n_reps, (n_resamples, n_reps))
    patients = rng.integers(0, n_patients, (n_resamples, n_patients))

    def counts(draws: np.ndarray, n: int) -> np.ndarray:
        rows = np.repeat(np.arange(draws.shape[0]), draws.shape[1])
        found = np.zeros((draws.shape[0], n))
        np.add.at(found, (rows, draws.ravel()), 1.0)
        return found

    return counts(reps, n_reps), counts(patients, n_patients)


def mean_ranks(patient_means: np.ndarray, higher_is_better: bool, weights: np.ndarray | None = None) -> np.ndarray:
    """Rank-then-aggregate's score: each loss's rank per patient (over the loss axis -2 of
    [..., loss, patient]) averaged over the patients (weighted by how often each was drawn)."""
    per_patient = ranks(np.swapaxes(patient_means, -1, -2), higher_is_better)  # [..., patient, loss]
    w = np.ones(patient_means.shape[-1]) if weights is None else weights
    return np.einsum("...pl,...p->...l", per_patient, w) / patient_means.shape[-1]


@dataclass
class Ranking:
    """One scheme's ranking of the losses and its bootstrap stability."""

    scheme: str
    score: np.ndarray  # [loss]: M (aggregate-then-rank) or the mean rank (rank-then-aggregate)
    rank: np.ndarray  # [loss]
    frequencies: np.ndarray  # [loss, rank - 1]: the share of resamples with that rank
    tau: np.ndarray  # [resample]: Kendall's tau-b of its ranking with `rank`

    def tau_summary(self) -> tuple[float, float, float]:
        """(median, 25th, 75th percentile) of tau over the resamples (NaN ones left out)."""
        tau = self.tau[~np.isnan(self.tau)]
        if not tau.size:
            return math.nan, math.nan, math.nan
        q25, median, q75 = np.percentile(tau, [25, 50, 75])
        return float(median), float(q25), float(q75)


def kendall_tau_b(rankings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of every row of `rankings` [B, L] with `reference` [L] (NaN when either ties
    every pair): sum_{i<j} s_ij t_ij / sqrt(n_s n_t), s and t the signs of the pairs' rank
    differences, n_s and n_t the numbers of untied pairs."""
    i, j = np.triu_indices(rankings.shape[1], k=1)
    s = np.sign(reference[i] - reference[j]).astype(np.float64)
    t = np.sign(rankings[:, i] - rankings[:, j]).astype(np.float64)
    denominator = np.sqrt(np.count_nonzero(s) * np.count_nonzero(t, axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, (t * s).sum(axis=1) / denominator, math.nan)


def rankings(scores: Scores, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Ranking]:
    """Both schemes' rankings of a complete grid, with their stability over the same resamples."""
    x, higher = scores.values, scores.higher_is_better
    n_losses, n_reps, n_patients = x.shape
    rep_count, patient_count = resample_counts(n_reps, n_patients, n_resamples, seed)
    boot_patient_means = np.einsum("br,lrp->blp", rep_count, x) / n_reps  # [B, loss, patient]
    boot = {
        SCHEMES[0]: np.einsum("bp,blp->bl", patient_count, boot_patient_means) / n_patients,
        SCHEMES[1]: mean_ranks(boot_patient_means, higher, patient_count),
    }
    observed = {SCHEMES[0]: x.mean(axis=(1, 2)), SCHEMES[1]: mean_ranks(x.mean(axis=1), higher)}
    found = {}
    for scheme in SCHEMES:
        better_high = higher if scheme == SCHEMES[0] else False
        rank, boot_ranks = ranks(observed[scheme], better_high), ranks(boot[scheme], better_high)
        frequencies = np.stack([(boot_ranks == r).mean(axis=0) for r in range(1, n_losses + 1)], axis=1)
        found[scheme] = Ranking(scheme, observed[scheme], rank, frequencies, kendall_tau_b(boot_ranks, rank))
    return found
