"""Paired significance tests between runs: the Wilcoxon signed-rank test (scipy) on common patients."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from microseg.run import RunRecord

WILCOXON_HEADER = ["run_a", "run_b", "metric", "n", "median_diff", "statistic", "p_value"]


def wilcoxon_table(records: Sequence[RunRecord], metrics: Sequence[tuple[str, str]]) -> tuple[list[str], list[list]]:
    """Per (key, label) metric and every two runs: `scipy.stats.wilcoxon` of the per-patient
    differences a - b over the patients both scored (NaN pairs left out); NaN when no difference."""
    from scipy.stats import wilcoxon

    rows = []
    for a, b in itertools.combinations(records, 2):
        for key, label in metrics:
            pairs = [(a.patients[c][key], b.patients[c][key]) for c in sorted(set(a.patients) & set(b.patients))]
            pairs = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
            diffs = np.array([x - y for x, y in pairs])
            if len(diffs) and np.any(diffs != 0):
                test = wilcoxon(diffs)
                stat, p = float(test.statistic), float(test.pvalue)
            else:
                stat, p = math.nan, math.nan
            rows.append([a.name, b.name, label, len(diffs), float(np.median(diffs)) if len(diffs) else math.nan, stat, p])
    return list(WILCOXON_HEADER), rows
