"""challengeR's two rankings and their bootstrap stability, against hand work, materialised
resamples and scipy.stats.kendalltau."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kendalltau, rankdata

from microseg.stats.ranking import SCHEMES, kendall_tau_b, rankings, ranks, resample_counts
from microseg.stats.replicates import Scores


def test_ranks_are_1_for_the_best_with_ties_sharing_the_smallest():
    assert list(ranks(np.array([0.8, 0.9, 0.85]), True)) == [3, 1, 2]
    assert list(ranks(np.array([2.0, 1.5, 2.0]), False)) == [2, 1, 2]
    assert list(ranks(np.array([0.9, math.nan, 0.9]), True)) == [1, 3, 1]
    assert ranks(np.array([[0.1, 0.2], [0.3, 0.2]]), True).tolist() == [[2, 1], [1, 2]]


def test_the_two_schemes_worked_by_hand():
    # a: 0.9, 0.9, 0.1 (mean 0.633); b: 0.8 everywhere; c: 0.7 everywhere
    # aggregate-then-rank: b 1, c 2, a 3; per patient: a 1 1 3, b 2 2 1, c 3 3 2 -> mean ranks 5/3,
    # 5/3, 8/3 -> a and b share rank 1, c 3
    x = np.array([[[0.9, 0.9, 0.1]], [[0.8, 0.8, 0.8]], [[0.7, 0.7, 0.7]]])
    found = rankings(Scores(["a", "b", "c"], ["s1"], ["p", "q", "r"], x, True), n_resamples=200)
    aggregate, by_patient = found[SCHEMES[0]], found[SCHEMES[1]]
    assert aggregate.score == pytest.approx([0.9 * 2 / 3 + 0.1 / 3, 0.8, 0.7]) and aggregate.rank.tolist() == [3, 1, 2]
    assert by_patient.score == pytest.approx([5 / 3, 5 / 3, 8 / 3]) and by_patient.rank.tolist() == [1, 1, 3]
    # lower is better: HD95 of the same numbers reverses the per-patient ranks
    hd = rankings(Scores(["a", "b", "c"], ["s1"], ["p", "q", "r"], x, False), n_resamples=10)[SCHEMES[1]]
    assert hd.score == pytest.approx([7 / 3, 7 / 3, 4 / 3]) and hd.rank.tolist() == [2, 2, 1]


def materialised(x: np.ndarray, higher: bool, n: int, seed: int) -> dict[str, np.ndarray]:
    """Each resample's ranks of both schemes, from the resampled grid itself (replicates, then patients)."""
    rng = np.random.default_rng(seed)
    n_reps, n_patients = x.shape[1:]
    reps, patients = rng.integers(0, n_reps, (n, n_reps)), rng.integers(0, n_patients, (n, n_patients))
    found: dict[str, list] = {s: [] for s in SCHEMES}
    sign = -1 if higher else 1
    for r, p in zip(reps, patients, strict=True):
        sample = x[:, r][:, :, p]  # [loss, drawn replicate, drawn patient]
        found[SCHEMES[0]].append(rankdata(sign * sample.mean(axis=(1, 2)), method="min"))
        per_patient = rankdata(sign * sample.mean(axis=1), method="min", axis=0)
        found[SCHEMES[1]].append(rankdata(per_patient.mean(axis=1), method="min"))
    return {s: np.array(v) for s, v in found.items()}


@pytest.mark.parametrize("higher", [True, False])
def test_bootstrap_frequencies_and_kendall_tau_of_materialised_resamples(higher):
    rng = np.random.default_rng(5)
    x = rng.uniform(0.6, 0.95, (4, 3, 7)) + np.array([0.02, 0.0, 0.01, 0.0])[:, None, None]
    x[3] = x[1]  # two identical losses: ties in every resample
    found = rankings(Scores(list("abcd"), list("xyz"), [f"{i}" for i in range(7)], x, higher), 300, seed=9)
    reference = materialised(x, higher, 300, 9)
    for scheme in SCHEMES:
        boot = reference[scheme]
        expected = np.stack([(boot == k).mean(axis=0) for k in range(1, 5)], axis=1)
        assert found[scheme].frequencies == pytest.approx(expected)
        tau = [kendalltau(row, found[scheme].rank).statistic for row in boot]
        assert found[scheme].tau == pytest.approx(np.array(tau), nan_ok=True)
        valid = np.array(tau)[~np.isnan(tau)]
        assert found[scheme].tau_summary() == pytest.approx(
            (np.median(valid), np.percentile(valid, 25), np.percentile(valid, 75))
        )


def test_resample_counts_are_the_draws_of_one_generator():
    reps, patients = resample_counts(3, 5, 4, seed=2)
    rng = np.random.default_rng(2)
    drawn_reps, drawn_patients = rng.integers(0, 3, (4, 3)), rng.integers(0, 5, (4, 5))
    assert reps.tolist() == [np.bincount(r, minlength=3).tolist() for r in drawn_reps]
    assert patients.tolist() == [np.bincount(p, minlength=5).tolist() for p in drawn_patients]


def test_kendall_tau_b_against_scipy_with_ties_and_all_tied():
    rng = np.random.default_rng(1)
    reference = np.array([1, 2, 2, 4, 5])
    rows = rng.integers(1, 4, (50, 5))
    rows[0] = 1  # every loss tied: tau undefined
    ours = kendall_tau_b(rows, reference)
    expected = [kendalltau(row, reference).statistic for row in rows]
    assert ours == pytest.approx(np.array(expected), nan_ok=True) and math.isnan(ours[0])


def test_a_loss_better_everywhere_ranks_first_in_every_resample():
    x = np.random.default_rng(0).uniform(0.7, 0.8, (3, 2, 6))
    x[0] += 0.3
    found = rankings(Scores(["top", "a", "b"], ["s1", "s2"], list("pqrstu"), x, True), 500)
    for scheme in SCHEMES:
        assert found[scheme].frequencies[0].tolist() == [1.0, 0.0, 0.0]
        assert found[scheme].frequencies.sum(axis=1) == pytest.approx(1.0)
