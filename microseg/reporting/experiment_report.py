"""`compare EXP --out DIR`: the report of an experiment (losses x seeds x folds), answering which loss
is better, by how much, and how sure: `microseg.reporting.experiment_analysis` reads, checks and analyses the
experiments; this module states the results. `DIR/` receives:
- `report.md`: what was compared (a note at the top when cells or scores are missing), the
  results paragraph (`experiment_paragraph`), every table below and the figures;
- `losses.csv`: per loss its cells, evaluated cells, missing scores, and per metric the mean, the
  sd of the run means, both ranks and the share of resamples in which it ranks first; the
  raters' means beside them;
- `curves.png` + `curves.csv`: own loss, common-ruler BCE and validation DSC per epoch, the mean
  over a loss's runs with a min-max band (and n, sd);
- `per_patient.csv` + `dot_box.png`: per-patient DSC and HD95 per loss (means over its slots);
- `ranking.csv` + `ranking.png`: both rankings, how often each loss takes each rank, Kendall's tau;
- `significance.csv` + `significance.png`: every pair x metric: the difference, SE, df, p, Holm's
  p, the CI at the matching level, the variance components, the Wilcoxon check;
- `variance.csv`: the ANOVA of the run means (loss, seed, fold, residual);
- `power.csv`: the smallest primary difference detectable with 80% power, at this design and with
  2x and 4x the seeds;
- `oof.csv` (with folds): per loss the mean, seed sd and rank of the out-of-fold scores of the
  training patients (`EXP/oof/per_patient.csv`; NaN scores left out);
- `cells.csv`: every cell and its state.
The folder is written by `microseg.reporting.writer` (whole or not at all, the --out guard), as the
runs report's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from microseg.reporting.experiment_analysis import Analysis, Experiments, analyse
from microseg.reporting.figures import (
    plot_curve_bands,
    plot_dot_box,
    plot_rank_blobs,
    plot_significance_map,
    run_colours,
)
from microseg.reporting.runs_report import rater_names
from microseg.reporting.sections import compared_section, data_fact, patient_table
from microseg.reporting.writer import ReportWriter, require_report_folder, write_report_folder
from microseg.stats.paired import ALPHA, BOOTSTRAP_RESAMPLES, PairedDifference
from microseg.stats.power import MAX_SEEDS, POWER
from microseg.stats.ranking import SCHEMES, ranks
from microseg.stats.replicates import METRICS, Metric, build_scores, metric

CURVES = (("loss", "own loss"), ("bce", "BCE"), ("val_dsc", "val DSC"))
BAND = "min-max over seeds and folds"


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _amount(m: Metric, value: float) -> str:
    """A difference in the metric's unit: "0.0123 DSC", "0.412 mm"."""
    return f"{_fmt(value, m.digits)}{m.unit or ' ' + m.title}"


def _level(level: float) -> str:
    return f"{100 * level:.4g}%"


def _verdict(d: PairedDifference, analysis: Analysis) -> str:
    """ "a is better than b by X (CI, adjusted p)", or "a vs b: not resolved ..." for one pair."""
    m = metric(d.metric)
    lo, hi = d.ci if m.higher_is_better else (-d.ci[1], -d.ci[0])  # of a's gain over b
    gain = d.mean if m.higher_is_better else -d.mean
    better, worse = (d.a, d.b) if gain >= 0 else (d.b, d.a)
    lo, hi = (lo, hi) if gain >= 0 else (-hi, -lo)
    interval = f"{_level(d.ci_level)} CI {_fmt(lo, m.digits)} to {_fmt(hi, m.digits)}, adjusted p {d.p_holm:.3g}"
    if d.significant:
        return f"{better} is better than {worse} by {_amount(m, abs(gain))} ({interval})"
    text = f"{better} vs {worse}: not resolved at this design ({better} ahead by {_amount(m, abs(gain))}, {interval})"
    power = analysis.power
    if d.family == "primary" and power is not None:
        text += f"; the smallest difference it can detect is {_amount(m, power.rows[0][4])}"
    return text


def _design_sentence(analysis: Analysis) -> str:
    design, seeds = analysis.design, len(analysis.design.seeds)
    folds = f" x {design.folds} folds" if design.folds > 1 else ""
    cells = len(design.losses) * len(design.slots)
    primary = metric(analysis.primary)
    secondary = ", ".join(m.short for m in METRICS if m.key != analysis.primary)
    return (
        f"{len(design.losses)} loss(es) x {seeds} seed(s){folds} = {cells} cells ({int(analysis.evaluated.sum())} "
        f"evaluated), {len(analysis.patients)} test patients; primary metric {primary.short}, secondary {secondary}."
    )


def _missing_sentence(analysis: Analysis) -> str:
    """What was missing and how it entered the statistics."""
    cells = analysis.missing_cells()
    scores = {m.key: analysis.missing_scores(m.key) for m in METRICS}
    if analysis.missing == "drop":
        return f"Missing values dropped (--missing drop): {_kept(analysis)}."
    if not cells and not any(s.sum() for s in scores.values()):
        return "No score is missing."
    parts = []
    if cells:
        parts.append(f"{len(cells)} cell(s) without an evaluation ({', '.join(cells)})")
    for m in METRICS:
        if scores[m.key].sum():
            per_loss = ", ".join(f"{loss} {n}" for loss, n in zip(analysis.losses, scores[m.key], strict=True) if n)
            parts.append(f"{int(scores[m.key].sum())} patient(s) without a {m.short} ({per_loss})")
    worst = " and ".join(f"{m.short} {_fmt(analysis.results[m.key].worst, m.digits)}{m.unit}" for m in METRICS)
    return f"Missing is worst: {'; '.join(parts)} count as the worst value ({worst})."


def _kept(analysis: Analysis) -> str:
    """What `--missing drop` kept of the design, per metric (the pairs' own grids are in significance.csv)."""
    kept = [
        f"{r.metric.short} {r.grid.values.shape[1]} of {len(analysis.design.slots)} replicate slots and "
        f"{r.grid.values.shape[2]} of {len(analysis.patients)} patients"
        for r in analysis.results.values()
    ]
    return "the statistics use " + "; ".join(kept)


def _ranking_sentence(analysis: Analysis, key: str) -> str:
    r = analysis.results[key]
    parts = []
    for scheme in SCHEMES:
        ranking = r.rankings[scheme]
        order = np.argsort(ranking.rank, kind="stable")
        digits = r.metric.digits if scheme == SCHEMES[0] else 2
        listed = ", ".join(f"{analysis.losses[i]} {_fmt(ranking.score[i], digits)}" for i in order)
        best = order[0]
        median, q25, q75 = ranking.tau_summary()
        parts.append(
            f"{scheme} {listed} ({analysis.losses[best]} first in {100 * ranking.frequencies[best, 0]:.0f}% of the "
            f"resamples; Kendall's tau with this ranking median {_fmt(median, 2)}, IQR {_fmt(q25, 2)} to {_fmt(q75, 2)})"
        )
    return (
        f"Ranking on {r.metric.short} (mean; mean rank), over {BOOTSTRAP_RESAMPLES:,} bootstrap resamples of seeds "
        "then patients: " + "; ".join(parts) + "."
    )


def _family_sentence(analysis: Analysis, key: str) -> str:
    pairs = [d for d in analysis.differences if d.metric == key]
    m = metric(key)
    if key == analysis.primary:
        head = (
            f"On {m.short} (primary; a t test of the paired differences with patients and seeds as crossed random "
            f"effects, Holm over its {len(pairs)} pair(s), each CI at the matching level): "
        )
    else:
        head = f"Secondary, {m.short} (the same test, Holm over its own {len(pairs)} pair(s)): "
    return head + "; ".join(_verdict(d, analysis) for d in pairs) + "."


def _variance_sentence(analysis: Analysis) -> str:
    r = analysis.results[analysis.primary]
    rows = {v.source: v for v in r.variance}
    if rows["residual"].df < 1 or not rows["total"].ss > 0:
        return ""
    parts = []
    for source in ("loss", "seed", "fold"):
        v = rows.get(source)
        if v is not None:
            sd = "" if source == "loss" else f"; {source} sd {_fmt(v.sd, r.metric.digits)}"
            parts.append(f"{100 * v.share:.0f}% is the {source}'s (F test p {v.p:.3g}{sd})")
    return (
        f"Of the variance of the run means on {r.metric.short}, "
        + ", ".join(parts)
        + f", {100 * rows['residual'].share:.0f}% the residual's (interactions)."
    )


def _power_sentence(analysis: Analysis) -> str:
    power = analysis.power
    if power is None:
        return ""
    m = metric(analysis.primary)
    (_, seeds, _, patients, now), *more = power.rows
    text = (
        f"At this design ({seeds} seed(s) x {patients} patients) the smallest {m.short} difference detectable with "
        f"{POWER:.0%} power at alpha {power.alpha:.3g} ({ALPHA} / {power.pairs}, Holm's first step) is "
        f"{_amount(m, now)}; " + ", ".join(f"with {s} seeds {_amount(m, d)}" for _, s, _, _, d in more) + "."
    )
    if power.target is not None:
        d, needed = power.target
        size = f"a difference of {_amount(m, abs(d.mean))} (the size of {d.a} - {d.b}, the largest unresolved one)"
        text += (
            f" To resolve {size} at {POWER:.0%} power with these {patients} patients, run {needed} seeds."
            if needed is not None
            else f" No number of seeds up to {MAX_SEEDS} resolves {size} with these {patients} patients "
            "(`microseg experiment power EXP --delta D --patients N` plans more)."
        )
    return text


def experiment_paragraph(analysis: Analysis) -> str:
    """The results in a few sentences: the design, what was missing, the verdict on the primary
    metric (each pair better by X with its CI and adjusted p, or not resolved with the smallest
    difference the design detects), both rankings, the secondary metric, the variance table and
    what more seeds would resolve."""
    sentences = [_design_sentence(analysis), _missing_sentence(analysis)]
    if len(analysis.losses) > 1:
        sentences.append(_family_sentence(analysis, analysis.primary))
    sentences.append(_ranking_sentence(analysis, analysis.primary))
    if len(analysis.losses) > 1:
        sentences += [_family_sentence(analysis, m.key) for m in METRICS if m.key != analysis.primary]
        sentences += [_variance_sentence(analysis), _power_sentence(analysis)]
        if len(analysis.design.slots) == 1:
            sentences.append(
                "With one run per loss the seed's variation is unknown and the tests are over patients only: "
                "train more seeds before trusting any difference."
            )
    return " ".join(s for s in sentences if s)


def summary_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    """Per loss: its cells, evaluated cells and cells without an evaluation; per metric the patients
    without a score in its evaluated cells, the mean, the sd of the run means, the aggregate-then-rank
    rank, the mean rank and rank-then-aggregate rank, P(rank 1) of the first; then the raters' means."""
    header = ["loss", "cells", "evaluated", "missing cells"]
    for m in METRICS:
        header += [f"{m.title} {name}" for name in ("missing scores", "mean", "seed sd", "rank", "mean rank")]
        header += [f"{m.title} rank-then-aggregate rank", f"{m.title} P(rank 1)"]
    rows = []
    for i, loss in enumerate(analysis.losses):
        done = int(analysis.evaluated[i].sum())
        row: list = [loss, len(analysis.design.slots), done, len(analysis.design.slots) - done]
        for m in METRICS:
            r = analysis.results[m.key]
            aggregate, by_patient = r.rankings[SCHEMES[0]], r.rankings[SCHEMES[1]]
            row += [int(analysis.missing_scores(m.key)[i]), float(r.grid.loss_means()[i])]
            row += [float(r.grid.seed_sd()[i]), int(aggregate.rank[i]), float(by_patient.score[i])]
            row += [int(by_patient.rank[i]), float(aggregate.frequencies[i, 0])]
        rows.append(row)
    records = [analysis.experiments.records[c.id] for c in analysis.experiments.evaluated]
    source = records[0]
    for rater in rater_names(records):
        row = [f"rater {rater}", "-", "-", "-"]
        for m in METRICS:
            row += ["-", source.patients.mean(f"{rater}_{m.key}"), "-", "-", "-", "-", "-"]
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


def loss_patient_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    """One row per patient: each loss's DSC and HD95, the mean over the replicate slots of the
    completed grid (missing scores at the worst value; with --missing drop, blank where dropped);
    mean, std and median rows."""
    columns = []
    for i, loss in enumerate(analysis.losses):
        for m in METRICS:
            grid = analysis.scores(m.key)
            means = grid.patient_means()[i]
            columns.append((f"{loss} {m.title}", {case: float(means[p]) for p, case in enumerate(grid.patients)}))
    return patient_table(analysis.patients, columns)


def ranking_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    """Per metric, scheme and loss: the score ranked (mean, or mean rank over patients), its rank,
    the share of resamples with each rank, and the scheme's Kendall's tau median and quartiles."""
    n = len(analysis.losses)
    header = ["metric", "scheme", "loss", "score", "rank"] + [f"P(rank {r})" for r in range(1, n + 1)]
    header += ["tau median", "tau q25", "tau q75"]
    rows = []
    for r in analysis.results.values():
        for scheme, ranking in r.rankings.items():
            tau = ranking.tau_summary()
            rows += [
                [r.metric.title, scheme, loss, float(ranking.score[i]), int(ranking.rank[i])]
                + [float(f) for f in ranking.frequencies[i]]
                + list(tau)
                for i, loss in enumerate(analysis.losses)
            ]
    return header, rows


SIGNIFICANCE_HEADER = [
    "metric",
    "family",
    "loss_a",
    "loss_b",
    "replicates",
    "patients",
    "mean_diff",
    "se",
    "df",
    "t",
    "p_value",
    "p_holm",
    "significant",
    "ci_level",
    "ci_low",
    "ci_high",
    "patient_sd",
    "replicate_sd",
    "residual_sd",
    "wilcoxon_statistic",
    "wilcoxon_p",
    "wilcoxon_p_holm",
]


def significance_table(analysis: Analysis) -> tuple[list[str], list[list]]:
    rows = [
        [
            metric(d.metric).title,
            d.family,
            d.a,
            d.b,
            d.replicates,
            d.patients,
            d.mean,
            d.se,
            d.df,
            d.t,
            d.p_value,
            d.p_holm,
            "yes" if d.significant else "no",
            d.ci_level,
            *d.ci,
            *(math.sqrt(v) for v in (d.s2_pat, d.s2_rep, d.s2_res)),
            d.wilcoxon_statistic,
            d.wilcoxon_p,
            d.wilcoxon_p_holm,
        ]
        for d in analysis.differences
    ]
    return list(SIGNIFICANCE_HEADER), rows


def variance_rows(analysis: Analysis) -> tuple[list[str], list[list]]:
    header = ["metric", "source", "df", "SS", "MS", "share", "F", "p", "sd"]
    rows = [
        [r.metric.title, v.source, v.df, v.ss, v.ms, v.share, v.f, v.p, v.sd]
        for r in analysis.results.values()
        for v in r.variance
    ]
    return header, rows


def power_table(analysis: Analysis) -> tuple[list[str], list[list]] | None:
    power = analysis.power
    if power is None:
        return None
    header = ["metric", "design", "seeds", "replicate slots", "patients", "alpha", "power", "detectable difference"]
    header += ["patient_sd", "replicate_sd", "residual_sd", "pairs pooled"]
    title = metric(analysis.primary).title
    rows = [
        [title, name, seeds, slots, patients, power.alpha, POWER, detectable, *power.components.sds()]
        + [power.components.pairs]
        for name, seeds, slots, patients, detectable in power.rows
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
    for m in METRICS:
        scores = build_scores(experiments.oof, m.key, m.higher_is_better, losses, seeds, patients)
        means = scores.loss_means()
        columns.append((means, scores.seed_sd(), ranks(means, m.higher_is_better)))
        header += [f"{m.title} mean", f"{m.title} seed sd", f"{m.title} rank"]
    rows = []
    for i, loss in enumerate(losses):
        runs = [seed for (name, seed) in experiments.oof if name == loss]
        row = [loss, len(runs), len(set().union(*(experiments.oof[loss, seed] for seed in runs)))]
        for means, sd, rank in columns:
            row += [float(means[i]), float(sd[i]), int(rank[i])]
        rows.append(row)
    return header, rows


def cells_table(experiments: Experiments) -> tuple[list[str], list[list]]:
    header = ["cell", "loss", "seed", "fold", "run", "state", "epochs", "patients", "mean DSC", "mean HD95 (mm)"]
    rows = []
    for c in experiments.cells:
        record = experiments.records.get(c.id)
        means = [record.patients.mean(key) if record else math.nan for key in ("dsc", "hd95_mm")]
        rows.append(
            [
                c.id,
                c.loss,
                c.seed,
                "-" if c.fold is None else c.fold,
                str(c.run),
                experiments.state(c),
                len(record.history) if record else 0,
                len(record.patients) if record else 0,
                *means,
            ]
        )
    return header, rows


def _significance_cells(analysis: Analysis) -> dict[str, dict[tuple[int, int], tuple[float, float]]]:
    """Per metric title: (row, column) -> (row better than column by, adjusted p), both orders."""
    index = {loss: i for i, loss in enumerate(analysis.losses)}
    cells: dict[str, dict[tuple[int, int], tuple[float, float]]] = {}
    for d in analysis.differences:
        m = metric(d.metric)
        gain = d.mean if m.higher_is_better else -d.mean
        pairs = cells.setdefault(f"{m.title}, {d.family}", {})
        pairs[index[d.a], index[d.b]] = (gain, d.p_holm)
        pairs[index[d.b], index[d.a]] = (-gain, d.p_holm)
    return cells


def _missing_note(analysis: Analysis) -> list[str]:
    """The note at the top of report.md when a cell or a score is missing (or dropped)."""
    cells = analysis.missing_cells()
    scores = {m.short: int(analysis.missing_scores(m.key).sum()) for m in METRICS}
    if not cells and not any(scores.values()):
        return []
    what = f"{len(cells)} cell(s) of the design have no evaluation" + (f" ({', '.join(cells)})" if cells else "")
    what += ", and patients of evaluated cells have no score: " + ", ".join(f"{k} {n}" for k, n in scores.items())
    if analysis.missing == "drop":
        return [f"**Missing values dropped** (`--missing drop`): {what}; {_kept(analysis)}.", ""]
    return [f"**Missing is worst**: {what}; each missing score counts as its metric's worst value (see below).", ""]


def _compared(analysis: Analysis) -> list[str]:
    """What was compared: each experiment's plan, then its replicates, data and rules."""
    experiments = analysis.experiments
    plans = []
    for path, plan in zip(experiments.paths, experiments.plans, strict=True):
        options = ", ".join(f"{k} {v}" for k, v in plan.base.items())
        plans.append(
            f"- {path}: losses {', '.join(plan.losses)}; seeds {', '.join(map(str, plan.seeds))}; "
            + ("no folds (the fixed train/test split)" if plan.folds == 0 else f"{plan.folds} folds")
            + (f"; base options: {options}" if options else "")
        )
    folds = len(experiments.splits["folds"])
    cap = analysis.results["hd95_mm"].worst
    rule = (
        f"Missing is worst: a score that is not there counts as DSC 0 or HD95 {cap:.3f} mm ({analysis.cap_source})."
        if analysis.missing == "worst"
        else "Missing values are dropped (--missing drop): see the results."
    )
    ev = experiments.records[experiments.evaluated[0].id].evaluation
    facts = [
        f"Replicates of each loss: {'; '.join(analysis.replicates)}"
        + (f" ({folds}-fold cross-validation of the training patients; every fold's model is one run)" if folds else "")
        + ".",
        f"{data_fact(ev.get('data', '?'), ev, analysis.patients)}; "
        f"{len(experiments.evaluated)} of {len(experiments.cells)} cells evaluated "
        f"(every cell in [cells.csv](cells.csv)).",
        f"Primary metric: {metric(analysis.primary).title} (the plan's `primary`); the other is secondary. {rule}",
    ]
    return compared_section(plans, facts)


def write_report(analysis: Analysis, out: Path) -> Path:
    """Write the experiment report of `analysis` into `out`, whole or not at all (it replaces an
    earlier report there; `microseg.reporting.writer`); returns the path of report.md."""
    return write_report_folder(Path(out), lambda report: _write_report(analysis, report))


def _write_report(analysis: Analysis, report: ReportWriter) -> None:
    """Every table, figure and section of the experiment report."""
    report.add("# Experiment comparison", "", *_missing_note(analysis), *_compared(analysis))
    report.add("## Results", "", experiment_paragraph(analysis), "")
    report.table(
        "losses",
        "Losses: mean over patients and replicate slots, sd of the run means, both ranks",
        *summary_table(analysis),
        [
            "Cells: the loss's replicate slots; missing cells: those without an evaluation; missing scores: "
            "patients without a score in its evaluated cells (empty predictions). The statistics run on the "
            "completed grid (see What was compared). Mean: over patients of the per-patient means over the slots. "
            "Seed sd: the sd (ddof 1) of the loss's run means (with folds every fold's model is a run). Rank: "
            "aggregate-then-rank of the means; mean rank: the loss's rank per patient averaged over the patients, "
            "ranked by rank-then-aggregate (ties share the smallest rank). P(rank 1): the share of "
            f"{BOOTSTRAP_RESAMPLES:,} bootstrap resamples in which the loss ranks first by its mean. Raters: the "
            "other annotators against the expert, on the same patients."
        ],
    )
    _write_curves(analysis, report)
    _write_rankings(analysis, report)
    if len(analysis.losses) > 1:
        _write_significance(analysis, report)
    report.table(
        "variance",
        "How much of the spread is the loss, the seed, the fold",
        *variance_rows(analysis),
        [
            "Additive ANOVA of the run means u[loss, seed, fold] (mean over patients of a run), the residual being "
            "every interaction: SS of each factor from its level means, share = SS / SS_total, F = MS / MS_res with "
            "its p. sd: the random-effect sd of the seed or fold, sqrt(max(0, (MS - MS_res) / n)) with n the runs "
            "per level (loss x fold runs per seed, loss x seed per fold); the residual's: sqrt(MS_res)."
        ],
    )
    power = power_table(analysis)
    if power:
        report.table(
            "power",
            f"What this design resolves on {metric(analysis.primary).short}",
            *power,
            [
                f"The smallest difference detectable with {POWER:.0%} power by the significance test at alpha / m "
                "(Holm's first step over the m primary pairs), simulated from the variance components of the paired "
                "differences averaged over the primary pairs (patient, replicate and residual sd)."
            ],
        )
    _write_oof(analysis, report)
    report.table("cells", "Cells", *cells_table(analysis.experiments))


def _write_curves(analysis: Analysis, report: ReportWriter) -> None:
    colours = run_colours(analysis.losses)
    bands, rows = curve_rows(analysis)
    plot_curve_bands(bands, report.out / "curves.png", BAND, colours)
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
        {m.title: analysis.scores(m.key).patient_means() for m in METRICS},
        report.out / "dot_box.png",
        colours,
    )
    report.table(
        "per_patient",
        "Per-patient DSC and HD95 per loss (mean over its replicate slots)",
        *loss_patient_table(analysis),
        ["![dot-and-box plot](dot_box.png)", "", "Each point is a patient; a patient's points are joined."],
    )


def _write_rankings(analysis: Analysis, report: ReportWriter) -> None:
    panels = {f"{r.metric.short}, {s}": r.rankings[s] for r in analysis.results.values() for s in SCHEMES}
    plot_rank_blobs(
        analysis.losses,
        {title: ranking.frequencies for title, ranking in panels.items()},
        {title: ranking.rank for title, ranking in panels.items()},
        report.out / "ranking.png",
        run_colours(analysis.losses),
    )
    report.table(
        "ranking",
        "Ranking stability: aggregate-then-rank and rank-then-aggregate",
        *ranking_table(analysis),
        [
            "![ranking stability](ranking.png)",
            "",
            "Score: the mean (aggregate-then-rank) or the mean over patients of the loss's rank on each patient's "
            "mean over the slots (rank-then-aggregate, lower is better; ties take the smallest rank, as "
            f"challengeR). {BOOTSTRAP_RESAMPLES:,} resamples each draw the replicate slots, then the patients, with "
            "replacement, the same draws for every loss, and rank the losses again; P(rank k): the share of "
            "resamples with rank k. Kendall's tau-b between each resample's ranking and the ranking above: its "
            "median and quartiles (1: every resample agrees).",
        ],
    )


def _write_significance(analysis: Analysis, report: ReportWriter) -> None:
    plot_significance_map(
        analysis.losses,
        _significance_cells(analysis),
        report.out / "significance.png",
        ALPHA,
        "crossed-effects t test (patients and seeds random), Holm-adjusted p",
    )
    report.table(
        "significance",
        "Significance map: every pair of losses",
        *significance_table(analysis),
        [
            "![significance map](significance.png)",
            "",
            "D[r, p] = loss_a - loss_b on replicate slot r and patient p, modelled as mean_diff + patient + "
            "replicate + residual (crossed random effects, REML; in this balanced design the two-way ANOVA's mean "
            "squares, a negative variance component set to 0 by pooling its sum of squares into the residual). "
            "se: sqrt((L_rep + L_pat - L_res) / (R P)) of the fitted expected mean squares; df: Satterthwaite's; "
            "t = mean_diff / se, p_value two-sided. p_holm: Holm over the pairs of the metric's family (primary: "
            "the plan's metric; secondary: the other). The CI is the t interval at ci_level = 1 - 0.05 p_value / "
            "p_holm, so it excludes 0 exactly when p_holm < 0.05 (significant). patient_sd, replicate_sd, "
            "residual_sd: the fitted components. wilcoxon_*: the paired Wilcoxon signed-rank test of the per-patient "
            "means over slots (seed variation ignored; a check), Holm over the same family.",
        ],
    )


def _write_oof(analysis: Analysis, report: ReportWriter) -> None:
    oof = oof_table(analysis.experiments)
    if oof:
        report.table(
            "oof",
            "Cross-validation: out-of-fold scores of the training patients",
            *oof,
            [
                "Each training patient scored once per loss and seed, by the fold model that did not train on "
                "it (EXP/oof/per_patient.csv); per-patient means over seeds, then the mean over patients (NaN "
                "scores left out). A fold model's best.pt was chosen on those same patients, so these scores "
                "lean optimistic; the tests and the ranking stability above are on the test split."
            ],
        )


def compare_experiments(paths: Sequence[str | Path], out: str | Path, missing: str = "worst") -> Path:
    """`microseg compare EXP... --out DIR`: check, analyse and report experiment folders; report.md's path."""
    require_report_folder(Path(out))  # before the analysis: a refused --out costs nothing
    return write_report(analyse([Path(p) for p in paths], missing), Path(out))
