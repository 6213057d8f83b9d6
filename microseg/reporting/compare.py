"""`microseg compare PATH... --out DIR`: run folders or experiment folders, decided here.

Folders holding experiment.json are experiments (`microseg.reporting.experiment_report`), any other
are run folders (`microseg.reporting.runs_report`); a mix is refused, and so are the options of the
other kind: --overlays and --cases draw run folders' predictions, --missing completes an
experiment's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from microseg.core.errors import MicrosegError
from microseg.reporting.experiment_analysis import is_experiment
from microseg.reporting.experiment_report import compare_experiments
from microseg.reporting.runs_report import compare_runs


def compare(
    paths: Sequence[str | Path],
    out: str | Path,
    overlays: bool = False,
    cases: str | None = None,
    missing: str | None = None,
) -> Path:
    """Compare run folders (patient by patient; `cases` implies `overlays`) or experiment folders (their
    losses over seeds and folds; `missing` "worst", the default, or "drop"); the path of report.md."""
    experiments = [path for path in paths if is_experiment(path)]
    if experiments:
        if len(experiments) < len(paths):
            other = next(path for path in paths if not is_experiment(path))
            raise MicrosegError(
                f"{other} is not an experiment folder (no experiment.json) but {experiments[0]} "
                "is: compare run folders or experiment folders, not both"
            )
        if overlays or cases:
            raise MicrosegError(
                "--overlays and --cases draw run folders: compare an experiment's cells (its runs/ folders) for overlays"
            )
        return compare_experiments(paths, out, missing or "worst")
    if missing:
        raise MicrosegError("--missing applies to experiment folders: run folders are compared patient by patient")
    return compare_runs([Path(p) for p in paths], Path(out), overlays or bool(cases), cases)
