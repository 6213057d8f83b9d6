"""Reading a run folder for reports: its config, history and evaluation, as one `RunRecord`; a run's
per-patient scores as one `RunMetrics`, the record both reports read."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from microseg.core.errors import MicrosegError, warn
from microseg.core.tables import SUMMARY_ROWS, number, read_csv
from microseg.runs.config import load_config
from microseg.runs.folder import RunFolder, file_sha256


class RunMetrics(dict[str, dict[str, float]]):
    """A run's scores on one split, per patient: case_id -> metric -> value (its per_patient.csv without
    the mean, std and median rows). What the reports read of a run's evaluation, and of an
    experiment's out-of-fold scores of one loss and seed."""

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, str]]) -> RunMetrics:
        """A per_patient.csv's rows (`microseg.core.tables.read_csv`), numbers read with `number` (NaN
        for an empty or unreadable value), the summary rows left out."""
        return cls(
            (row["case_id"], {k: number(v) for k, v in row.items() if k != "case_id"})
            for row in rows
            if row["case_id"] not in SUMMARY_ROWS
        )

    def value(self, case: str, key: str) -> float:
        """The patient's `key`: NaN when the patient or its score is not there."""
        return self.get(case, {}).get(key, math.nan)

    def mean(self, key: str) -> float:
        """The mean of `key` over the patients that have one (NaN left out); NaN when none has."""
        values = [v for v in (p.get(key, math.nan) for p in self.values()) if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan


@dataclass
class RunRecord:
    """What `compare` needs of one run folder."""

    name: str
    loss: str
    history: list[dict[str, float]]
    patients: RunMetrics = field(default_factory=RunMetrics)  # metrics/per_patient.csv
    slices: list[dict] = field(default_factory=list)  # metrics/per_slice.csv rows
    evaluation: dict = field(default_factory=dict)  # metrics/evaluation.json: data, split, protocol
    path: Path = Path()
    config: dict = field(default_factory=dict)  # config.yaml: model, epochs, cache ...

    def __post_init__(self) -> None:
        if not isinstance(self.patients, RunMetrics):  # given as a plain mapping
            self.patients = RunMetrics(self.patients)

    @property
    def label(self) -> str:
        """The run's name, with its loss when the name does not already say it."""
        return self.name if self.name == self.loss else f"{self.name} ({self.loss})"


def load_run(run: Path) -> RunRecord:
    """Read a run folder for `compare`; MicrosegError when it is missing or holds no history."""
    folder = RunFolder(run)
    if not folder.path.is_dir():
        raise MicrosegError(f"run folder not found: {folder.path}")
    config = load_config(folder.config)
    if not folder.history.is_file():
        raise MicrosegError(f"{folder.path} has no history.csv: train it first (microseg train --run {folder.path})")
    history = [{k: number(v) for k, v in row.items()} for row in read_csv(folder.history)]
    record = RunRecord(folder.path.name, config.loss, history, path=folder.path, config=config.to_dict())
    if folder.per_patient.is_file():
        record.patients = RunMetrics.from_rows(read_csv(folder.per_patient))
    if folder.per_slice.is_file():
        record.slices = [
            {k: v if k == "case_id" else number(v) for k, v in row.items()} for row in read_csv(folder.per_slice)
        ]
    if folder.evaluation.is_file():
        record.evaluation = json.loads(folder.evaluation.read_text())
        _require_current_metrics(folder, record.evaluation)
    return record


def _require_current_metrics(folder: RunFolder, evaluation: dict) -> None:
    """Refuse metrics that scored a checkpoint which is no longer the run's (retrained, resumed,
    replaced since): the checkpoint evaluate would use now must be the one they recorded."""
    scored, digest = evaluation.get("checkpoint"), evaluation.get("checkpoint_sha256")
    if digest is None:
        warn(
            f"{folder.evaluation} does not record which checkpoint it scored (an earlier release's "
            f"evaluation): evaluate {folder.path} again to be sure its metrics are its model's"
        )
        return
    current = folder.checkpoint_path()
    if current.name != scored or file_sha256(current) != digest:
        raise MicrosegError(
            f"the metrics of {folder.path} scored {scored} of epoch "
            f"{evaluation.get('checkpoint_epoch', '?')}, which is no longer the run's model "
            f"({current.name} has changed since): evaluate the run again before comparing it"
        )
