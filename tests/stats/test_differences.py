"""The crossed-effects test of a pair of losses against statsmodels' MixedLM, a direct REML
maximisation, scipy's t tests and a worked example; Holm-matched CIs never disagree with the test."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.optimize import minimize
from scipy.stats import t as t_distribution
from scipy.stats import ttest_1samp, wilcoxon

from microseg.stats.differences import crossed_fit, holm_levels, loss_differences
from microseg.stats.replicates import Scores
from stats_helpers import statsmodels_holm


def mixed_lm(d: np.ndarray) -> tuple[float, float]:
    """statsmodels' REML fit of d[r, p] = delta + patient + replicate + residual (crossed random
    intercepts: variance components in one group): (delta, its standard error)."""
    n_rep, n_pat = d.shape
    frame = pd.DataFrame(
        {"d": d.ravel(), "rep": np.repeat(np.arange(n_rep), n_pat), "pat": np.tile(np.arange(n_pat), n_rep), "g": 1}
    )
    model = sm.MixedLM.from_formula(
        "d ~ 1", groups="g", vc_formula={"pat": "0 + C(pat)", "rep": "0 + C(rep)"}, re_formula="0", data=frame
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = model.fit(reml=True)
    return float(fit.fe_params.iloc[0]), float(fit.bse.iloc[0])


def reml_loglik(d: np.ndarray, s2_pat: float, s2_rep: float, s2_res: float) -> float:
    """The restricted log-likelihood of the general linear mixed model, from its covariance matrix."""
    n_rep, n_pat = d.shape
    y = d.ravel()
    z_pat, z_rep = np.tile(np.eye(n_pat), (n_rep, 1)), np.repeat(np.eye(n_rep), n_pat, axis=0)
    v = s2_pat * z_pat @ z_pat.T + s2_rep * z_rep @ z_rep.T + s2_res * np.eye(y.size)
    x = np.ones((y.size, 1))
    vi = np.linalg.inv(v)
    xvx = x.T @ vi @ x
    r = y - x @ np.linalg.solve(xvx, x.T @ vi @ y)
    return -0.5 * (np.linalg.slogdet(v)[1] + np.linalg.slogdet(xvx)[1] + r @ vi @ r)


def grid(rng, n_rep, n_pat, sd_rep=0.01, sd_pat=0.02, sd_res=0.01, delta=0.01) -> np.ndarray:
    return (
        delta
        + rng.normal(0, sd_pat, (1, n_pat))
        + rng.normal(0, sd_rep, (n_rep, 1))
        + rng.normal(0, sd_res, (n_rep, n_pat))
    )


def test_worked_example():
    # D = [[1, 2, 7], [3, 4, 7]]: mean 4; replicate means 10/3, 14/3; patient means 2, 3, 7
    # SS_rep = 3 (4/9 + 4/9) = 8/3 (1 df); SS_pat = 2 (4 + 1 + 9) = 28 (2 df); residuals -1/3, -1/3,
    # 2/3, 1/3, 1/3, -2/3: SS_res = 4/3 (2 df). MS 8/3, 14, 2/3: both components positive.
    # Var = (8/3 + 14 - 2/3) / 6 = 8/3; df = 16^2 / ((8/3)^2 / 1 + 14^2 / 2 + (2/3)^2 / 2) = 2.43038
    fit = crossed_fit(np.array([[1.0, 2, 7], [3, 4, 7]]))
    assert float(fit.delta) == 4 and float(fit.var) == pytest.approx(8 / 3)
    assert float(fit.df) == pytest.approx(256 / (64 / 9 + 98 + 2 / 9))
    assert (float(fit.s2_pat), float(fit.s2_rep), float(fit.s2_res)) == pytest.approx((20 / 3, 2 / 3, 2 / 3))
    expected_p = 2 * t_distribution.sf(4 / math.sqrt(8 / 3), 256 / (64 / 9 + 98 + 2 / 9))
    assert float(fit.p_value()) == pytest.approx(expected_p)


def test_a_negative_seed_component_is_zero_and_the_test_is_the_paired_t_test_of_the_patient_means():
    # D = [[1, 2, 7], [2, 1, 7]]: equal replicate means (MS_rep 0 < MS_res 1/2): s2_rep = 0, the
    # replicate sum of squares pooled into the residual; Var = MS_pat / 6 on P - 1 = 2 df
    d = np.array([[1.0, 2, 7], [2, 1, 7]])
    fit = crossed_fit(d)
    reference = ttest_1samp(d.mean(axis=0), 0.0)
    assert float(fit.s2_rep) == 0 and float(fit.s2_res) == pytest.approx(1 / 3)
    assert float(fit.df) == 2 and float(fit.p_value()) == pytest.approx(reference.pvalue)
    assert math.sqrt(float(fit.var)) == pytest.approx(reference.statistic**-1 * d.mean())


@pytest.mark.parametrize("case", range(5))
def test_delta_and_its_se_are_statsmodels_mixedlm(case):
    rng = np.random.default_rng(case)
    d = grid(rng, 2 + case % 3, 5 + case, sd_rep=0.02, sd_pat=0.03, sd_res=0.005)
    fit = crossed_fit(d)
    assert float(fit.s2_rep) > 0 and float(fit.s2_pat) > 0  # inside the parameter space
    delta, se = mixed_lm(d)
    assert float(fit.delta) == pytest.approx(delta, rel=1e-6)
    assert math.sqrt(float(fit.var)) == pytest.approx(se, rel=1e-4)


@pytest.mark.parametrize("case", range(6))
def test_the_fit_maximises_the_restricted_likelihood_on_the_boundary_too(case):
    rng = np.random.default_rng(100 + case)
    d = grid(rng, 3, 6, sd_rep=(0.0, 0.02)[case % 2], sd_pat=(0.0, 0.02)[case // 2 % 2], sd_res=0.01)
    fit = crossed_fit(d)
    ours = reml_loglik(d, float(fit.s2_pat), float(fit.s2_rep), float(fit.s2_res))
    start = np.log([np.var(d) / 3 + 1e-8] * 3)
    best = minimize(lambda s: -reml_loglik(d, *np.exp(s)), start, method="Nelder-Mead", options={"maxiter": 4000})
    assert ours >= -best.fun - 1e-7  # no better point found by a general optimiser


def test_one_replicate_is_the_paired_t_test_and_one_patient_the_t_test_over_replicates():
    rng = np.random.default_rng(7)
    d = grid(rng, 1, 9)
    fit = crossed_fit(d)
    assert float(fit.p_value()) == pytest.approx(ttest_1samp(d[0], 0.0).pvalue) and float(fit.df) == 8
    d = grid(rng, 5, 1)
    assert float(crossed_fit(d).p_value()) == pytest.approx(ttest_1samp(d[:, 0], 0.0).pvalue)
    assert math.isnan(float(crossed_fit(np.array([[0.2]])).p_value()))


def test_identical_losses_give_p_1_and_a_zero_interval():
    x = np.random.default_rng(3).uniform(0.8, 0.9, (1, 2, 4))
    scores = Scores(["a", "b"], ["s1", "s2"], list("pqrs"), np.concatenate([x, x]), True)
    (d,) = loss_differences({"dsc": scores}, "dsc")
    assert d.mean == 0 and d.p_value == 1 and d.ci == (0, 0) and not d.significant


def random_scores(rng, n_losses, shift) -> Scores:
    n_rep, n_pat = rng.integers(1, 5), rng.integers(3, 12)
    values = rng.uniform(0.7, 0.95, (1, n_rep, n_pat)) + rng.normal(0, 0.03, (n_losses, n_rep, n_pat))
    values += rng.normal(0, 0.01, (n_losses, n_rep, 1)) + shift * np.arange(n_losses)[:, None, None]
    names = [f"l{i}" for i in range(n_losses)]
    return Scores(names, [f"s{r}" for r in range(n_rep)], [f"{p:02d}" for p in range(n_pat)], values, True)


def test_loss_differences_holm_over_the_primary_family_and_secondary_apart():
    rng = np.random.default_rng(2)
    dsc, hd = random_scores(rng, 3, 0.02), random_scores(rng, 3, 0.0)
    hd.higher_is_better = False
    found = loss_differences({"dsc": dsc, "hd95_mm": hd}, "hd95_mm")
    assert [(d.metric, d.family, d.a, d.b) for d in found] == [
        (m, f, a, b)
        for m, f in (("hd95_mm", "primary"), ("dsc", "secondary"))
        for a, b in (("l0", "l1"), ("l0", "l2"), ("l1", "l2"))
    ]
    for family in (found[:3], found[3:]):
        raw = [d.p_value for d in family]
        assert [d.p_holm for d in family] == pytest.approx(statsmodels_holm(raw))
        wilcoxon_raw = []
        for d in family:
            scores = hd if d.metric == "hd95_mm" else dsc
            i, j = scores.losses.index(d.a), scores.losses.index(d.b)
            diff = scores.values[i] - scores.values[j]
            assert d.mean == pytest.approx(diff.mean()) and (d.replicates, d.patients) == diff.shape
            wilcoxon_raw.append(wilcoxon(diff.mean(axis=0)).pvalue)
        assert [d.wilcoxon_p for d in family] == pytest.approx(wilcoxon_raw)
        assert [d.wilcoxon_p_holm for d in family] == pytest.approx(statsmodels_holm(wilcoxon_raw))


def test_the_ci_excludes_0_exactly_when_holm_calls_the_difference_significant():
    rng = np.random.default_rng(11)
    outcomes = []
    for _ in range(150):
        scores = random_scores(rng, int(rng.integers(2, 5)), float(rng.uniform(0, 0.06)))
        for d in loss_differences({"dsc": scores}, "dsc"):
            lo, hi = d.ci
            excludes = lo > 0 or hi < 0
            assert excludes == d.significant, d
            assert d.ci_level == pytest.approx(1 - 0.05 * d.p_value / d.p_holm) if d.p_holm > 0 else True
            outcomes.append(excludes)
    assert 0.1 < np.mean(outcomes) < 0.9  # both kinds of outcome were tested


def test_holm_levels_by_hand():
    # p = 0.01, 0.02, 0.04: Holm 0.03, 0.04, 0.04; levels 1 - 0.05 / 3, 1 - 0.05 / 2, 1 - 0.05 (0.04 / 0.04)
    levels = holm_levels([0.01, 0.04, 0.02], [0.03, 0.04, 0.04])
    assert levels == pytest.approx([1 - 0.05 / 3, 0.95, 1 - 0.05 / 2])
    assert holm_levels([0.0, 0.5], [0.0, 0.5]) == pytest.approx([1 - 0.05 / 2, 0.95])


def test_drop_uses_each_pairs_own_complete_grid():
    x = np.random.default_rng(4).uniform(0.8, 0.9, (3, 3, 5))
    x[2, 1] = math.nan  # c's seed 2 failed: only the pairs with c lose that slot
    x[1, 0, 4] = math.nan  # b left patient 5 empty on seed 1: pairs with b lose patient 5
    scores = Scores(["a", "b", "c"], ["s1", "s2", "s3"], list("pqrst"), x, True)
    ab, ac, bc = loss_differences({"dsc": scores}, "dsc", drop=True)
    assert (ab.replicates, ab.patients) == (3, 4) and ab.mean == pytest.approx((x[0] - x[1])[:, :4].mean())
    assert (ac.replicates, ac.patients) == (2, 5) and ac.mean == pytest.approx((x[0] - x[2])[[0, 2]].mean())
    assert (bc.replicates, bc.patients) == (2, 4)
