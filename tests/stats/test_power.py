"""The power planner against statsmodels' closed-form paired t-test power and a cell-by-cell simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.power import TTestPower

from microseg.stats.differences import crossed_fit
from microseg.stats.paired import PairedDifference
from microseg.stats.power import (
    Components,
    family_alpha,
    pooled_components,
    seeds_needed,
    simulate_test,
)


def tolerance(p: float, n: int = 4000) -> float:
    """Four binomial standard errors of a simulated power (plus a little for the reference's rounding)."""
    return 4 * math.sqrt(p * (1 - p) / n) + 0.005


@pytest.mark.parametrize(("effect", "patients"), [(0.4, 12), (0.9, 8), (1.4, 6), (0.0, 10)])
def test_with_one_seed_and_no_seed_variance_the_power_is_the_paired_t_tests(effect, patients):
    sd = math.sqrt(4e-4 + 1e-4)  # sd of a patient's difference: patient and residual components
    test = simulate_test(Components(4e-4, 0.0, 1e-4), 1, patients, alpha=0.05)
    expected = TTestPower().power(effect_size=effect, nobs=patients, alpha=0.05, alternative="two-sided")
    assert abs(test.power(effect * sd) - expected) < tolerance(expected)


def test_the_sufficient_statistics_simulate_what_a_cell_by_cell_simulation_gives():
    components, n_rep, n_pat, alpha = Components(2e-4, 1e-4, 1e-4), 3, 6, 0.05 / 3
    rng = np.random.default_rng(0)
    n = 4000
    d = (
        rng.normal(0, math.sqrt(components.s2_pat), (n, 1, n_pat))
        + rng.normal(0, math.sqrt(components.s2_rep), (n, n_rep, 1))
        + rng.normal(0, math.sqrt(components.s2_res), (n, n_rep, n_pat))
    )
    test = simulate_test(components, n_rep, n_pat, alpha)
    for delta in (0.0, 0.01, 0.02, 0.03):
        cells = float(np.mean(crossed_fit(d + delta).p_value() < alpha))  # the report's own test on each grid
        assert abs(test.power(delta) - cells) < 2 * tolerance(cells)


def test_the_detectable_difference_has_80_percent_power_and_shrinks_with_seeds():
    components = Components(1e-4, 2e-4, 5e-5)
    detectable = []
    for n_rep in (2, 4, 8):
        test = simulate_test(components, n_rep, 10, 0.05)
        found = test.detectable()
        assert test.power(found) >= 0.8 > test.power(found * 0.98)
        detectable.append(found)
    assert detectable[0] > detectable[1] > detectable[2]
    # the same numbers every time (seeded)
    assert simulate_test(components, 2, 10, 0.05).detectable() == detectable[0]


def test_seeds_needed_is_the_fewest_that_reach_80_percent():
    components = Components(1e-5, 4e-4, 1e-4)  # the seed dominates: more seeds resolve it
    needed = seeds_needed(components, 0.02, folds=0, n_pat=10, alpha=0.05)
    assert needed is not None and needed >= 2
    assert simulate_test(components, needed, 10, 0.05).power(0.02) >= 0.8
    assert simulate_test(components, needed - 1, 10, 0.05).power(0.02) < 0.8 or needed == 2
    with_folds = seeds_needed(components, 0.02, folds=5, n_pat=10, alpha=0.05)
    assert with_folds is not None and simulate_test(components, 5 * with_folds, 10, 0.05).power(0.02) >= 0.8
    # the patients' variance alone keeps 0.001 out of reach of any number of seeds with 10 patients
    assert seeds_needed(Components(1e-3, 0.0, 1e-4), 0.001, folds=0, n_pat=10, alpha=0.05) is None


def pair(b: str, mean: float, p: float, components: tuple[float, float, float]) -> PairedDifference:
    """A primary pair a - b of 8 patients x 2 seeds with the given fitted variance components."""
    s2_pat, s2_rep, s2_res = components
    return PairedDifference(
        "dsc",
        "a",
        b,
        8,
        2,
        mean,
        mean,
        p,
        0.0,
        p,
        family="primary",
        se=0.005,
        df=7.0,
        s2_pat=s2_pat,
        s2_rep=s2_rep,
        s2_res=s2_res,
    )


def test_components_are_the_mean_over_the_pairs_and_alpha_is_holms_first_step():
    pairs = [
        pair("b", 0.01, 0.1, components=(1e-4, 2e-5, 3e-5)),
        pair("c", 0.02, 0.01, components=(3e-4, 0.0, 5e-5)),
    ]
    pooled = pooled_components(pairs)
    assert (pooled.s2_pat, pooled.s2_rep, pooled.s2_res, pooled.pairs) == pytest.approx((2e-4, 1e-5, 4e-5, 2))
    assert family_alpha(3, 0.05) == (0.05 / 3, 3) and family_alpha(2, 0.05) == (0.05, 1)
