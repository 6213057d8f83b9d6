"""An experiment report's analysis: the experiments read and checked, the design, the completed grid of
every metric and every statistic the report states (`analyse`; nothing is written).

An experiment folder holds `experiment.json` (the plan and its cells: loss, seed, fold, run
folder), `splits.json` (the folds' training patients and the test patients) and one ordinary run
folder per cell, whose `metrics/` is its evaluation on the test split. Several experiments go into
one report when they split the patients alike and were evaluated alike (an experiment per loss,
say); a cell present in two is refused.

The design: every loss x every replicate slot ("seed s" or "seed s fold f", the same slot for
every loss) x every test patient, one value per metric. Slots that some loss has no cell in (only
possible across experiments) are left out with a warning. Missing is worst (challengeR's default;
`microseg.stats.replicates`): a patient a cell left without a score (empty prediction), and
every patient of a cell with no evaluation (failed, not trained or not evaluated yet), counts as
the metric's worst value, DSC 0 and HD95 the largest image diagonal (mm) of the test patients,
read from the headers of the dataset's test images (`hd95_cap`); `--missing drop` drops instead.
On that complete grid: per-loss means, challengeR's two rankings with their bootstrap stability
(`microseg.stats.ranking`), the crossed-effects test of every pair with Holm-matched CIs
(`microseg.stats.differences`), the ANOVA of the run means, and the smallest difference the
design resolves (`microseg.stats.power`). The plan's `primary` metric (default DSC) carries
the verdict; the other is secondary.
Refused (one line): a folder that is not an experiment, a corrupt experiment.json or splits.json
or out-of-fold file, experiments of different splits or primary metrics, cells evaluated on
different splits, protocols or patients, an experiment with no evaluated cell, `--missing drop`
leaving no complete grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from microseg.core.errors import MicrosegError, warn
from microseg.core.tables import SUMMARY_ROWS
from microseg.experiments.experiment import Cell, Experiment, Plan, load_experiment
from microseg.reporting.runs_report import require_same_evaluation
from microseg.runs.folder import RunFolder
from microseg.runs.record import RunMetrics, RunRecord, load_run
from microseg.stats.differences import loss_differences
from microseg.stats.paired import ALPHA, PairedDifference
from microseg.stats.power import Components, family_alpha, pooled_components, seeds_needed, simulate_test
from microseg.stats.ranking import Ranking, rankings
from microseg.stats.replicates import (
    METRICS,
    Metric,
    Scores,
    VarianceSource,
    build_scores,
    drop_incomplete,
    fill_worst,
    variance_table,
)

if TYPE_CHECKING:
    from microseg.data.volumes import Geometry

SPLITS_FILE = "splits.json"
MISSING_RULES = ("worst", "drop")
"""How a score that is not there enters the statistics: as the metric's worst value, or dropped."""


def is_experiment(path: str | Path) -> bool:
    """True when `path` is a folder holding experiment.json."""
    return (Path(path) / "experiment.json").is_file()


def replicate(cell: Cell) -> str:
    """The replicate slot a cell fills for its loss: "seed S" or "seed S fold F"."""
    return slot_label((cell.seed, cell.fold))


def slot_label(slot: tuple[int, int | None]) -> str:
    return f"seed {slot[0]}" + ("" if slot[1] is None else f" fold {slot[1]}")


def read_splits(experiment: Experiment) -> dict:
    """The experiment's splits.json as {"folds": [sorted ids, ...], "test": sorted ids}, to compare."""
    splits = experiment.splits()
    return {"folds": [sorted(fold) for fold in splits.folds], "test": sorted(splits.test)}


def read_oof(experiment: Experiment) -> dict[tuple[str, str], RunMetrics]:
    """EXP/oof/per_patient.csv (written with folds): (loss, "seed S") -> patient -> metric; nothing
    when absent. Refused, naming the file: a last line cut short, a row of more or fewer fields than
    the header, no loss, seed (an integer), case_id, dsc or hd95_mm column, a metric that is not a
    number (empty: NaN), a patient twice for one loss and seed (each is out of fold once), or a loss
    and seed whose patients are not exactly those of the folds."""
    source = experiment.oof_file
    if not source.is_file():
        return {}
    header, rows = _oof_table(source)
    found: dict[tuple[str, str], RunMetrics] = {}
    for line, fields in enumerate(rows, start=2):
        if len(fields) != len(header):
            raise MicrosegError(f"{source}: line {line} has {len(fields)} fields, the header {len(header)}")
        row = dict(zip(header, fields, strict=True))
        if not row["seed"].lstrip("-").isdigit():
            raise MicrosegError(f"{source}: line {line}: seed {row['seed']!r} is not an integer")
        if row["case_id"] in SUMMARY_ROWS:
            continue
        patients = found.setdefault((row["loss"], f"seed {int(row['seed'])}"), RunMetrics())
        if row["case_id"] in patients:
            raise MicrosegError(
                f"{source}: patient {row['case_id']} appears twice for loss {row['loss']}, "
                f"seed {row['seed']}; each training patient is out of fold once"
            )
        patients[row["case_id"]] = _oof_scores(f"{source}: line {line}", row)
    if not found:
        raise MicrosegError(f"{source} holds no patient")
    _require_folds_patients(source, found, {patient for fold in experiment.splits().folds for patient in fold})
    return found


def _oof_table(source: Path) -> tuple[list[str], list[list[str]]]:
    """The header and rows of an out-of-fold CSV, refused when unreadable, cut short or missing a column."""
    import csv

    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError):
        raise MicrosegError(f"{source} is not readable") from None
    if not text.endswith("\n"):
        raise MicrosegError(f"{source} is truncated: its last line is cut (remove it; `experiment run` rewrites it)")
    header, *rows = list(csv.reader(text.splitlines())) or [[]]
    if not {"loss", "seed", "case_id", *(m.key for m in METRICS)} <= set(header):
        raise MicrosegError(f"{source} needs loss, seed, case_id, dsc and hd95_mm columns")
    return header, rows


def _oof_scores(where: str, row: dict[str, str]) -> dict[str, float]:
    """A row's metrics (every column but loss, seed and case_id) as numbers, empty as NaN."""
    scores = {}
    for key, value in row.items():
        if key in ("loss", "seed", "case_id"):
            continue
        try:
            scores[key] = float(value) if value else math.nan
        except ValueError:
            raise MicrosegError(f"{where}: {key} {value!r} is not a number") from None
    return scores


def _require_folds_patients(source: Path, found: dict[tuple[str, str], RunMetrics], held_out: set[str]) -> None:
    """Refuse a loss and seed whose out-of-fold patients are not exactly the folds' patients."""
    for (loss, seed), patients in found.items():
        if set(patients) != held_out:
            missing, extra = sorted(held_out - set(patients)), sorted(set(patients) - held_out)
            raise MicrosegError(
                f"{source}: loss {loss}, {seed} holds {len(patients)} of the folds' {len(held_out)} patients"
                + (f" (missing {', '.join(missing)})" if missing else "")
                + (f" (not in the folds: {', '.join(extra)})" if extra else "")
            )


@dataclass
class Experiments:
    """The cells of one or more experiments read for a report, and what was found in their run folders."""

    paths: list[Path]
    plans: list[Plan]
    splits: dict
    cells: list[Cell]
    records: dict[str, RunRecord] = field(default_factory=dict)  # cell id -> its run (trained cells)
    oof: dict[tuple[str, str], RunMetrics] = field(default_factory=dict)
    """(loss, "seed S") -> patient -> metric: the out-of-fold scores of the training patients (folds only)."""

    def state(self, cell: Cell) -> str:
        record = self.records.get(cell.id)
        if record is None:
            return "not trained"
        return "evaluated" if record.patients else "trained, not evaluated"

    @property
    def evaluated(self) -> list[Cell]:
        return [c for c in self.cells if self.state(c) == "evaluated"]

    @property
    def losses(self) -> list[str]:
        return list(dict.fromkeys(c.loss for c in self.cells))


def read_experiments(paths: list[Path]) -> Experiments:
    """Read experiment folders for one report; MicrosegError when they cannot go into one."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_dir():
            raise MicrosegError(f"experiment folder not found: {path}")
    found: list[Experiment] = []
    splits = None
    seen: dict[tuple, Path] = {}
    for path in paths:
        experiment = load_experiment(path)
        these = read_splits(experiment)
        if splits is not None and these != splits:
            raise MicrosegError(
                f"{paths[0]} and {path} split the patients differently ({SPLITS_FILE} differ): "
                "their cells cannot be compared on the same patients"
            )
        splits = these
        _claim_cells(experiment.cells, path, seen)
        found.append(experiment)
    cells = [cell for experiment in found for cell in experiment.cells]
    experiments = Experiments(paths, [e.plan for e in found], splits or {"folds": [], "test": []}, cells)
    for experiment in found:
        for (loss, seed), patients in read_oof(experiment).items():
            if (loss, seed) in experiments.oof:
                raise MicrosegError(
                    f"loss {loss}, {seed} has out-of-fold scores in two experiments: compare each cell once"
                )
            experiments.oof[loss, seed] = patients
    for cell in cells:
        if RunFolder(cell.run).history.is_file():
            experiments.records[cell.id] = load_run(cell.run)
    return experiments


def _claim_cells(cells: list[Cell], path: Path, seen: dict[tuple, Path]) -> None:
    """Record in `seen` (loss, seed, fold) -> experiment folder the cells of `path`; refuse one seen before."""
    for cell in cells:
        key = (cell.loss, cell.seed, cell.fold)
        if key in seen:
            raise MicrosegError(
                f"loss {cell.loss}, {replicate(cell)} is a cell of both {seen[key]} and {path}: compare each cell once"
            )
        seen[key] = path


def require_comparable(experiments: Experiments, missing: str = "worst") -> None:
    """MicrosegError unless some cell is evaluated and every evaluated cell was evaluated on the same
    split, protocol and patients (the test split's patients of splits.json when the split is test)."""
    evaluated = experiments.evaluated
    if not evaluated:
        where = ", ".join(map(str, experiments.paths))
        raise MicrosegError(
            f"no cell of {where} has been evaluated ({len(experiments.cells)} cells, "
            f"{len(experiments.records)} trained): run the experiment to the end first"
        )
    records = [experiments.records[c.id] for c in evaluated]
    require_same_evaluation(records)
    first = evaluated[0]
    patients = set(experiments.records[first.id].patients)
    for cell in evaluated[1:]:
        other = set(experiments.records[cell.id].patients)
        if other != patients:
            extra = sorted(other ^ patients)[:5]
            raise MicrosegError(
                f"cell {cell.run} scored other patients than {first.run} (differing: "
                f"{', '.join(extra)}): evaluate every cell on the same split"
            )
    test = set(experiments.splits["test"])
    if records[0].evaluation.get("split") == "test" and test and patients != test:
        raise MicrosegError(
            f"cell {first.run} was evaluated on {len(patients)} patients that are not the "
            f"{len(test)} test patients of {experiments.paths[0] / SPLITS_FILE}"
        )
    missing_cells = [c for c in experiments.cells if c not in evaluated]
    if missing_cells:
        warn(
            f"{len(missing_cells)} of {len(experiments.cells)} cells are not evaluated ("
            + ", ".join(c.id for c in missing_cells[:6])
            + (" ..." if len(missing_cells) > 6 else "")
            + ("): each counts as the worst value of every metric" if missing == "worst" else "): dropped")
        )


def primary_metric(plans: Sequence[Plan]) -> str:
    """The plans' primary metric; MicrosegError when the compared experiments name different ones."""
    named = list(dict.fromkeys(plan.primary for plan in plans))
    if len(named) > 1:
        raise MicrosegError(
            f"the experiments name different primary metrics ({', '.join(named)}): compare experiments of one"
        )
    return named[0]


@dataclass
class Design:
    """The complete design of a report: every loss x the replicate slots every loss has a cell in."""

    losses: list[str]
    slots: list[tuple[int, int | None]]  # (seed, fold), by seed then fold
    folds: int  # slots per seed: the folds, 1 without
    left_out: list[Cell]  # cells of a slot that some loss has no cell in

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys(seed for seed, _ in self.slots))


def make_design(experiments: Experiments) -> Design:
    """The losses (in the order of their first cell), the slots common to every loss (a seed only
    with all its folds, so seeds and folds stay crossed) and the cells left out."""
    losses = experiments.losses
    per_loss = [{(c.seed, c.fold) for c in experiments.cells if c.loss == loss} for loss in losses]
    common = set.intersection(*per_loss)
    folds = max(1, len(experiments.splits["folds"]))
    by_seed: dict[int, list] = {}
    for slot in sorted(common, key=lambda s: (s[0], -1 if s[1] is None else s[1])):
        by_seed.setdefault(slot[0], []).append(slot)
    slots = [slot for seed_slots in by_seed.values() if len(seed_slots) == folds for slot in seed_slots]
    left_out = [c for c in experiments.cells if (c.seed, c.fold) not in slots]
    if left_out:
        warn(
            f"{len(left_out)} cell(s) are left out, their seed or fold is not a cell of every loss: "
            + ", ".join(c.id for c in left_out[:6])
            + (" ..." if len(left_out) > 6 else "")
        )
    return Design(losses, slots, folds, left_out)


def image_diagonal(geometry: Geometry, volume: bool) -> float:
    """sqrt((H sy)^2 + (W sx)^2) in mm, the slice's diagonal (with `volume` the box's: + (Z sz)^2)."""
    (z, h, w), (sz, sy, sx) = geometry.shape, geometry.spacing
    return math.sqrt((h * sy) ** 2 + (w * sx) ** 2 + (volume * z * sz) ** 2)


def hd95_cap(evaluation: dict, patients: Sequence[str], observed: np.ndarray) -> tuple[float, str]:
    """HD95's worst value and where it comes from: the largest image diagonal (mm) of the patients'
    images in the evaluated dataset (headers only), at least the largest HD95 scored; when the images
    cannot be read, the largest HD95 scored. MicrosegError when neither is known."""
    from microseg.data.layout import find_cases
    from microseg.data.volumes import read_geometry

    largest = float(np.nanmax(observed)) if np.any(~np.isnan(observed)) else math.nan
    data, split, volume = (
        evaluation.get("data"),
        evaluation.get("split", "test"),
        evaluation.get("protocol") == "volume",
    )
    try:
        cases = {case.case_id: case for case in find_cases(Path(str(data)), str(split), require_non_expert=False)}
        diagonal = max(image_diagonal(read_geometry(cases[p].image), volume) for p in patients)
    except (MicrosegError, OSError, KeyError, TypeError, ValueError):
        if math.isnan(largest):
            raise MicrosegError(
                f"HD95 has no worst value: the images of {data} cannot be read for their diagonal and no "
                "patient has an HD95; compare with --missing drop"
            ) from None
        return largest, f"the largest HD95 scored in this comparison (the images of {data} are not readable)"
    text = f"the largest {'volume' if volume else 'image'} diagonal of the {len(patients)} patients' images in {data}"
    if largest > diagonal:
        return largest, f"the largest HD95 scored, above {text} ({diagonal:.1f} mm)"
    return diagonal, text


@dataclass
class MetricResults:
    """One metric's statistics: the scores as found, the complete grid, rankings and variance table."""

    metric: Metric
    raw: Scores  # NaN where there is no score (every patient of a cell with no evaluation)
    grid: Scores  # completed (missing is worst) or reduced (--missing drop): no NaN
    worst: float  # the value a missing score takes (NaN with --missing drop)
    rankings: dict[str, Ranking]
    variance: list[VarianceSource]


@dataclass
class Power:
    """What the design resolves on the primary metric (`microseg.stats.power`)."""

    components: Components
    alpha: float  # alpha / m
    pairs: int  # m
    rows: list[tuple[str, int, int, int, float]]  # (design, seeds, replicate slots, patients, detectable)
    target: tuple[PairedDifference, int | None] | None  # the largest unresolved pair and the seeds resolving it


@dataclass
class Analysis:
    """Everything the experiment report states."""

    experiments: Experiments
    design: Design
    patients: list[str]
    primary: str
    missing: str
    evaluated: np.ndarray  # [loss, slot]: the cell has an evaluation
    cap_source: str  # where HD95's worst value comes from ("" with --missing drop)
    results: dict[str, MetricResults]
    differences: list[PairedDifference]
    power: Power | None

    @property
    def losses(self) -> list[str]:
        return self.design.losses

    @property
    def replicates(self) -> list[str]:
        return [slot_label(slot) for slot in self.design.slots]

    def scores(self, key: str) -> Scores:
        return self.results[key].grid

    def missing_cells(self) -> list[str]:
        """'loss seed s' of every design cell with no evaluation."""
        return [
            f"{loss} {slot_label(slot)}"
            for i, loss in enumerate(self.losses)
            for j, slot in enumerate(self.design.slots)
            if not self.evaluated[i, j]
        ]

    def missing_scores(self, key: str) -> np.ndarray:
        """[loss]: patients without a score of metric `key` in the loss's evaluated cells."""
        missing = np.isnan(self.results[key].raw.values) & self.evaluated[:, :, None]
        return missing.sum(axis=(1, 2))


def analyse(paths: list[Path], missing: str = "worst") -> Analysis:
    """Read, check and analyse experiment folders (nothing is written)."""
    if missing not in MISSING_RULES:
        raise MicrosegError(f"--missing must be one of {', '.join(MISSING_RULES)}, got {missing!r}")
    experiments = read_experiments(paths)
    require_comparable(experiments, missing)
    primary = primary_metric(experiments.plans)
    design = make_design(experiments)
    labels = [slot_label(slot) for slot in design.slots]
    first = experiments.records[experiments.evaluated[0].id]
    patients = sorted(first.patients, key=lambda c: (len(c), c))
    per_run = {
        (c.loss, replicate(c)): experiments.records[c.id].patients
        for c in experiments.evaluated
        if (c.seed, c.fold) in design.slots
    }
    evaluated = np.array([[(loss, label) in per_run for label in labels] for loss in design.losses])
    raw = {m.key: build_scores(per_run, m.key, m.higher_is_better, design.losses, labels, patients) for m in METRICS}
    cap, cap_source = hd95_cap(first.evaluation, patients, raw["hd95_mm"].values) if missing == "worst" else (0, "")
    worst = {"dsc": 0.0, "hd95_mm": cap} if missing == "worst" else {m.key: math.nan for m in METRICS}
    results = {m.key: _metric_results(m, raw[m.key], worst[m.key], design) for m in METRICS}
    drop = missing == "drop"
    differences = loss_differences({k: (raw[k] if drop else r.grid) for k, r in results.items()}, primary, drop)
    analysis = Analysis(
        experiments, design, patients, primary, missing, evaluated, cap_source, results, differences, None
    )
    analysis.power = power_summary(analysis)
    return analysis


def _metric_results(m: Metric, raw: Scores, worst: float, design: Design) -> MetricResults:
    """The grid (worst-filled, or with NaN dropped seed by seed then patient by patient) and its statistics."""
    if math.isnan(worst):
        seeds = design.seeds
        blocks = [[i for i, slot in enumerate(design.slots) if slot[0] == seed] for seed in seeds]
        grid = drop_incomplete(raw, blocks)
        if not grid.values.size:
            raise MicrosegError(
                f"--missing drop leaves no complete grid of {m.short} (no seed with a score for every loss, "
                "or no patient scored by all of them): compare with --missing worst"
            )
    else:
        grid = fill_worst(raw, worst)
    n_losses, n_slots, _ = grid.values.shape
    run_means = grid.run_means().reshape(n_losses, n_slots // design.folds, design.folds)
    return MetricResults(m, raw, grid, worst, rankings(grid), variance_table(run_means))


def power_summary(analysis: Analysis) -> Power | None:
    """The smallest primary difference detectable with 80% power at this design and with 2x and 4x
    the seeds, and the seeds that would resolve the largest unresolved primary difference."""
    pairs = [d for d in analysis.differences if d.family == "primary"]
    components = pooled_components(pairs)
    if components is None:
        return None
    alpha, m = family_alpha(len(analysis.losses), ALPHA)
    folds = analysis.design.folds
    n_reps, n_patients = analysis.scores(analysis.primary).values.shape[1:]
    seeds = n_reps // folds
    rows = []
    for name, factor in (("this design", 1), ("2x the seeds", 2), ("4x the seeds", 4)):
        test = simulate_test(components, factor * seeds * folds, n_patients, alpha)
        rows.append((name, factor * seeds, factor * seeds * folds, n_patients, test.detectable()))
    unresolved = [d for d in pairs if not d.significant and abs(d.mean) > 0]
    target = None
    if unresolved:
        largest = max(unresolved, key=lambda d: abs(d.mean))
        target = (largest, seeds_needed(components, abs(largest.mean), folds, n_patients, alpha))
    return Power(components, alpha, m, rows, target)
