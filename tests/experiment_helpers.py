"""Shared by the experiment tests (tests/experiments, tests/demo): an `experiment run` command line of
the tiny model, and the patients of a per-patient CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from microseg.core.tables import SUMMARY_ROWS

BASE = [
    "--model",
    "tiny",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--optimizer",
    "adam",
    "--lr",
    "3e-3",
    "--num-workers",
    "0",
]


def experiment_args(cache, phantom, out, losses=("focal", "ag_bce"), seeds=(1, 2), folds=0) -> list:
    return [
        "experiment",
        "run",
        "--out",
        out,
        "--losses",
        *losses,
        "--seeds",
        *seeds,
        "--folds",
        folds,
        "--cache",
        cache,
        "--data",
        phantom,
        *BASE,
    ]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def patients_of(csv_path: Path) -> list[str]:
    return [row["case_id"] for row in csv_rows(csv_path) if row["case_id"] not in SUMMARY_ROWS]
