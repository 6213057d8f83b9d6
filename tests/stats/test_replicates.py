"""The grid of losses x replicate slots x patients (missing is worst, or dropped), its means and the
ANOVA of the run means, against hand work and statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm

from microseg.stats.replicates import Scores, drop_incomplete, fill_worst, variance_table

# Two losses x two seeds x three patients (DSC).
A = [[0.90, 0.80, 0.70], [0.92, 0.84, 0.76]]  # run means 0.80, 0.84; patient means 0.91, 0.82, 0.73
B = [[0.85, 0.75, 0.65], [0.85, 0.79, 0.65]]  # run means 0.75, 0.763333; patient means 0.85, 0.77, 0.65


def small(values=None) -> Scores:
    return Scores(["a", "b"], ["s1", "s2"], ["01", "02", "03"], np.array(values or [A, B]), higher_is_better=True)


def test_means_and_seed_sd_worked_by_hand():
    s = small()
    assert s.patient_means() == pytest.approx(np.array([[0.91, 0.82, 0.73], [0.85, 0.77, 0.65]]))
    assert s.loss_means() == pytest.approx([0.82, 0.7566667])
    assert s.run_means() == pytest.approx(np.array([[0.80, 0.84], [0.75, 0.7633333]]))
    assert s.seed_sd() == pytest.approx([0.04 / math.sqrt(2), (0.0133333) / math.sqrt(2)], rel=1e-5)
    assert list(s.runs()) == [2, 2]


def test_missing_is_worst_fills_every_nan_with_the_worst_value():
    values = np.array([A, [B[0], [math.nan] * 3]])  # b's seed 2 has no evaluation
    values[0, 1, 2] = math.nan  # a's seed 2 left patient 03 empty
    filled = fill_worst(small(values.tolist()), 0.0)
    assert filled.values[0, 1].tolist() == [0.92, 0.84, 0.0]
    assert filled.values[1, 1].tolist() == [0.0, 0.0, 0.0]
    assert filled.loss_means() == pytest.approx([(0.9 + 0.8 + 0.7 + 0.92 + 0.84) / 6, (0.85 + 0.75 + 0.65) / 6])
    hd = fill_worst(Scores(["a"], ["s1"], ["01", "02"], np.array([[[2.0, math.nan]]]), False), 56.3)
    assert hd.values.tolist() == [[[2.0, 56.3]]]


def test_drop_removes_slots_without_any_score_then_patients_with_a_nan():
    values = np.array([A, [B[0], [math.nan] * 3]])
    values[0, 0, 1] = math.nan
    kept = drop_incomplete(small(values.tolist()))
    assert kept.replicates == ["s1"] and kept.patients == ["01", "03"]  # s2 empty for b; 02 NaN for a in s1
    assert kept.values.tolist() == [[[0.90, 0.70]], [[0.85, 0.65]]]
    # with folds a seed's slots go together: slot 1 (seed 1, fold 1) empty drops seed 1 whole
    x = np.ones((2, 4, 3))
    x[1, 1] = math.nan
    x[0, 2, 0] = math.nan
    grid = Scores(["a", "b"], ["1/0", "1/1", "2/0", "2/1"], ["p", "q", "r"], x, True)
    kept = drop_incomplete(grid, [[0, 1], [2, 3]])
    assert kept.replicates == ["2/0", "2/1"] and kept.patients == ["q", "r"]
    assert drop_incomplete(Scores(["a"], ["s"], ["p"], np.full((1, 1, 1), math.nan), True)).values.size == 0


def test_variance_table_worked_by_hand_without_folds():
    # run means a: 0.80, 0.84; b: 0.75, 0.763333 (seed 1, seed 2); grand mean 0.788333
    # SS_loss = 2 x 2 x 0.0316667^2 = 0.00401111; seed means 0.775, 0.801667: SS_seed = 2 x 2 x 0.0133333^2
    # = 0.00071111; SS_total = 0.0049; SS_res = 0.0049 - 0.00401111 - 0.00071111 = 0.00017778 on 1 df
    rows = {v.source: v for v in variance_table(small().run_means()[:, :, None])}
    assert list(rows) == ["loss", "seed", "residual", "total"]
    assert rows["loss"].ss == pytest.approx(0.00401111, rel=1e-5) and rows["loss"].df == 1
    assert rows["seed"].ss == pytest.approx(0.00071111, rel=1e-4) and rows["seed"].df == 1
    assert rows["residual"].ss == pytest.approx(0.00017778, rel=1e-3) and rows["residual"].df == 1
    assert rows["total"].ss == pytest.approx(0.0049, rel=1e-5) and rows["total"].share == 1
    assert rows["loss"].f == pytest.approx(0.00401111 / 0.00017778, rel=1e-3)
    assert rows["loss"].share == pytest.approx(0.00401111 / 0.0049, rel=1e-5)
    # sigma_seed^2 = (MS_seed - MS_res) / L
    assert rows["seed"].sd == pytest.approx(math.sqrt((0.00071111 - 0.00017778) / 2), rel=1e-3)
    assert rows["residual"].sd == pytest.approx(math.sqrt(0.00017778), rel=1e-3)


@pytest.mark.parametrize("shape", [(3, 4, 1), (2, 3, 4), (4, 2, 3)])
def test_variance_table_is_statsmodels_anova(shape):
    rng = np.random.default_rng(sum(shape))
    n_loss, n_seed, n_fold = shape
    u = (
        rng.normal(0.85, 0.01, shape)
        + rng.normal(0, 0.02, (n_loss, 1, 1))
        + rng.normal(0, 0.01, (1, n_seed, 1))
        + rng.normal(0, 0.01, (1, 1, n_fold))
    )
    index = np.indices(shape).reshape(3, -1)
    frame = pd.DataFrame({"u": u.ravel(), "loss": index[0], "seed": index[1], "fold": index[2]})
    formula = "u ~ C(loss) + C(seed)" + (" + C(fold)" if n_fold > 1 else "")
    reference = anova_lm(smf.ols(formula, frame).fit())
    rows = {v.source: v for v in variance_table(u)}
    for source in ("loss", "seed") + (("fold",) if n_fold > 1 else ()):
        expected = reference.loc[f"C({source})"]
        assert rows[source].ss == pytest.approx(expected["sum_sq"], rel=1e-9)
        assert rows[source].df == expected["df"]
        assert rows[source].f == pytest.approx(expected["F"], rel=1e-9)
        assert rows[source].p == pytest.approx(expected["PR(>F)"], rel=1e-7)
        if source == "loss":  # a fixed effect: no sd
            assert math.isnan(rows[source].sd)
            continue
        per_level = u.size // (rows[source].df + 1)  # sigma^2 = (MS - MS_res) / runs per level
        ms_res = reference.loc["Residual", "sum_sq"] / reference.loc["Residual", "df"]
        sd = math.sqrt(max(0.0, (expected["sum_sq"] / expected["df"] - ms_res) / per_level))
        assert rows[source].sd == pytest.approx(sd, rel=1e-9, abs=1e-12)
    assert rows["residual"].ss == pytest.approx(reference.loc["Residual", "sum_sq"], rel=1e-9)
    assert rows["residual"].df == reference.loc["Residual", "df"]
    assert sum(rows[s].share for s in rows if s != "total") == pytest.approx(1.0)


def test_variance_table_with_one_seed_has_no_test():
    rows = {v.source: v for v in variance_table(np.array([[[0.8]], [[0.9]]]))}
    assert rows["residual"].df == 0 and math.isnan(rows["loss"].p) and math.isnan(rows["seed"].sd)
