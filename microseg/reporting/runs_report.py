"""Comparing runs: loss curves across epochs, the micro-US adaptive focal paper's Table 1 and Table 2 layouts, paired tests.

`compare_runs(runs, out)` reads each run folder (`microseg.runs.record.load_run`: `config.yaml`, `history.csv`,
`metrics/`) and writes into `out/`:
- `loss_curves.png`: each run's own loss, the common-ruler BCE and the validation DSC per epoch
  (raw values of different losses are not on one scale; the BCE of the main output is);
- `loss_table.csv`: that paper's Table 1 layout (one row per epoch, one column per run);
- `per_patient.csv`: its Table 2 layout (one row per patient, DSC and HD95 per run, then
  mean, std and median rows);
- `wilcoxon.csv`: a paired Wilcoxon signed-rank test (scipy) per metric (DSC, HD95, DSC inside the
  hard region) for every pair of runs, on the patients both runs scored (`microseg.stats.paired`),
  its p Holm-adjusted over that whole family (every pair x every metric), the mean difference and
  its percentile bootstrap 95% CI;
- `inter_rater.csv`, `hard_region.csv`, `stratified.csv` (+ `stratified.png`, per slice) and
  `stratified_patients.csv` (+ `.png`, per patient, A-FL Fig. 3), `overlays/`;
- `report.md`: what was compared (runs, model, epochs, checkpoint, data, split, protocol,
  patients), a results paragraph (`results_paragraph`), the dataset check's inter-rater baseline
  when its JSON is found, then all of the above as markdown, figures linked.
Runs evaluated on different splits or protocols are refused (their patients do not pair). The
folder is written by `microseg.reporting.writer` (whole or not at all, the --out guard).
A run has one colour in every figure (`microseg.reporting.figures.run_colours`, in the order given).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from microseg.core.errors import MicrosegError, OptionError, warn
from microseg.core.tables import markdown_table
from microseg.metrics import summarize
from microseg.reporting.figures import plot_loss_curves, plot_overlays, plot_stratified, run_colours
from microseg.reporting.paired_runs import family_differences, wilcoxon_table
from microseg.reporting.sections import compared_section, data_fact, patient_table
from microseg.reporting.writer import ReportWriter, write_report_folder
from microseg.runs.folder import RunFolder
from microseg.runs.record import RunMetrics, RunRecord, load_run
from microseg.stats.paired import ALPHA, BOOTSTRAP_RESAMPLES, PairedDifference, min_wilcoxon_p

METRICS = (("dsc", "DSC"), ("hd95_mm", "HD95 (mm)"))
FINDINGS = (
    ("dsc", "DSC", True, "", 4),
    ("hd95_mm", "HD95", False, " mm", 3),
    ("hard_dsc", "DSC inside the hard region", True, "", 4),
)
"""(per-patient key, name, higher is better, unit, decimals) of each result the paragraph states."""
TESTED = METRICS + (("hard_dsc", "hard-region DSC"),)
"""The metrics of the paired tests: with every pair of runs, the family their p are Holm-adjusted over."""
MUST_AGREE = ("split", "protocol")


def loss_table(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    """The micro-US adaptive focal paper's Table 1: one row per epoch, each run's own training loss."""
    n_epochs = max(len(r.history) for r in records)
    header = ["epoch"] + [r.label for r in records]
    rows = [
        [epoch + 1] + [r.history[epoch]["loss"] if epoch < len(r.history) else math.nan for r in records]
        for epoch in range(n_epochs)
    ]
    return header, rows


def metric_table(records: list[RunRecord], columns: list[tuple[str, RunRecord, str]]) -> tuple[list[str], list[list]]:
    """One row per patient (any run's), one column per (label, run, per-patient key); mean, std, median rows."""
    cases = sorted(set().union(*(r.patients for r in records)))
    return patient_table(
        cases, [(label, {case: r.patients.value(case, key) for case in cases}) for label, r, key in columns]
    )


def runs_patient_table(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    """The micro-US adaptive focal paper's Table 2: one row per patient, DSC and HD95 per run; mean, std and median rows."""
    return metric_table(records, [(f"{r.label} {label}", r, key) for r in records for key, label in METRICS])


def rater_names(records: list[RunRecord]) -> list[str]:
    """Other annotators scored by `evaluate` (columns `<rater>_dsc`), in order of appearance."""
    keys = (k for r in records for p in r.patients.values() for k in p)
    return list(dict.fromkeys(k[:-4] for k in keys if k.endswith("_dsc") and k not in ("dsc", "hard_dsc")))


def rater_table(records: list[RunRecord], raters: list[str]) -> tuple[list[str], list[list], list[str]]:
    """Each run's DSC beside every rater's DSC against the expert, per patient; and, per run, on how
    many patients its DSC reaches the lowest rater's (is it within inter-observer agreement?)."""
    rater_source = next(r for r in records if any(f"{raters[0]}_dsc" in p for p in r.patients.values()))
    columns = [(f"{r.label} DSC", r, "dsc") for r in records]
    columns += [(f"rater {name} DSC", rater_source, f"{name}_dsc") for name in raters]
    header, rows = metric_table(records, columns)
    notes = []
    for r in records:
        within = total = 0
        for case, values in r.patients.items():
            lowest = min((rater_source.patients.value(case, f"{n}_dsc") for n in raters), default=math.nan)
            if not (math.isnan(lowest) or math.isnan(values.get("dsc", math.nan))):
                total += 1
                within += values["dsc"] >= lowest
        notes.append(f"- {r.label}: DSC at or above the lowest rater's on {within} of {total} patients")
    return header, rows, notes


def hard_region_table(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    """DSC and error rate inside the region where the annotators disagree, per patient and run."""
    return metric_table(
        records,
        [
            (f"{r.label} {label}", r, key)
            for r in records
            for key, label in (("hard_dsc", "hard DSC"), ("hard_error_rate", "hard error rate"))
        ],
    )


def require_same_evaluation(records: list[RunRecord]) -> None:
    """MicrosegError (one line naming the runs) when evaluated runs differ in split or protocol.

    Patients of different splits or protocols must not be paired; a run with metrics but no
    evaluation.json counts as unknown. Different data folders are only warned about (the same
    dataset may sit at two places).
    """
    evaluated = [r for r in records if r.patients or r.evaluation]
    for key in MUST_AGREE:
        groups: dict[str, list[str]] = {}
        for r in evaluated:
            groups.setdefault(str(r.evaluation.get(key, "unknown (no evaluation.json)")), []).append(str(r.path))
        if len(groups) > 1:
            what = "; ".join(f"{key} {value}: {', '.join(paths)}" for value, paths in groups.items())
            raise MicrosegError(
                f"cannot compare runs evaluated with different {key}s ({what}); "
                f"evaluate them all with the same --split and --protocol"
            )
    folders = {r.evaluation["data"] for r in evaluated if "data" in r.evaluation}
    if len(folders) > 1:
        warn(
            f"the runs were evaluated on different data folders ({', '.join(sorted(folders))}); "
            "patients are paired by case id"
        )


def runs_compared(records: list[RunRecord]) -> list[str]:
    """The report's opening: one row per run (loss, model, epochs, checkpoint, resize, patients), then the data."""
    header = ["run", "loss", "model", "epochs trained", "checkpoint", "resize", "patients"]
    rows = [
        [
            r.name,
            r.loss,
            r.config.get("model", "?"),
            f"{len(r.history)} of {r.config.get('epochs', '?')}",
            _checkpoint(r),
            r.evaluation.get("resize", "-"),
            len(r.patients),
        ]
        for r in records
    ]
    evaluated = [r for r in records if r.evaluation]
    if not evaluated:
        return compared_section(
            [markdown_table(header, rows)], ["No run has been evaluated: only the training curves are compared."]
        )
    cases = sorted(set().union(*(r.patients for r in records)), key=lambda c: (len(c), c))
    data = ", ".join(sorted({r.evaluation.get("data", "?") for r in evaluated}))
    return compared_section([markdown_table(header, rows)], [data_fact(data, evaluated[0].evaluation, cases) + "."])


def _checkpoint(r: RunRecord) -> str:
    """The checkpoint a run's metrics scored, "not recorded" (an earlier release's metrics), or "not evaluated"."""
    if "checkpoint" in r.evaluation:
        return f"{r.evaluation['checkpoint']} (epoch {r.evaluation.get('checkpoint_epoch', '?')})"
    return "not recorded" if r.patients else "not evaluated"


def tested_metrics(records: list[RunRecord]) -> list[tuple[str, str]]:
    """The TESTED metrics some run has per-patient values of."""
    return [(key, label) for key, label in TESTED if any(key in p for r in records for p in r.patients.values())]


def _oriented(family: dict[tuple[int, int, str], PairedDifference], i: int, j: int, key: str) -> PairedDifference:
    """The family's difference of runs i - j on `key` (stored for i < j)."""
    return family[i, j, key] if i < j else family[j, i, key].reversed()


def _finding(
    records: list[RunRecord],
    family: dict[tuple[int, int, str], PairedDifference],
    key: str,
    name: str,
    higher: bool,
    unit: str,
    digits: int,
) -> str | None:
    """One sentence: the best run on `key` (by its mean over patients) and its paired differences to the others."""
    means = {i: summarize([p.get(key, math.nan) for p in r.patients.values()]) for i, r in enumerate(records)}
    valid = {i: m["mean"] for i, m in means.items() if m["n"]}
    if not valid:
        return None
    best = (max if higher else min)(valid, key=valid.__getitem__)
    run = records[best]
    sentence = (
        f"On {name} the best is {run.label} (mean {valid[best]:.{digits}f}{unit} over {means[best]['n']} patients)"
    )
    if len(records) == 1:
        return sentence + "; there is no other run to compare it with."
    parts = []
    for i, other in ((i, r) for i, r in enumerate(records) if i != best):
        d = _oriented(family, best, i, key)
        if not d.patients:
            parts.append(f"no patient in common with {other.label}")
            continue
        lo, hi = d.ci
        verdict = "outside noise" if d.significant else "within noise"
        p = "n/a (no difference)" if math.isnan(d.p_value) else f"{d.p_value:.3g}"
        if math.isclose(d.p_value, min_wilcoxon_p(d.patients), rel_tol=1e-9):
            p += f", the smallest {d.patients} patients allow"
        if not math.isnan(d.p_holm):
            p += f", Holm-adjusted {d.p_holm:.3g}"
        parts.append(
            f"{d.mean:+.{digits}f}{unit} against {other.label} (95% CI {lo:+.{digits}f} to {hi:+.{digits}f}, "
            f"Wilcoxon p = {p}, n = {d.patients}): {verdict}"
        )
    return f"{sentence}: " + "; ".join(parts) + "."


def results_paragraph(records: list[RunRecord]) -> str:
    """The results in a few sentences: the best run on DSC, on HD95 and inside the hard region
    (each by its mean over patients), each paired per-patient difference to the other runs with
    its bootstrap 95% CI and Wilcoxon p, raw and Holm-adjusted over the family of wilcoxon.csv
    (every pair of runs x every tested metric), called within noise when the CI covers 0 or the
    adjusted p >= 0.05, and the smallest p the exact Wilcoxon test can reach with that many
    patients (2 / 2^n)."""
    scored = [r for r in records if r.patients]
    if not scored:
        return "No run has been evaluated yet: `microseg evaluate` each run for per-patient results."
    tested = tested_metrics(scored)
    family = family_differences(scored, [key for key, _ in tested])
    sentences = [s for s in (_finding(scored, family, *f) for f in FINDINGS) if s]
    n = max(len(r.patients) for r in scored)
    if len(scored) > 1:
        size = sum(not math.isnan(d.p_value) for d in family.values())
        sentences.append(
            f"The {size} Wilcoxon tests ({len(scored) * (len(scored) - 1) // 2} pair(s) of runs x "
            f"{', '.join(label for _, label in tested)}) are one family: their p are Holm-adjusted "
            "over it (wilcoxon.csv)."
        )
        sentences.append(
            f"A difference is within noise when its 95% CI (percentile bootstrap over patients, "
            f"{BOOTSTRAP_RESAMPLES:,} resamples) covers 0 or its adjusted p >= {ALPHA}."
        )
        sentences.append(wilcoxon_floor(n, size))
    return " ".join(sentences)


def wilcoxon_floor(n: int, tests: int) -> str:
    """The smallest p the exact two-sided Wilcoxon signed-rank test reaches with n patients (2 / 2^n),
    and after Holm over `tests` tests (tests x 2 / 2^n), said when it keeps every difference from p < 0.05."""
    floor = min_wilcoxon_p(n)
    limit = (
        f"With {n} patients the exact two-sided Wilcoxon signed-rank test cannot give p below 2 / 2^{n} = {floor:.3g}"
    )
    if floor >= ALPHA:
        return limit + ": no difference can reach p < 0.05, however large; read the CIs."
    if tests * floor >= ALPHA:
        return limit + (
            f", nor Holm over {tests} tests an adjusted p below {tests} x {floor:.3g} = {tests * floor:.3g}: "
            "no difference can reach an adjusted p < 0.05, however large; read the CIs."
        )
    return limit + "."


def find_dataset_check(records: list[RunRecord]) -> tuple[Path, dict] | None:
    """The dataset check JSON of the evaluated data folder: `<data>.check.json` (`microseg check`)
    or `<cache>.check.json` of a run's cache (`prepare`), if its `data` is that folder."""
    from microseg.data.check import check_path, data_check_path

    data = next((r.evaluation["data"] for r in records if "data" in r.evaluation), None)
    if data is None:
        return None
    candidates = [data_check_path(data)]
    candidates += [check_path(r.config["cache"]) for r in records if r.config.get("cache")]
    for path in dict.fromkeys(candidates):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and report.get("data") == data and isinstance(report.get("splits"), dict):
            return path, report
    return None


def check_table(report: dict) -> tuple[list[str], list[list]]:
    """Each split's raters against the expert from a dataset check: patients, DSC and HD95 mean and std."""

    def value(v: float | None) -> float:
        return math.nan if v is None else float(v)

    header = ["split", "rater", "patients", "DSC mean", "DSC std", "HD95 mean (mm)", "HD95 std (mm)"]
    rows = [
        [
            split,
            name,
            r["dsc"]["n"],
            value(r["dsc"]["mean"]),
            value(r["dsc"]["std"]),
            value(r["hd95_mm"]["mean"]),
            value(r["hd95_mm"]["std"]),
        ]
        for split, s in report["splits"].items()
        for name, r in s.get("raters", {}).items()
    ]
    return header, rows


def parse_cases(text: str | None) -> dict[str, list[int]] | None:
    """`--cases 01,03:12,03:40` -> {"01": [], "03": [12, 40]} (no slices: the most disputed ones)."""
    if not text:
        return None
    chosen: dict[str, list[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        case, _, z = item.partition(":")
        if z and not z.isdigit():
            raise OptionError(f"`cases` item {item!r} is not CASE or CASE:SLICE")
        chosen.setdefault(case, []).extend([int(z)] if z else [])
    return chosen


def write_overlays(
    records: list[RunRecord],
    out: Path,
    cases: dict[str, list[int]] | None,
    colours: dict[str, str],
    n_cases: int = 4,
    n_slices: int = 4,
) -> list[Path]:
    """Image + expert contour + each run's contour; by default the cases and slices where runs differ most."""
    from microseg.data.layout import find_cases
    from microseg.data.volumes import read_volume
    from microseg.evaluation.analysis import disagreement_slices

    evaluated = [r for r in records if r.evaluation]
    if not evaluated:
        raise OptionError("`overlays` needs evaluated runs: run `microseg evaluate` first")
    source = evaluated[0].evaluation
    available = {c.case_id: c for c in find_cases(Path(source["data"]), source["split"], require_non_expert=False)}
    if cases is None:

        def spread(case: str) -> float:
            dsc = [r.patients.get(case, {}).get("dsc", math.nan) for r in evaluated]
            dsc = [d for d in dsc if not math.isnan(d)]
            return (max(dsc) - min(dsc) if len(dsc) > 1 else 1 - dsc[0]) if dsc else -1.0

        cases = {c: [] for c in sorted(available, key=spread, reverse=True)[:n_cases]}
    written = []
    for case_id, slices in cases.items():
        if case_id not in available:
            raise OptionError(f"`cases`: no case {case_id!r} in {source['data']}/{source['split']}")
        case = available[case_id]
        image = read_volume(case.image, "image").array
        expert = read_volume(case.expert, "mask").array
        preds = {}
        for r in evaluated:
            path = RunFolder(r.path).predictions / case.image.name
            if not path.is_file():
                raise MicrosegError(f"{r.path} has no prediction {path.name}: evaluate it on {source['split']} first")
            preds[r.label] = read_volume(path, "mask").array
        chosen = slices or disagreement_slices(preds, expert, n_slices)
        target = out / "overlays" / f"case_{case_id}.png"
        plot_overlays(image, expert, preds, chosen, target, title=f"case {case_id}", colours=colours)
        written.append(target)
    return written


def _patient_sections(report: ReportWriter, records: list[RunRecord]) -> None:
    """Per-patient tables, tests, the dataset check's baseline, raters and the hard region."""
    protocol = next(r.evaluation.get("protocol", "?") for r in records if r.patients)
    report.table(
        "per_patient",
        f"Per-patient DSC and HD95, protocol {protocol} (micro-US adaptive focal Table 2 layout)",
        *runs_patient_table(records),
    )
    if len(records) > 1:
        tested = tested_metrics(records)
        report.table(
            "wilcoxon",
            "Paired Wilcoxon signed-rank tests and bootstrap 95% CIs of the mean difference (run_a - run_b)",
            *wilcoxon_table(records, tested),
            [
                f"p_holm: Holm-adjusted over the family of every pair of runs x "
                f"{', '.join(label for _, label in tested)}."
            ],
        )
    found = find_dataset_check(records)
    if found:
        path, check = found
        report.table(
            "dataset_check",
            f"Inter-rater baseline from the dataset check (protocol {check.get('protocol')})",
            *check_table(check),
            [f"From {path}: {check.get('errors', '?')} error(s), {check.get('warnings', '?')} warning(s)."],
        )
    raters = rater_names(records)
    if raters:
        header, rows, notes = rater_table(records, raters)
        report.table("inter_rater", "Model beside the other annotators (DSC against the expert)", header, rows, notes)
        report.table(
            "hard_region",
            "Inside the hard region (annotators disagree, dilated as in training)",
            *hard_region_table(records),
        )


def _stratified_sections(report: ReportWriter, records: list[RunRecord], colours: dict[str, str]) -> None:
    """A-FL Fig. 3 per slice (area, roughness) and per patient (volume, smoothness): tables and figures."""
    from microseg.evaluation.analysis import (
        PATIENT_FACTORS,
        patient_strata_edges,
        patient_stratified_table,
        stratified_table,
        stratum_edges,
    )

    per_slice = {r.label: r.slices for r in records if r.slices}
    if per_slice:
        edges = stratum_edges(per_slice)
        header, rows = stratified_table(per_slice)
        plot_stratified(header, rows, report.out / "stratified.png", colours)
        notes = [
            f"Tertile edges: area {edges['size'][0]:.1f} / {edges['size'][1]:.1f} mm^2, roughness "
            f"(P^2 / 4 pi A) {edges['roughness'][0]:.3f} / {edges['roughness'][1]:.3f}.",
            "",
            "![stratified DSC](stratified.png)",
        ]
        report.table(
            "stratified",
            "Per-slice DSC by object size and boundary roughness (A-FL Fig. 3 layout)",
            header,
            rows,
            notes,
        )
    patients = {r.label: r.patients for r in records if r.patients}
    edges = patient_strata_edges(patients)
    if edges:
        header, rows = patient_stratified_table(patients)
        factors = [f for f in PATIENT_FACTORS if f[0] in edges]
        plot_stratified(header, rows, report.out / "stratified_patients.png", colours, factors)
        names = {"volume": "expert volume", "smoothness": "gamma_mSa (voxel units, training grid)"}
        notes = [
            "Tertile edges: "
            + "; ".join(f"{names[f]} {lo:.4g} / {hi:.4g}" for f, (lo, hi) in edges.items())
            + " (volume in ml; low gamma_mSa = good smoothness).",
            *_rank_note(patients),
            "",
            "![stratified patient DSC](stratified_patients.png)",
        ]
        report.table(
            "stratified_patients",
            "Per-patient DSC by expert volume and smoothness (A-FL Fig. 3, per patient)",
            header,
            rows,
            notes,
        )


def _rank_note(patients: Mapping[str, RunMetrics]) -> list[str]:
    """How alike volume and gamma_mSa rank the patients (Spearman's rho, scipy), when at least 3 have both."""
    from scipy.stats import spearmanr

    rows = {case: row for cases in patients.values() for case, row in cases.items()}
    pairs = [
        (r["volume_ml"], r["gamma_msa"])
        for r in rows.values()
        if not (math.isnan(r.get("volume_ml", math.nan)) or math.isnan(r.get("gamma_msa", math.nan)))
    ]
    if len(pairs) < 3 or len({v for v, _ in pairs}) < 2 or len({g for _, g in pairs}) < 2:
        return []
    rho = float(spearmanr(*zip(*pairs, strict=True)).statistic)
    return [
        f"Volume and gamma_mSa rank the {len(pairs)} patients with Spearman rho = {rho:.2f}: A-FL's "
        "smoothness is a mean gradient over the whole volume, so it grows with the object's surface and "
        "mixes size with roughness."
    ]


def compare_runs(runs: list[Path], out: Path, overlays: bool = False, cases: str | None = None) -> Path:
    """Write the comparison of the run folders `runs` into `out` (`microseg.reporting.writer`); returns
    the path of `report.md`."""
    if not runs:
        raise MicrosegError("compare needs at least one run folder")
    seen: dict[Path, Path] = {}
    for run in map(Path, runs):
        if run.resolve() in seen:
            raise MicrosegError(
                f"{run} is compared twice (also given as {seen[run.resolve()]}): a run compared with "
                "itself tests nothing"
            )
        seen[run.resolve()] = run
    records = [load_run(Path(r)) for r in runs]
    require_same_evaluation(records)
    chosen = parse_cases(cases)
    return write_report_folder(out, lambda report: _write_report(records, report, overlays, chosen), notes_below=True)


def _write_report(
    records: list[RunRecord], report: ReportWriter, overlays: bool, chosen: dict[str, list[int]] | None
) -> None:
    """Every table, figure and section of the comparison into the report's folder."""
    colours = run_colours([r.label for r in records])
    plot_loss_curves({r.label: r.history for r in records}, report.out / "loss_curves.png", colours)
    report.add(
        "# Run comparison",
        "",
        *runs_compared(records),
        "## Results",
        "",
        results_paragraph(records),
        "",
        "![loss curves](loss_curves.png)",
        "",
    )
    report.table(
        "loss_table",
        "Training loss per epoch (micro-US adaptive focal Table 1 layout)",
        *loss_table(records),
    )
    if any(r.patients for r in records):
        _patient_sections(report, records)
    _stratified_sections(report, records, colours)
    if overlays:
        figures = write_overlays(records, report.out, chosen, colours)
        report.add("## Overlays (expert in green)", "", *[f"![{p.stem}](overlays/{p.name})" for p in figures], "")
