"""`compare EXP --out DIR`: the report of an experiment (losses x seeds x folds), answering which loss
is better, by how much, and how sure.

An experiment folder holds `experiment.json` (the plan and its cells: loss, seed, fold, run
folder), `splits.json` (the folds' training patients and the test patients) and one ordinary run
folder per cell, whose `metrics/` is its evaluation on the test split. Several experiments go into
one report when they split the patients alike and were evaluated alike (an experiment per loss,
say); a cell present in two is refused.

Every evaluated cell is a run of its loss; the runs of one loss (its seeds, and with folds each
seed's fold models) are its replicates, replicate "seed s, fold f" being the same slot for every
loss. `microseg.experiment_statistics` turns each metric into per-patient means over a loss's runs
(the patient stays the statistical unit), ranks, the bootstrap over patients and seeds, Holm-adjusted
paired Wilcoxon tests and the variance share. `DIR/` receives:
- `report.md`: what was compared, the results paragraph (`experiment_paragraph`), every table below
  and the figures;
- `losses.csv`: per loss its runs, mean DSC and HD95 with the seed-to-seed sd of the run means,
  ranks and the share of resamples in which it ranks first; the raters' means beside them;
- `curves.png` + `curves.csv`: own loss, common-ruler BCE and validation DSC per epoch, the mean
  over a loss's runs with a min-max band (and n, sd);
- `per_patient.csv` + `dot_box.png`: per-patient DSC and HD95 per loss (means over its runs);
- `ranking.csv` + `ranking.png`: how often each loss takes each rank (blob plot);
- `significance.csv` + `significance.png`: every pair x metric: mean difference, its bootstrap CI
  over patients and seeds, Wilcoxon p, Holm-adjusted p, seed noise;
- `variance.csv`: the share of the variance of the run means the loss explains;
- `oof.csv` (with folds): per loss the mean, seed sd and rank of the out-of-fold scores of the
  training patients (`EXP/oof/per_patient.csv`);
- `cells.csv`: every cell and its state.
The folder is written whole or not at all (a temporary folder renamed into place); it replaces an
earlier report there, and an --out holding anything else is refused.
Refused (one line, nothing written): a folder that is not an experiment, a corrupt experiment.json
or splits.json, run folders and experiments mixed, experiments of different splits, cells
evaluated on different splits, protocols or patients, an experiment with no evaluated cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from microseg.atomic import atomic_folder, write_text
from microseg.errors import MicrosegError, warn
from microseg.experiment import Cell, Experiment, Plan, load_experiment
from microseg.experiment_statistics import (
    LossDifference,
    Scores,
    VarianceShare,
    bootstrap_means,
    build_scores,
    loss_differences,
    rank_frequencies,
    ranks,
    variance_share,
)
from microseg.figures import plot_curve_bands, plot_dot_box, plot_rank_blobs, plot_significance_map, run_colours
from microseg.report import rater_names, require_same_evaluation
from microseg.run_record import RunRecord, load_run
from microseg.significance import ALPHA, BOOTSTRAP_RESAMPLES, min_wilcoxon_p
from microseg.tables import SUMMARY_ROWS, markdown_table, write_csv

SPLITS_FILE = "splits.json"
METRICS = (("dsc", "DSC", True, 4), ("hd95_mm", "HD95 (mm)", False, 3))
"""(per-patient key, title, higher is better, decimals) of the metrics ranked and tested."""
CURVES = (("loss", "own loss"), ("bce", "BCE"), ("val_dsc", "val DSC"))
BAND = "min-max over seeds and folds"


def is_experiment(path: str | Path) -> bool:
    """True when `path` is a folder holding experiment.json."""
    return (Path(path) / "experiment.json").is_file()


def replicate(cell: Cell) -> str:
    """The replicate slot a cell fills for its loss: "seed S" or "seed S fold F"."""
    return f"seed {cell.seed}" + ("" if cell.fold is None else f" fold {cell.fold}")


def read_splits(experiment: Experiment) -> dict:
    """The experiment's splits.json as {"folds": [sorted ids, ...], "test": sorted ids}, to compare."""
    splits = experiment.splits()
    return {"folds": [sorted(fold) for fold in splits.folds], "test": sorted(splits.test)}


def read_oof(experiment: Experiment) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """EXP/oof/per_patient.csv (written with folds): (loss, "seed S") -> patient -> metric; nothing
    when absent. Refused, naming the file: a last line cut short, a row of more or fewer fields than
    the header, no loss, seed (an integer), case_id, dsc or hd95_mm column, a metric that is not a
    number (empty: NaN), a patient twice for one loss and seed (each is out of fold once), or a loss
    and seed whose patients are not exactly those of the folds."""
    import csv

    source = experiment.oof_file
    if not source.is_file():
        return {}
    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError):
        raise MicrosegError(f"{source} is not readable") from None
    if not text.endswith("\n"):
        raise MicrosegError(f"{source} is truncated: its last line is cut (remove it; `experiment run` rewrites it)")
    header, *rows = list(csv.reader(text.splitlines())) or [[]]
    if not {"loss", "seed", "case_id", *(key for key, *_ in METRICS)} <= set(header):
        raise MicrosegError(f"{source} needs loss, seed, case_id, dsc and hd95_mm columns")
    found: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for line, fields in enumerate(rows, start=2):
        if len(fields) != len(header):
            raise MicrosegError(f"{source}: line {line} has {len(fields)} fields, the header {len(header)}")
        row = dict(zip(header, fields))
        if not row["seed"].lstrip("-").isdigit():
            raise MicrosegError(f"{source}: line {line}: seed {row['seed']!r} is not an integer")
        if row["case_id"] in SUMMARY_ROWS:
            continue
        patients = found.setdefault((row["loss"], f"seed {int(row['seed'])}"), {})
        if row["case_id"] in patients:
            raise MicrosegError(
                f"{source}: patient {row['case_id']} appears twice for loss {row['loss']}, "
                f"seed {row['seed']}; each training patient is out of fold once"
            )
        patients[row["case_id"]] = {}
        for key, value in row.items():
            if key in ("loss", "seed", "case_id"):
                continue
            try:
                patients[row["case_id"]][key] = float(value) if value else math.nan
            except ValueError:
                raise MicrosegError(f"{source}: line {line}: {key} {value!r} is not a number") from None
    if not found:
        raise MicrosegError(f"{source} holds no patient")
    held_out = {patient for fold in experiment.splits().folds for patient in fold}
    for (loss, seed), patients in found.items():
        if set(patients) != held_out:
            missing, extra = sorted(held_out - set(patients)), sorted(set(patients) - held_out)
            raise MicrosegError(
                f"{source}: loss {loss}, {seed} holds {len(patients)} of the folds' {len(held_out)} patients"
                + (f" (missing {', '.join(missing)})" if missing else "")
                + (f" (not in the folds: {', '.join(extra)})" if extra else "")
            )
    return found


@dataclass
class Experiments:
    """The cells of one or more experiments read for a report, and what was found in their run folders."""

    paths: list[Path]
    plans: list[Plan]
    splits: dict
    cells: list[Cell]
    records: dict[str, RunRecord] = field(default_factory=dict)  # cell id -> its run (trained cells)
    oof: dict[tuple[str, str], dict[str, dict[str, float]]] = field(default_factory=dict)
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
    plans: list[Plan] = []
    cells: list[Cell] = []
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
        for cell in experiment.cells:
            key = (cell.loss, cell.seed, cell.fold)
            if key in seen:
                raise MicrosegError(
                    f"loss {cell.loss}, {replicate(cell)} is a cell of both {seen[key]} and {path}: "
                    "compare each cell once"
                )
            seen[key] = path
        plans.append(experiment.plan)
        cells += experiment.cells
        found.append(experiment)
    experiments = Experiments(paths, plans, splits or {"folds": [], "test": []}, cells)
    for experiment in found:
        for (loss, seed), patients in read_oof(experiment).items():
            if (loss, seed) in experiments.oof:
                raise MicrosegError(
                    f"loss {loss}, {seed} has out-of-fold scores in two experiments: compare each cell once"
                )
            experiments.oof[loss, seed] = patients
    for cell in cells:
        if (cell.run / "history.csv").is_file():
            experiments.records[cell.id] = load_run(cell.run)
    return experiments


def require_comparable(experiments: Experiments) -> None:
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
    missing = [c for c in experiments.cells if c not in evaluated]
    if missing:
        warn(
            f"{len(missing)} of {len(experiments.cells)} cells are left out, not evaluated yet: "
            + ", ".join(c.id for c in missing[:6])
            + (" ..." if len(missing) > 6 else "")
        )


@dataclass
class Analysis:
    """Everything the experiment report states."""

    experiments: Experiments
    losses: list[str]
    replicates: list[str]
    patients: list[str]
    scores: dict[str, Scores]  # metric key -> scores
    boot: dict[str, np.ndarray]  # metric key -> bootstrap means [B, loss]
    differences: list[LossDifference]
    variance: dict[str, VarianceShare]

    def title(self, key: str) -> str:
        return next(t for k, t, _, _ in METRICS if k == key)


def analyse(paths: list[Path]) -> Analysis:
    """Read, check and analyse experiment folders (nothing is written)."""
    experiments = read_experiments(paths)
    require_comparable(experiments)
    evaluated = experiments.evaluated
    losses = list(dict.fromkeys(c.loss for c in evaluated))
    replicates = list(dict.fromkeys(replicate(c) for c in sorted(evaluated, key=lambda c: (c.seed, c.fold or 0))))
    patients = sorted(experiments.records[evaluated[0].id].patients, key=lambda c: (len(c), c))
    per_run = {(c.loss, replicate(c)): experiments.records[c.id].patients for c in evaluated}
    scores = {key: build_scores(per_run, key, higher, losses, replicates, patients) for key, _, higher, _ in METRICS}
    boot = {key: bootstrap_means(s) for key, s in scores.items()}
    return Analysis(
        experiments,
        losses,
        replicates,
        patients,
        scores,
        boot,
        loss_differences(scores, boot),
        {key: variance_share(s.run_means()) for key, s in scores.items()},
    )


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _difference_text(d: LossDifference, analysis: Analysis) -> str:
    digits = next(n for k, _, _, n in METRICS if k == d.metric)
    unit = " mm" if d.metric == "hd95_mm" else ""
    lo, hi = d.ci95
    return (
        f"{d.a} - {d.b} on {analysis.title(d.metric).split(' ')[0]} {d.mean:+.{digits}f}{unit} (95% CI "
        f"{lo:+.{digits}f} to {hi:+.{digits}f}, adjusted p = {d.p_holm:.3g}, seed sd {_fmt(d.seed_noise, digits)})"
    )


def experiment_paragraph(analysis: Analysis) -> str:
    """The results in a few sentences: the ranking on each metric with its bootstrap stability,
    which differences survive Holm's correction over the family (every pair of losses x DSC and
    HD95) and which are within seed noise (smaller than one seed sd of the run means of either
    loss), the variance share of the loss, and the smallest p the patients allow."""
    n_losses, n_patients = len(analysis.losses), len(analysis.patients)
    runs = analysis.scores["dsc"].runs()
    sentences = [
        f"{n_losses} loss(es), {int(runs.min())}-{int(runs.max())} evaluated run(s) each"
        if runs.min() != runs.max()
        else f"{n_losses} loss(es), {int(runs.min())} evaluated run(s) each"
    ]
    sentences[0] += f", {n_patients} patients (per-patient means over a loss's runs)."
    for key, title, higher, digits in METRICS:
        s = analysis.scores[key]
        means, sd = s.loss_means(), s.seed_sd()
        order = np.argsort(ranks(means, higher), kind="stable")
        first = rank_frequencies(analysis.boot[key], higher)[:, 0]
        listed = ", ".join(f"{s.losses[i]} {_fmt(means[i], digits)} (seed sd {_fmt(sd[i], digits)})" for i in order)
        best = order[0]
        sentences.append(
            f"By mean {title}: {listed}"
            + (
                f"; {s.losses[best]} ranks first in {100 * first[best]:.0f}% of {BOOTSTRAP_RESAMPLES:,} bootstrap "
                "resamples of patients and seeds."
                if n_losses > 1
                else "."
            )
        )
    if n_losses > 1:
        diffs = analysis.differences
        tested = [d for d in diffs if not math.isnan(d.p_value)]
        family = (
            f"The family: {n_losses * (n_losses - 1) // 2} pair(s) of losses x DSC and HD95, {len(tested)} "
            "paired Wilcoxon tests on the per-patient means, Holm-adjusted"
        )
        surviving = [d for d in tested if d.significant]
        if surviving:
            real = [d for d in surviving if d.seed_noise <= abs(d.mean)]
            unknown = [d for d in surviving if math.isnan(d.seed_noise)]
            noisy = [d for d in surviving if d.within_seed_noise]
            text = f"{family}; {len(surviving)} survive the correction"
            if real:
                text += ", beyond seed noise: " + "; ".join(_difference_text(d, analysis) for d in real)
            if unknown:
                text += ", with the seed noise unknown (one run per loss): " + "; ".join(
                    _difference_text(d, analysis) for d in unknown
                )
            if noisy:
                text += (
                    ", but within seed noise (smaller than one seed sd of either loss, so another seed could "
                    "reverse them): " + "; ".join(_difference_text(d, analysis) for d in noisy)
                )
            sentences.append(text + ".")
        else:
            sentences.append(
                f"{family}; none survives the correction (smallest adjusted p "
                f"{min((d.p_holm for d in tested), default=math.nan):.3g})."
            )
        rest = [d for d in tested if not d.significant]
        if rest and surviving:
            sentences.append(
                "Not surviving it: "
                + "; ".join(
                    _difference_text(d, analysis) + (", within seed noise" if d.within_seed_noise else "") for d in rest
                )
                + "."
            )
        noise = [d for d in rest if d.within_seed_noise]
        if noise and not surviving:
            sentences.append(
                "Within seed noise (smaller than one seed sd of either loss): "
                + "; ".join(_difference_text(d, analysis) for d in noise)
                + "."
            )
        if np.all(np.isnan([d.seed_noise for d in diffs])):
            sentences.append(
                "With one run per loss the seed noise is unknown: train more seeds before trusting any difference."
            )
        floor = min_wilcoxon_p(n_patients)
        sentences.append(
            f"With {n_patients} patients no Wilcoxon p can be below 2 / 2^{n_patients} = {floor:.3g}, "
            f"and after Holm over {len(tested)} tests no adjusted p below {len(tested) * floor:.3g}"
            + (": no difference can reach significance, however large." if len(tested) * floor >= ALPHA else ".")
        )
    shares = [
        f"{100 * v.loss_share:.0f}% on {analysis.title(k).split(' ')[0]} (chance level {100 * v.chance_share:.0f}%)"
        for k, v in analysis.variance.items()
        if not math.isnan(v.loss_share)
    ]
    replicated = all(v.n_runs > v.n_losses for v in analysis.variance.values())
    if shares and n_losses > 1 and replicated:
        sentences.append(
            "The loss explains " + " and ".join(shares) + " of the variance of the run means; the "
            "rest is between seeds (and folds)."
        )
    return " ".join(sentences)


def summary_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    """Per loss: runs, mean and seed sd, rank and P(rank 1) of each metric; then the raters' means."""
    header = ["loss", "runs"]
    for _, title, _, _ in METRICS:
        header += [f"{title} mean", f"{title} seed sd", f"{title} rank", f"{title} P(rank 1)"]
    columns = []
    for key, _, higher, _ in METRICS:
        s = analysis.scores[key]
        means = s.loss_means()
        columns.append((means, s.seed_sd(), ranks(means, higher), rank_frequencies(analysis.boot[key], higher)[:, 0]))
    rows = []
    for i, loss in enumerate(analysis.losses):
        row = [loss, int(analysis.scores["dsc"].runs()[i])]
        for means, sd, rank, first in columns:
            row += [float(means[i]), float(sd[i]), int(rank[i]), float(first[i])]
        rows.append(row)
    records = [analysis.experiments.records[c.id] for c in analysis.experiments.evaluated]
    source = records[0]
    for rater in rater_names(records):
        row = [f"rater {rater}", "-"]
        for key, _, _, _ in METRICS:
            values = [p.get(f"{rater}_{key}", math.nan) for p in source.patients.values()]
            valid = [v for v in values if not math.isnan(v)]
            row += [float(np.mean(valid)) if valid else math.nan, "-", "-", "-"]
        rows.append(row)
    return header, rows


def curve_rows(analysis: Analysis) -> tuple[dict[str, dict[str, list[list[float]]]], list[list]]:
    """Per loss and history column (CURVES), per epoch over the loss's trained runs: the plot's
    (epoch, mean, min, max) and the CSV rows (loss, column, epoch, n, mean, sd, min, max)."""
    bands: dict[str, dict[str, list[list[float]]]] = {}
    rows = []
    experiments = analysis.experiments
    for loss in analysis.losses:
        histories = [
            experiments.records[c.id].history
            for c in experiments.cells
            if c.loss == loss and c.id in experiments.records
        ]
        for column, _ in CURVES:
            per_epoch: dict[float, list[float]] = {}
            for history in histories:
                for entry in history:
                    value = entry.get(column, math.nan)
                    if not math.isnan(value):
                        per_epoch.setdefault(entry["epoch"], []).append(value)
            for epoch in sorted(per_epoch):
                v = np.array(per_epoch[epoch])
                sd = float(v.std(ddof=1)) if v.size > 1 else math.nan
                bands.setdefault(loss, {}).setdefault(column, []).append([epoch, v.mean(), v.min(), v.max()])
                rows.append([loss, column, int(epoch), v.size, float(v.mean()), sd, float(v.min()), float(v.max())])
    return bands, rows


def epoch_table(csv_rows: list[list]) -> tuple[list[str], list[list]]:
    """One row per epoch, per loss and curve "mean ± sd" over its runs."""
    cell = {(r[0], r[1], r[2]): r for r in csv_rows}
    present = list(dict.fromkeys((r[0], r[1]) for r in csv_rows))
    names = dict(CURVES)
    header = ["epoch"] + [f"{loss} {names[column]}" for loss, column in present]
    table = []
    for epoch in sorted({r[2] for r in csv_rows}):
        row: list = [epoch]
        for loss, column in present:
            r = cell.get((loss, column, epoch))
            row.append("-" if r is None else f"{r[4]:.4f}" + ("" if math.isnan(r[5]) else f" ± {r[5]:.4f}"))
        table.append(row)
    return header, table


def patient_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    """One row per patient: each loss's DSC and HD95 averaged over its runs; mean, std and median rows."""
    from microseg.metrics import summarize

    header = ["case_id"] + [f"{loss} {title}" for loss in analysis.losses for _, title, _, _ in METRICS]
    means = {key: s.patient_means() for key, s in analysis.scores.items()}
    rows: list[list] = [
        [case] + [float(means[key][i, p]) for i in range(len(analysis.losses)) for key, _, _, _ in METRICS]
        for p, case in enumerate(analysis.patients)
    ]
    stats = [summarize([row[j] for row in rows]) for j in range(1, len(header))]
    return header, rows + [[name] + [st[name] for st in stats] for name in SUMMARY_ROWS]


def ranking_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    n = len(analysis.losses)
    header = ["metric", "loss", "observed rank"] + [f"P(rank {r})" for r in range(1, n + 1)]
    rows = []
    for key, title, higher, _ in METRICS:
        observed = ranks(analysis.scores[key].loss_means(), higher)
        freq = rank_frequencies(analysis.boot[key], higher)
        rows += [[title, loss, int(observed[i]), *map(float, freq[i])] for i, loss in enumerate(analysis.losses)]
    return header, rows


def significance_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    header = [
        "metric",
        "loss_a",
        "loss_b",
        "n",
        "mean_diff",
        "ci95_low",
        "ci95_high",
        "statistic",
        "p_value",
        "p_holm",
        "significant",
        "seed_noise",
        "within_seed_noise",
    ]
    rows = [
        [
            analysis.title(d.metric),
            d.a,
            d.b,
            d.n,
            d.mean,
            *d.ci95,
            d.statistic,
            d.p_value,
            d.p_holm,
            "yes" if d.significant else "no",
            d.seed_noise,
            "yes" if d.within_seed_noise else "no",
        ]
        for d in analysis.differences
    ]
    return header, rows


def oof_table(experiments: Experiments) -> tuple[list[str], list[list]] | None:
    """Cross-validation on the training patients: per loss its seeds, patients, mean and seed sd and
    rank of each metric over the out-of-fold scores (same statistics as the test split's); None
    without out-of-fold scores."""
    if not experiments.oof:
        return None
    losses = list(dict.fromkeys(loss for loss, _ in experiments.oof))
    seeds = list(dict.fromkeys(seed for _, seed in experiments.oof))
    patients = sorted(set().union(*experiments.oof.values()), key=lambda c: (len(c), c))
    header = ["loss", "seeds", "patients"]
    columns = []
    for key, title, higher, _ in METRICS:
        scores = build_scores(experiments.oof, key, higher, losses, seeds, patients)
        means = scores.loss_means()
        columns.append((means, scores.seed_sd(), ranks(means, higher)))
        header += [f"{title} mean", f"{title} seed sd", f"{title} rank"]
    rows = []
    for i, loss in enumerate(losses):
        runs = [seed for (name, seed) in experiments.oof if name == loss]
        row = [loss, len(runs), len(set().union(*(experiments.oof[loss, seed] for seed in runs)))]
        for means, sd, rank in columns:
            row += [float(means[i]), float(sd[i]), int(rank[i])]
        rows.append(row)
    return header, rows


def variance_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    header = ["metric", "losses", "runs", "SS_loss", "SS_seed", "SS_total", "loss share", "chance share"]
    rows = [
        [analysis.title(key), v.n_losses, v.n_runs, v.ss_loss, v.ss_seed, v.ss_total, v.loss_share, v.chance_share]
        for key, v in analysis.variance.items()
    ]
    return header, rows


def cells_table(experiments: Experiments) -> tuple[list[str], list[list]]:
    header = ["cell", "loss", "seed", "fold", "run", "state", "epochs", "patients", "mean DSC", "mean HD95 (mm)"]
    rows = []
    for c in experiments.cells:
        record = experiments.records.get(c.id)
        patients = record.patients if record else {}
        means = []
        for key in ("dsc", "hd95_mm"):
            values = [v for v in (p.get(key, math.nan) for p in patients.values()) if not math.isnan(v)]
            means.append(float(np.mean(values)) if values else math.nan)
        rows.append(
            [
                c.id,
                c.loss,
                c.seed,
                "-" if c.fold is None else c.fold,
                str(c.run),
                experiments.state(c),
                len(record.history) if record else 0,
                len(patients),
                *means,
            ]
        )
    return header, rows


def _significance_cells(analysis: Analysis) -> dict[str, dict[tuple[int, int], tuple[float, float]]]:
    """Per metric title: (row, column) -> (row better than column by, adjusted p), both orders."""
    index = {loss: i for i, loss in enumerate(analysis.losses)}
    cells: dict[str, dict[tuple[int, int], tuple[float, float]]] = {}
    for d in analysis.differences:
        higher = next(h for k, _, h, _ in METRICS if k == d.metric)
        gain = d.mean if higher else -d.mean
        pairs = cells.setdefault(analysis.title(d.metric), {})
        pairs[index[d.a], index[d.b]] = (gain, d.p_holm)
        pairs[index[d.b], index[d.a]] = (-gain, d.p_holm)
    return cells


def _compared(analysis: Analysis) -> list[str]:
    experiments = analysis.experiments
    first = experiments.records[experiments.evaluated[0].id]
    ev = first.evaluation
    lines: list[str] = ["## What was compared", ""]
    for path, plan in zip(experiments.paths, experiments.plans):
        options = ", ".join(f"{k} {v}" for k, v in plan.base.items())
        lines.append(
            f"- {path}: losses {', '.join(plan.losses)}; seeds {', '.join(map(str, plan.seeds))}; "
            + ("no folds (the fixed train/test split)" if plan.folds == 0 else f"{plan.folds} folds")
            + (f"; base options: {options}" if options else "")
        )
    folds = len(experiments.splits["folds"])
    lines += [
        "",
        f"Replicates of each loss: {'; '.join(analysis.replicates)}"
        + (f" ({folds}-fold cross-validation of the training patients; every fold's model is one run)" if folds else "")
        + ".",
        f"Data: {ev.get('data', '?')}; split {ev.get('split', '?')}, protocol {ev.get('protocol', '?')}; "
        f"{len(analysis.patients)} patients ({', '.join(analysis.patients)}); "
        f"{len(experiments.evaluated)} of {len(experiments.cells)} cells evaluated "
        f"(every cell in [cells.csv](cells.csv)).",
        "",
    ]
    return lines


class _Writer:
    """report.md's sections; each table also goes to `<out>/<stem>.csv`."""

    def __init__(self, out: Path):
        self.out = out
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(
        self,
        stem: str,
        title: str,
        header: list[str],
        rows: list[list],
        notes: Sequence[str] = (),
        shown: tuple[list[str], list[list]] | None = None,
    ) -> None:
        """`rows` into `<stem>.csv`; in report.md the title, the notes, then `shown` (default: the same table)."""
        write_csv(self.out / f"{stem}.csv", header, rows)
        md_header, md_rows = shown or (header, rows)
        self.add(
            f"## {title}",
            "",
            *notes,
            *([""] if notes else []),
            markdown_table(md_header, md_rows),
            "",
            f"([{stem}.csv]({stem}.csv))",
            "",
        )


def require_report_target(out: Path) -> None:
    """MicrosegError unless `out` is new, empty, or an earlier report (it holds report.md): the
    report replaces the folder whole, so nothing else may be in it."""
    if out.exists() and not out.is_dir():
        raise MicrosegError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.md").is_file():
        raise MicrosegError(f"--out {out} holds files that are not a report (no report.md): choose a new folder")


def write_report(analysis: Analysis, out: Path) -> Path:
    """Write the experiment report of `analysis` into `out`, whole or not at all (it replaces an
    earlier report there); returns the path of report.md."""
    out = Path(out)
    require_report_target(out)
    with atomic_folder(out) as folder:
        _write_report(analysis, folder)
    return out / "report.md"


def _write_report(analysis: Analysis, out: Path) -> None:
    colours = run_colours(analysis.losses)
    report = _Writer(out)
    report.add(
        "# Experiment comparison", "", *_compared(analysis), "## Results", "", experiment_paragraph(analysis), ""
    )
    report.table(
        "losses",
        "Losses: mean over patients of the per-patient means over runs, seed-to-seed sd of the run means, rank",
        *summary_table(analysis),
        [
            "Ranks: aggregate-then-rank (1 = best, ties share the smallest). P(rank 1): the share of "
            f"{BOOTSTRAP_RESAMPLES:,} bootstrap resamples of patients and seeds in which the loss ranks first. "
            "Seed sd: the sd of the loss's run means (with folds every fold's model is a run, so it spans seeds "
            "and folds). Raters: the other annotators against the expert, on the same patients."
        ],
    )
    bands, rows = curve_rows(analysis)
    plot_curve_bands(bands, out / "curves.png", BAND, colours)
    report.table(
        "curves",
        f"Loss curves per epoch (mean ± sd over runs; band in the figure: {BAND})",
        ["loss", "curve", "epoch", "n", "mean", "sd", "min", "max"],
        rows,
        [
            "![loss curves](curves.png)",
            "",
            "The own loss is each loss's own scale; the BCE of the main output is a common ruler across losses.",
        ],
        shown=epoch_table(rows),
    )
    plot_dot_box(
        analysis.losses,
        {title: analysis.scores[key].patient_means() for key, title, _, _ in METRICS},
        out / "dot_box.png",
        colours,
    )
    report.table(
        "per_patient",
        "Per-patient DSC and HD95 per loss (mean over its runs)",
        *patient_table(analysis),
        ["![dot-and-box plot](dot_box.png)", "", "Each point is a patient; a patient's points are joined."],
    )
    titles = {key: title for key, title, _, _ in METRICS}
    plot_rank_blobs(
        analysis.losses,
        {titles[k]: rank_frequencies(analysis.boot[k], h) for k, _, h, _ in METRICS},
        {titles[k]: ranks(analysis.scores[k].loss_means(), h) for k, _, h, _ in METRICS},
        out / "ranking.png",
        colours,
    )
    report.table(
        "ranking",
        "Ranking stability",
        *ranking_table(analysis),
        [
            "![ranking stability](ranking.png)",
            "",
            f"{BOOTSTRAP_RESAMPLES:,} resamples; each draws the "
            "patients and the seed (and fold) slots with replacement, the same draws for every loss, and "
            "ranks the losses by their recomputed means.",
        ],
    )
    if len(analysis.losses) > 1:
        plot_significance_map(analysis.losses, _significance_cells(analysis), out / "significance.png", ALPHA)
        report.table(
            "significance",
            "Significance map: every pair of losses",
            *significance_table(analysis),
            [
                "![significance map](significance.png)",
                "",
                "Paired Wilcoxon signed-rank test (scipy) of the per-patient means over runs, loss_a - loss_b; "
                "p_holm: Holm-adjusted over the family of every pair of losses x DSC and HD95. CI: percentile "
                "bootstrap of the difference of the means over patients and seeds. seed_noise: the larger "
                "seed-to-seed sd of the two losses' run means; within it, another seed could reverse the "
                "difference.",
            ],
        )
    report.table(
        "variance",
        "How much of the spread is the loss, how much the seed",
        *variance_table(analysis),
        [
            "Run means u_lr (run r of loss l, mean over patients), ubar_l their mean per loss, ubar the grand "
            "mean of all N runs: SS_loss = sum_l n_l (ubar_l - ubar)^2, SS_seed = sum_lr (u_lr - ubar_l)^2, "
            "SS_total = SS_loss + SS_seed; loss share = SS_loss / SS_total (eta squared, one-way). With k "
            "losses and no loss effect at all it is still (k - 1) / (N - 1) on average (chance share)."
        ],
    )
    oof = oof_table(analysis.experiments)
    if oof:
        report.table(
            "oof",
            "Cross-validation: out-of-fold scores of the training patients",
            *oof,
            [
                "Each training patient scored once per loss and seed, by the fold model that did not train on "
                "it (EXP/oof/per_patient.csv); per-patient means over seeds, then the mean over patients, as "
                "on the test split. A fold model's best.pt was chosen on those same patients, so these scores "
                "lean optimistic; the tests and the ranking stability above are on the test split."
            ],
        )
    report.table("cells", "Cells", *cells_table(analysis.experiments))
    write_text(out / "report.md", "\n".join(report.lines))


def compare_experiments(paths: Sequence[str | Path], out: str | Path) -> Path:
    """`microseg compare EXP... --out DIR`: check, analyse and report experiment folders; report.md's path."""
    require_report_target(Path(out))
    return write_report(analyse([Path(p) for p in paths]), Path(out))
