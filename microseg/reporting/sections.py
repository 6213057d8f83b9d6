"""The sections both reports share: what was compared, and the per-patient table.

Each report passes in what differs: the runs report lists its runs in a table, the experiment report
its experiments' plans; the per-patient table's columns are a run's values, or a loss's means over
its replicate slots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from microseg.core.tables import SUMMARY_ROWS
from microseg.metrics import summarize


def compared_section(compared: Sequence[str], facts: Sequence[str]) -> list[str]:
    """report.md's opening: the title, what was compared (a table of runs, the experiments' plans),
    then the facts of the comparison (the data, the replicates, the rules), one line each."""
    return ["## What was compared", "", *compared, "", *facts, ""]


def data_fact(data: str, evaluation: Mapping, patients: Sequence[str]) -> str:
    """Where and how the compared runs were scored: "Data: D; split S, protocol P; N patients (ids)"."""
    return (
        f"Data: {data}; split {evaluation.get('split', '?')}, protocol {evaluation.get('protocol', '?')}; "
        f"{len(patients)} patients ({', '.join(patients)})"
    )


def patient_table(
    cases: Sequence[str], columns: Sequence[tuple[str, Mapping[str, float]]]
) -> tuple[list[str], list[list]]:
    """One row per patient in `cases`: its case_id, then each (label, case -> value) column's value (NaN
    where the column has none); then the mean, std and median rows over the patients (`summarize`,
    NaN left out)."""
    header = ["case_id"] + [label for label, _ in columns]
    rows: list[list] = [[case] + [values.get(case, math.nan) for _, values in columns] for case in cases]
    stats = [summarize([row[i] for row in rows]) for i in range(1, len(header))]
    return header, rows + [[name] + [st[name] for st in stats] for name in SUMMARY_ROWS]
