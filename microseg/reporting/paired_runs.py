"""Paired comparisons of runs over patients: the values both runs scored, the family of every pair's
tests, Holm-adjusted, and the table of Wilcoxon tests of `compare`.

The statistics themselves (bootstrap CI, Wilcoxon signed-rank test, Holm) are `microseg.stats.paired`'s;
this module pairs the runs' per-patient values (`microseg.runs.record.RunRecord`) for them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from microseg.runs.record import RunRecord
from microseg.stats.paired import PairedDifference, holm, summarize_differences

WILCOXON_HEADER = [
    "run_a",
    "run_b",
    "metric",
    "n",
    "median_diff",
    "statistic",
    "p_value",
    "p_holm",
    "mean_diff",
    "ci95_low",
    "ci95_high",
]


def paired_values(a: RunRecord, b: RunRecord, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The metric `key` of the patients both runs scored (NaN on either side left out), in case order."""
    cases = sorted(set(a.patients) & set(b.patients))
    pairs = [(a.patients[c].get(key, math.nan), b.patients[c].get(key, math.nan)) for c in cases]
    pairs = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
    x, y = (np.array(v, dtype=np.float64) for v in zip(*pairs, strict=True)) if pairs else (np.empty(0), np.empty(0))
    return x, y


def paired_difference(a: RunRecord, b: RunRecord, key: str) -> PairedDifference:
    """Mean, median, bootstrap CI and Wilcoxon test of a - b on `key`, the runs named by their folders
    (a family of one test)."""
    x, y = paired_values(a, b, key)
    return summarize_differences(key, a.name, b.name, x - y)


def family_differences(
    records: Sequence[RunRecord], keys: Sequence[str]
) -> dict[tuple[int, int, str], PairedDifference]:
    """`paired_difference` of every two runs (i < j, by position) on every key, Holm-adjusted over
    that whole family (pairs x keys; the tests with no defined p left out)."""
    diffs = {
        (i, j, key): paired_difference(records[i], records[j], key)
        for i, j in itertools.combinations(range(len(records)), 2)
        for key in keys
    }
    adjusted = holm([d.p_value for d in diffs.values()])
    return {
        k: dataclasses.replace(d, p_holm=float(p), wilcoxon_p_holm=float(p))
        for (k, d), p in zip(diffs.items(), adjusted, strict=True)
    }


def wilcoxon_table(records: Sequence[RunRecord], metrics: Sequence[tuple[str, str]]) -> tuple[list[str], list[list]]:
    """Per (key, label) metric and every two runs: the paired differences a - b, their Wilcoxon
    signed-rank test (`scipy.stats.wilcoxon`; NaN when no difference), its p Holm-adjusted over
    all the table's tests (`family_differences`), and the bootstrap 95% CI."""
    labels = dict(metrics)
    rows = []
    for diff in family_differences(records, list(labels)).values():
        rows.append(
            [
                diff.a,
                diff.b,
                labels[diff.metric],
                diff.patients,
                diff.median,
                diff.wilcoxon_statistic,
                diff.p_value,
                diff.p_holm,
                diff.mean,
                *diff.ci,
            ]
        )
    return list(WILCOXON_HEADER), rows
