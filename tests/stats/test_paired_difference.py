"""One paired-difference type for two runs and for two losses over replicate slots: each field means
the same in both (checked against numpy and scipy), one rule for significance, and the pair reversed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ttest_rel, wilcoxon

from microseg.stats.differences import loss_differences
from microseg.stats.paired import PairedDifference, summarize_differences
from microseg.stats.replicates import Scores

PATIENTS = [f"{i:02d}" for i in range(1, 9)]


def grid(x: np.ndarray, y: np.ndarray) -> Scores:
    """Two losses' DSC on R slots x P patients: x[r, p] and y[r, p]."""
    return Scores(["x", "y"], [f"seed {r}" for r in range(len(x))], PATIENTS, np.stack([x, y]), True)


def test_one_slot_of_two_losses_and_two_runs_fill_the_shared_fields_alike():
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0.7, 0.9, (1, 8)), rng.uniform(0.7, 0.9, (1, 8))
    d = x[0] - y[0]
    (losses,) = loss_differences({"dsc": grid(x, y)}, "dsc")
    runs = summarize_differences("dsc", "x", "y", d)
    for pair in (losses, runs):
        assert (pair.metric, pair.a, pair.b, pair.patients, pair.replicates) == ("dsc", "x", "y", 8, 1)
        assert pair.mean == pytest.approx(d.mean()) and pair.median == pytest.approx(np.median(d))
        assert pair.wilcoxon_statistic == wilcoxon(d).statistic
        assert pair.wilcoxon_p == pytest.approx(wilcoxon(d).pvalue)
    assert losses.p_value == pytest.approx(ttest_rel(x[0], y[0]).pvalue)  # the losses' test: paired t (R = 1)
    assert runs.p_value == runs.wilcoxon_p and runs.ci_level == 0.95  # the runs': the Wilcoxon test, bootstrap CI
    assert all(math.isnan(v) for v in (runs.se, runs.df, runs.s2_pat, runs.s2_rep, runs.s2_res))


def test_over_several_slots_the_median_and_the_wilcoxon_test_are_of_the_per_patient_means():
    rng = np.random.default_rng(6)
    x, y = rng.uniform(0.7, 0.9, (3, 8)), rng.uniform(0.7, 0.9, (3, 8))
    (pair,) = loss_differences({"dsc": grid(x, y)}, "dsc")
    per_patient = (x - y).mean(axis=0)
    assert (pair.patients, pair.replicates, pair.family) == (8, 3, "primary")
    assert pair.mean == pytest.approx((x - y).mean()) and pair.median == pytest.approx(np.median(per_patient))
    assert pair.wilcoxon_p == pytest.approx(wilcoxon(per_patient).pvalue)
    assert pair.t == pytest.approx(pair.mean / pair.se)


@pytest.mark.parametrize(
    "p_holm, ci, significant",
    [
        (0.01, (0.1, 0.2), True),
        (0.01, (-0.2, -0.1), True),
        (0.049, (0.1, 0.2), True),
        (0.05, (0.1, 0.2), False),  # adjusted p not below 0.05
        (0.01, (-0.1, 0.2), False),  # the interval covers 0
        (0.01, (0.0, 0.2), False),  # ... at its end
        (0.01, (math.nan, math.nan), False),  # no interval
        (math.nan, (0.1, 0.2), False),  # no test
    ],
)
def test_one_rule_of_significance(p_holm, ci, significant):
    d = PairedDifference("dsc", "a", "b", 5, 1, 0.1, 0.1, p_holm, 0.0, p_holm, ci=ci, p_holm=p_holm)
    assert d.significant is significant


def test_the_reversed_pair_negates_the_differences_and_keeps_the_tests():
    d = PairedDifference("dsc", "a", "b", 5, 2, 0.1, 0.08, 0.02, 1.0, 0.06, ci=(0.03, 0.2), p_holm=0.04, se=0.02)
    r = d.reversed()
    assert (r.a, r.b, r.mean, r.median, r.ci) == ("b", "a", -0.1, -0.08, (-0.2, -0.03))
    assert (r.p_value, r.p_holm, r.wilcoxon_p, r.se, r.significant) == (0.02, 0.04, 0.06, 0.02, True)
    assert r.reversed() == d
