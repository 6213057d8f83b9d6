"""RunMetrics, the one record of a run's per-patient scores that both reports read."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from microseg.runs.record import RunMetrics, RunRecord

ROWS = [
    {"case_id": "01", "dsc": "0.8", "hd95_mm": "2.5"},
    {"case_id": "02", "dsc": "", "hd95_mm": "3.5"},  # an empty prediction: no DSC
    {"case_id": "03", "dsc": "0.6", "hd95_mm": "nan"},
    {"case_id": "mean", "dsc": "0.7", "hd95_mm": "3.0"},
    {"case_id": "std", "dsc": "0.1", "hd95_mm": "0.5"},
    {"case_id": "median", "dsc": "0.7", "hd95_mm": "3.0"},
]


def test_a_per_patient_csv_without_its_summary_rows():
    metrics = RunMetrics.from_rows(ROWS)
    assert list(metrics) == ["01", "02", "03"]
    assert metrics["01"] == {"dsc": 0.8, "hd95_mm": 2.5} and math.isnan(metrics["02"]["dsc"])


def test_values_absent_are_nan_and_the_mean_leaves_them_out():
    metrics = RunMetrics.from_rows(ROWS)
    assert metrics.value("01", "hd95_mm") == 2.5
    assert all(math.isnan(v) for v in (metrics.value("04", "dsc"), metrics.value("01", "hard_dsc")))
    assert metrics.mean("dsc") == pytest.approx(0.7) and metrics.mean("hd95_mm") == pytest.approx(3.0)
    assert math.isnan(metrics.mean("hard_dsc")) and math.isnan(RunMetrics().mean("dsc"))


def test_a_run_record_holds_its_scores_as_run_metrics():
    record = RunRecord("a", "dice", [], {"01": {"dsc": 0.9}}, path=Path("runs/a"))
    assert isinstance(record.patients, RunMetrics) and record.patients.value("01", "dsc") == 0.9
    assert isinstance(RunRecord("b", "dice", []).patients, RunMetrics)
