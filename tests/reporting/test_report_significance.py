"""Paired differences, bootstrap CIs, the Wilcoxon floor and the results paragraph, against scipy and hand work."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap, wilcoxon

from microseg.core.errors import MicrosegError
from microseg.reporting.paired_runs import paired_difference, wilcoxon_table
from microseg.reporting.runs_report import require_same_evaluation, results_paragraph
from microseg.runs.record import RunRecord
from microseg.stats.paired import bootstrap_ci, holm, min_wilcoxon_p
from stats_helpers import statsmodels_holm


def record(name: str, values: dict[str, list[float]], evaluation: dict | None = None) -> RunRecord:
    """A run whose patients 01, 02, ... have the given per-patient metric values."""
    n = len(next(iter(values.values())))
    patients = {f"{i + 1:02d}": {key: v[i] for key, v in values.items()} for i in range(n)}
    ev = {"split": "test", "protocol": "microsegnet"} if evaluation is None else evaluation
    return RunRecord(name, name, [], patients, evaluation=ev, path=Path("runs") / name)


def test_bootstrap_ci_is_scipys_percentile_bootstrap_with_the_same_generator():
    d = np.array([0.031, -0.012, 0.054, 0.008, 0.022, -0.004, 0.017, 0.040, 0.001])
    want = bootstrap(
        (d,), np.mean, n_resamples=10_000, method="percentile", vectorized=True, random_state=np.random.default_rng(7)
    ).confidence_interval
    assert bootstrap_ci(d, seed=7) == pytest.approx((want.low, want.high), abs=1e-12)
    assert bootstrap_ci(d, seed=7) == bootstrap_ci(d, seed=7)  # seeded


def test_bootstrap_ci_worked_by_hand():
    assert bootstrap_ci([0.02] * 6) == pytest.approx((0.02, 0.02))  # constant differences: a degenerate CI
    # two patients 0 and 1: resampled means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4; the 2.5th and
    # 97.5th percentiles of 10,000 of them are 0 and 1 (P(fewer than 250 zeros) is negligible)
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize("n", range(1, 11))
def test_min_p_is_the_exact_wilcoxon_p_of_differences_all_of_one_sign(n):
    diffs = 0.01 * np.arange(1, n + 1)  # distinct magnitudes, no ties, all positive
    assert min_wilcoxon_p(n) == pytest.approx(wilcoxon(diffs, method="exact").pvalue, rel=1e-12)
    assert min_wilcoxon_p(n) == pytest.approx(wilcoxon(-diffs, method="exact").pvalue, rel=1e-12)


def test_paired_difference_leaves_out_nan_pairs():
    a = record("a", {"dsc": [0.9, 0.8, math.nan, 0.7, 0.95]})
    b = record("b", {"dsc": [0.85, 0.81, 0.6, math.nan, 0.90]})
    d = paired_difference(a, b, "dsc")
    diffs = [0.9 - 0.85, 0.8 - 0.81, 0.95 - 0.90]
    assert (d.metric, d.a, d.b, d.patients, d.replicates) == ("dsc", "a", "b", 3, 1)
    assert d.mean == pytest.approx(np.mean(diffs)) and d.median == pytest.approx(np.median(diffs))
    assert d.p_value == d.wilcoxon_p == pytest.approx(wilcoxon(diffs).pvalue)  # the pair's test is the Wilcoxon
    assert not d.significant  # 3 patients: p >= 2 / 8


def test_wilcoxon_table_holds_the_mean_difference_and_its_ci():
    a = record("a", {"dsc": [0.9, 0.8, 0.7, 0.95], "hd95_mm": [2.0, 3.0, 4.0, 2.5]})
    b = record("b", {"dsc": [0.85, 0.81, 0.6, 0.90], "hd95_mm": [2.5, 3.5, 3.0, 3.0]})
    header, rows = wilcoxon_table([a, b], [("dsc", "DSC"), ("hd95_mm", "HD95 (mm)")])
    row = dict(zip(header, rows[1], strict=True))
    diffs = np.array([2.0 - 2.5, 3.0 - 3.5, 4.0 - 3.0, 2.5 - 3.0])
    want = bootstrap(
        (diffs,),
        np.mean,
        n_resamples=10_000,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(0),
    ).confidence_interval
    assert row["metric"] == "HD95 (mm)" and row["n"] == 4
    assert row["mean_diff"] == pytest.approx(diffs.mean()) and row["p_value"] == pytest.approx(wilcoxon(diffs).pvalue)
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((want.low, want.high), abs=1e-12)


def constructed_runs() -> list[RunRecord]:
    """Eight patients; a is best on DSC by a clear margin over c (all 8 differences positive),
    c best on HD95, b best inside the hard region."""
    base = np.array([0.90, 0.88, 0.92, 0.85, 0.91, 0.89, 0.87, 0.93])
    a = record(
        "a",
        {
            "dsc": list(base + 0.01 * np.arange(1, 9)),
            "hd95_mm": [3.0] * 8,
            "hard_dsc": list(0.8 + np.array([-0.1, 0.1, -0.1, 0.1, -0.05, 0.05, -0.03, 0.02])),
        },
    )
    b = record(
        "b",
        {
            "dsc": list(base + [0.02, -0.01, 0.03, 0.0, 0.01, -0.02, 0.04, 0.01]),
            "hd95_mm": [2.9, 3.1, 3.0, 2.8, 3.2, 3.0, 3.1, 2.9],
            "hard_dsc": [0.80] * 8,
        },
    )
    c = record("c", {"dsc": list(base), "hd95_mm": [2.5] * 8, "hard_dsc": [0.60] * 8})
    return [a, b, c]


@pytest.mark.parametrize(
    "p",
    [
        [0.01, 0.04, 0.03, 0.005],
        [0.2, 0.2, 0.01, 0.5, 0.011, 0.04],
        [0.04],
        [1.0, 0.9],
        list(np.random.default_rng(3).uniform(0, 0.1, 25)),
    ],
)
def test_holm_is_statsmodels_holm(p):
    assert holm(p) == pytest.approx(statsmodels_holm(p), abs=1e-15)


def test_holm_worked_by_hand_and_leaves_undefined_p_out_of_the_family():
    # sorted 0.005, 0.01, 0.03, 0.04: x4, x3, x2, x1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    got = holm([0.01, math.nan, 0.04])  # a family of two
    assert math.isnan(got[1]) and got[[0, 2]] == pytest.approx([0.02, 0.04])


def test_wilcoxon_table_holm_adjusts_over_every_pair_and_metric():
    runs = constructed_runs()
    header, rows = wilcoxon_table(runs, [("dsc", "DSC"), ("hd95_mm", "HD95 (mm)")])
    table = [dict(zip(header, row, strict=True)) for row in rows]
    assert len(table) == 6  # 3 pairs x 2 metrics
    raw = [
        wilcoxon(np.array([p[k] for p in a.patients.values()]) - [p[k] for p in b.patients.values()]).pvalue
        for a, b in [(runs[0], runs[1]), (runs[0], runs[2]), (runs[1], runs[2])]
        for k in ("dsc", "hd95_mm")
    ]
    assert [row["p_value"] for row in table] == pytest.approx(raw)
    assert [row["p_holm"] for row in table] == pytest.approx(statsmodels_holm(raw))


def test_paragraph_picks_the_best_run_on_each_metric():
    runs = constructed_runs()
    text = results_paragraph(runs)
    dsc, hd, hard, family, rule, floor = re.split(r"(?<=\.) (?=On |With |A difference|The \d)", text)
    assert dsc.startswith("On DSC the best is a (mean 0.9388 over 8 patients)")
    # the family: 3 pairs x DSC, HD95, hard DSC = 9 tests (statsmodels adjusts them independently)
    raw = [
        wilcoxon(np.array([p[k] for p in a.patients.values()]) - [p[k] for p in b.patients.values()]).pvalue
        for a, b in [(runs[0], runs[1]), (runs[0], runs[2]), (runs[1], runs[2])]
        for k in ("dsc", "hd95_mm", "hard_dsc")
    ]
    adjusted = statsmodels_holm(raw)
    # a - c: every difference positive (0.01..0.08): p = 2 / 2^8, CI above 0, but 9 tests: adjusted 9 x 2 / 2^8
    against_c = dsc.split("; ")[1]
    assert against_c.startswith("+0.0450 against c")
    assert f"p = {2 / 256:.3g}, the smallest 8 patients allow" in against_c
    assert f"Holm-adjusted {adjusted[3]:.3g}, n = 8" in against_c and adjusted[3] == pytest.approx(9 * 2 / 256)
    assert against_c.endswith("within noise.")
    # c - a on HD95: -0.5 mm for every patient, a degenerate CI -0.5 to -0.5
    assert hd.startswith("On HD95 the best is c (mean 2.500 mm")
    assert "-0.500 mm against a (95% CI -0.500 to -0.500" in hd
    # b - a inside the hard region: +-0.1, +-0.05 ... around a mean of +0.00125: the CI covers 0
    assert hard.startswith("On DSC inside the hard region the best is b (mean 0.8000")
    against_a = hard.split(": ", 1)[1].split("; ")[0]
    assert against_a.startswith("+0.0013 against a") and against_a.endswith("within noise")
    assert family.startswith("The 9 Wilcoxon tests (3 pair(s) of runs x DSC, HD95 (mm), hard-region DSC)")
    assert "adjusted p >= 0.05" in rule
    assert floor == (
        "With 8 patients the exact two-sided Wilcoxon signed-rank test cannot give p below "
        f"2 / 2^8 = {2 / 256:.3g}, nor Holm over 9 tests an adjusted p below 9 x {2 / 256:.3g} = "
        f"{9 * 2 / 256:.3g}: no difference can reach an adjusted p < 0.05, however large; read the CIs."
    )


def test_paragraph_of_two_runs_a_difference_survives_holm():
    a, _, c = constructed_runs()
    text = results_paragraph([a, c])
    # 2 runs x 3 metrics: a - c on DSC has p = 2 / 2^8, adjusted 3 x 2 / 2^8 = 0.0234 < 0.05, CI above 0
    assert (
        f"+0.0450 against c (95% CI +0.0288 to +0.0612, Wilcoxon p = {2 / 256:.3g}, the smallest 8 patients "
        f"allow, Holm-adjusted {3 * 2 / 256:.3g}, n = 8): outside noise." in text
    )
    assert text.endswith(f"2 / 2^8 = {2 / 256:.3g}.")


def test_paragraph_with_too_few_patients_says_no_difference_can_reach_significance():
    runs = [
        record(
            r.name, {k: v[:4] for k, v in ((key, [p[key] for p in r.patients.values()]) for key in ("dsc", "hd95_mm"))}
        )
        for r in constructed_runs()
    ]
    text = results_paragraph(runs)
    assert "With 4 patients" in text and "2 / 2^4 = 0.125: no difference can reach p < 0.05" in text
    assert "outside noise" not in text
    single = results_paragraph(runs[:1])
    assert single.startswith("On DSC the best is a") and "no other run" in single and "Wilcoxon" not in single


def test_runs_of_different_splits_or_protocols_are_refused():
    a = record("a", {"dsc": [0.9]})
    train = record("t", {"dsc": [0.9]}, {"split": "train", "protocol": "microsegnet"})
    volume = record("v", {"dsc": [0.9]}, {"split": "test", "protocol": "volume"})
    require_same_evaluation([a, record("b", {"dsc": [0.8]})])
    with pytest.raises(MicrosegError, match=r"split.*split test: runs/a; split train: runs/t"):
        require_same_evaluation([a, train])
    with pytest.raises(MicrosegError, match=r"protocol microsegnet: runs/a; protocol volume: runs/v"):
        require_same_evaluation([a, volume])
