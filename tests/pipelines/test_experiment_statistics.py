"""Statistics over losses x replicates x patients against hand work, plain loops, scipy and statsmodels."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests

from microseg.experiment_statistics import (
    Scores,
    bootstrap_means,
    loss_differences,
    rank_frequencies,
    ranks,
    variance_share,
)

# Two losses x two seeds x three patients (DSC).
A = [[0.90, 0.80, 0.70], [0.92, 0.84, 0.76]]  # run means 0.80, 0.84; patient means 0.91, 0.82, 0.73
B = [[0.85, 0.75, 0.65], [0.85, 0.79, 0.65]]  # run means 0.75, 0.763333; patient means 0.85, 0.77, 0.65


def small() -> Scores:
    return Scores(["a", "b"], ["s1", "s2"], ["01", "02", "03"], np.array([A, B]), higher_is_better=True)


def test_means_and_seed_sd_worked_by_hand():
    s = small()
    assert s.patient_means() == pytest.approx(np.array([[0.91, 0.82, 0.73], [0.85, 0.77, 0.65]]))
    assert s.loss_means() == pytest.approx([0.82, 0.7566667])
    assert s.run_means() == pytest.approx(np.array([[0.80, 0.84], [0.75, 0.7633333]]))
    assert s.seed_sd() == pytest.approx([0.04 / math.sqrt(2), (0.0133333) / math.sqrt(2)], rel=1e-5)
    assert list(s.runs()) == [2, 2]


def test_a_missing_run_and_patient_are_left_out():
    values = np.array([A, [B[0], [math.nan] * 3]])
    values[0, 1, 2] = math.nan  # seed 2 of a did not score patient 03
    s = Scores(["a", "b"], ["s1", "s2"], ["01", "02", "03"], values, True)
    assert s.patient_means()[0] == pytest.approx([0.91, 0.82, 0.70])
    assert s.run_means()[0] == pytest.approx([0.80, 0.88])
    assert s.loss_means()[1] == pytest.approx(0.75)
    sd = s.seed_sd()
    assert sd[0] == pytest.approx(0.08 / math.sqrt(2)) and math.isnan(sd[1])
    assert list(s.runs()) == [2, 1]


def test_variance_share_worked_by_hand():
    # run means a: 0.80, 0.84 (mean 0.82); b: 0.75, 0.76333 (mean 0.756667); grand mean 0.788333
    # SS_loss = 2 (0.82 - 0.788333)^2 + 2 (0.756667 - 0.788333)^2 = 4 x 0.0316667^2 = 0.00401111
    # SS_seed = 2 x 0.02^2 + 2 x 0.0066667^2 = 0.00088889; SS_total = 0.0049
    v = variance_share(small().run_means())
    assert v.ss_loss == pytest.approx(0.00401111, rel=1e-5)
    assert v.ss_seed == pytest.approx(0.00088889, rel=1e-5)
    assert v.ss_total == pytest.approx(0.0049, rel=1e-5) == pytest.approx(v.ss_loss + v.ss_seed)
    assert v.loss_share == pytest.approx(0.00401111 / 0.0049, rel=1e-5)
    assert v.chance_share == pytest.approx(1 / 3)  # (k - 1) / (N - 1) = 1 / 3


def test_variance_share_with_unequal_runs_and_no_loss_effect():
    v = variance_share(np.array([[1.0, 3.0, math.nan], [2.0, 2.0, 2.0]]))
    assert (v.ss_loss, v.ss_seed, v.ss_total) == pytest.approx((0.0, 2.0, 2.0))  # both groups have mean 2
    assert v.loss_share == 0 and v.chance_share == pytest.approx(1 / 4)


def test_ranks_are_aggregate_then_rank_with_ties_sharing_the_smallest():
    assert list(ranks(np.array([0.8, 0.9, 0.85]), True)) == [3, 1, 2]
    assert list(ranks(np.array([2.0, 1.5, 2.0]), False)) == [2, 1, 2]
    assert list(ranks(np.array([0.9, math.nan, 0.9]), True)) == [1, 3, 1]
    assert ranks(np.array([[0.1, 0.2], [0.3, 0.2]]), True).tolist() == [[2, 1], [1, 2]]


def reference_bootstrap(values: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The same resamples materialised: index the replicates, then the patients, and average."""
    rng = np.random.default_rng(seed)
    n_reps, n_patients = values.shape[1:]
    reps = rng.integers(0, n_reps, (n, n_reps))
    patients = rng.integers(0, n_patients, (n, n_patients))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice
        for r, p in zip(reps, patients):
            x = values[:, r][:, :, p]
            out.append(np.nanmean(np.nanmean(x, axis=1), axis=1))
    return np.array(out)


def test_bootstrap_means_are_the_resampled_means():
    rng = np.random.default_rng(5)
    values = rng.uniform(0.6, 0.95, (3, 4, 7))
    values[1, 2] = math.nan  # a missing run
    values[2, 0, 3] = math.nan  # a patient one run did not score
    s = Scores(["a", "b", "c"], list("wxyz"), [f"{i:02d}" for i in range(7)], values, True)
    got = bootstrap_means(s, n_resamples=300, seed=11)
    assert got == pytest.approx(reference_bootstrap(values, 300, 11), nan_ok=True)


def test_rank_frequencies_of_a_loss_better_everywhere_and_of_identical_losses():
    values = np.array([np.array(A) + 0.2, A, B])  # the first is better on every patient and seed
    s = Scores(["top", "a", "b"], ["s1", "s2"], ["01", "02", "03"], values, True)
    freq = rank_frequencies(bootstrap_means(s, n_resamples=500), True)
    assert freq.sum(axis=1) == pytest.approx(1.0)
    assert freq[0].tolist() == [1.0, 0.0, 0.0]
    same = Scores(["a", "a2"], ["s1", "s2"], ["01", "02", "03"], np.array([A, A]), True)
    assert rank_frequencies(bootstrap_means(same, n_resamples=50), True).tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_loss_differences_are_wilcoxon_on_patient_means_holm_adjusted_over_pairs_and_metrics():
    rng = np.random.default_rng(2)
    dsc = rng.uniform(0.8, 0.95, (3, 2, 9))
    dsc[0] += 0.03  # the first loss better
    hd = rng.uniform(1.5, 3.0, (3, 2, 9))
    scores = {
        "dsc": Scores(["x", "y", "z"], ["s1", "s2"], [str(i) for i in range(9)], dsc, True),
        "hd95_mm": Scores(["x", "y", "z"], ["s1", "s2"], [str(i) for i in range(9)], hd, False),
    }
    boot = {k: bootstrap_means(s, n_resamples=2000) for k, s in scores.items()}
    found = loss_differences(scores, boot)
    assert [(d.metric, d.a, d.b) for d in found] == [
        (m, a, b) for m in ("dsc", "hd95_mm") for a, b in (("x", "y"), ("x", "z"), ("y", "z"))
    ]
    raw = []
    for d in found:
        values = dsc if d.metric == "dsc" else hd
        i, j = "xyz".index(d.a), "xyz".index(d.b)
        diff = values[i].mean(axis=0) - values[j].mean(axis=0)
        raw.append(wilcoxon(diff).pvalue)
        assert d.n == 9 and d.mean == pytest.approx(diff.mean())
        run_sd = values[[i, j]].mean(axis=2).std(axis=1, ddof=1)
        assert d.seed_noise == pytest.approx(run_sd.max())
        lo, hi = np.percentile(boot[d.metric][:, i] - boot[d.metric][:, j], [2.5, 97.5])
        assert d.ci95 == pytest.approx((lo, hi))
    assert [d.p_value for d in found] == pytest.approx(raw)
    assert [d.p_holm for d in found] == pytest.approx(multipletests(raw, method="holm")[1])
    first = found[0]
    assert first.significant == (first.p_holm < 0.05)
    assert first.within_seed_noise == (abs(first.mean) < first.seed_noise)
