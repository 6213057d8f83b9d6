"""Comparing runs: loss curves across epochs, the micro-US adaptive focal paper's Table 1 and Table 2 layouts, paired tests.

`compare(runs, out)` reads each run folder (`microseg.run.load_run`: `config.yaml`, `history.csv`,
`metrics/`) and writes into `out/`:
- `loss_curves.png`: each run's own loss, the common-ruler BCE and the validation DSC per epoch
  (raw values of different losses are not on one scale; the BCE of the main output is);
- `loss_table.csv`: that paper's Table 1 layout (one row per epoch, one column per run);
- `per_patient.csv`: its Table 2 layout (one row per patient, DSC and HD95 per run, then
  mean, std and median rows);
- `wilcoxon.csv`: a paired Wilcoxon signed-rank test (scipy) per metric for every pair of runs,
  on the patients both runs scored (`microseg.significance`);
- `inter_rater.csv`, `hard_region.csv`, `stratified.csv` (+ `stratified.png`), `overlays/`;
- `report.md`: all of it as markdown, figures linked.
A run has one colour in every figure (`microseg.figures.run_colours`, in the order given).
"""

from __future__ import annotations

import math
from pathlib import Path

from microseg.atomic import write_text
from microseg.errors import MicrosegError
from microseg.figures import plot_loss_curves, plot_overlays, plot_stratified, run_colours
from microseg.metrics import summarize
from microseg.run import RunRecord, load_run
from microseg.significance import wilcoxon_table
from microseg.tables import SUMMARY_ROWS, markdown_table, write_csv

METRICS = (("dsc", "DSC"), ("hd95_mm", "HD95 (mm)"))


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
    """One row per patient, one column per (label, run, per-patient key); mean, std, median rows."""
    cases = sorted(set().union(*(r.patients for r in records)))
    header = ["case_id"] + [label for label, _, _ in columns]
    rows = [[case] + [r.patients.get(case, {}).get(key, math.nan) for _, r, key in columns] for case in cases]
    stats = [summarize([row[i] for row in rows]) for i in range(1, len(header))]
    return header, rows + [[name] + [st[name] for st in stats] for name in SUMMARY_ROWS]


def patient_table(records: list[RunRecord]) -> tuple[list[str], list[list]]:
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
            lowest = min((rater_source.patients.get(case, {}).get(f"{n}_dsc", math.nan) for n in raters), default=math.nan)
            if not (math.isnan(lowest) or math.isnan(values.get("dsc", math.nan))):
                total += 1
                within += values["dsc"] >= lowest
        notes.append(f"- {r.label}: DSC at or above the lowest rater's on {within} of {total} patients")
    return header, rows, notes


def hard_region_table(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    """DSC and error rate inside the region where the annotators disagree, per patient and run."""
    return metric_table(records, [(f"{r.label} {label}", r, key) for r in records
                                  for key, label in (("hard_dsc", "hard DSC"), ("hard_error_rate", "hard error rate"))])


def parse_cases(text: str | None) -> dict[str, list[int]] | None:
    """`--cases 01,03:12,03:40` -> {"01": [], "03": [12, 40]} (no slices: the most disputed ones)."""
    if not text:
        return None
    chosen: dict[str, list[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        case, _, z = item.partition(":")
        if z and not z.isdigit():
            raise MicrosegError(f"--cases item {item!r} is not CASE or CASE:SLICE")
        chosen.setdefault(case, []).extend([int(z)] if z else [])
    return chosen


def write_overlays(records: list[RunRecord], out: Path, cases: dict[str, list[int]] | None, colours: dict[str, str],
                   n_cases: int = 4, n_slices: int = 4) -> list[Path]:
    """Image + expert contour + each run's contour; by default the cases and slices where runs differ most."""
    from microseg.analysis import disagreement_slices
    from microseg.data.layout import find_cases
    from microseg.data.volumes import read_volume

    evaluated = [r for r in records if r.evaluation]
    if not evaluated:
        raise MicrosegError("--overlays needs evaluated runs: run `microseg evaluate` first")
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
            raise MicrosegError(f"--cases: no case {case_id!r} in {source['data']}/{source['split']}")
        case = available[case_id]
        image = read_volume(case.image, "image").array
        expert = read_volume(case.expert, "mask").array
        preds = {}
        for r in evaluated:
            path = r.path / "predictions" / case.image.name
            if not path.is_file():
                raise MicrosegError(f"{r.path} has no prediction {path.name}: evaluate it on {source['split']} first")
            preds[r.label] = read_volume(path, "mask").array
        chosen = slices or disagreement_slices(preds, expert, n_slices)
        target = out / "overlays" / f"case_{case_id}.png"
        plot_overlays(image, expert, preds, chosen, target, title=f"case {case_id}", colours=colours)
        written.append(target)
    return written


def compare(runs: list[Path], out: Path, overlays: bool = False, cases: str | None = None) -> Path:
    """Write the comparison of `runs` into `out`; returns the path of `report.md`."""
    from microseg.analysis import stratified_table, stratum_edges

    if not runs:
        raise MicrosegError("compare needs at least one run folder")
    records = [load_run(Path(r)) for r in runs]
    chosen = parse_cases(cases)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colours = run_colours([r.label for r in records])
    plot_loss_curves({r.label: r.history for r in records}, out / "loss_curves.png", colours)
    sections = ["# Run comparison", "", "![loss curves](loss_curves.png)", ""]

    def table(stem: str, title: str, header: list[str], rows: list[list], notes: list[str] = ()) -> None:
        write_csv(out / f"{stem}.csv", header, rows)
        sections.extend([f"## {title}", "", markdown_table(header, rows), "", *notes, "", f"([{stem}.csv]({stem}.csv))", ""])

    table("loss_table", "Training loss per epoch (micro-US adaptive focal Table 1 layout)", *loss_table(records))
    if any(r.patients for r in records):
        protocol = next(r.evaluation.get("protocol", "?") for r in records if r.patients)
        table("per_patient", f"Per-patient DSC and HD95, protocol {protocol} (micro-US adaptive focal Table 2 layout)",
              *patient_table(records))
        if len(records) > 1:
            table("wilcoxon", "Paired Wilcoxon signed-rank tests", *wilcoxon_table(records, METRICS))
        raters = rater_names(records)
        if raters:
            header, rows, notes = rater_table(records, raters)
            table("inter_rater", "Model beside the other annotators (DSC against the expert)", header, rows, notes)
            table("hard_region", "Inside the hard region (annotators disagree, dilated as in training)",
                  *hard_region_table(records))
    per_slice = {r.label: r.slices for r in records if r.slices}
    if per_slice:
        edges = stratum_edges(per_slice)
        header, rows = stratified_table(per_slice)
        plot_stratified(header, rows, out / "stratified.png", colours)
        notes = [f"Tertile edges: area {edges['size'][0]:.1f} / {edges['size'][1]:.1f} mm^2, roughness "
                 f"(P^2 / 4 pi A) {edges['roughness'][0]:.3f} / {edges['roughness'][1]:.3f}.",
                 "", "![stratified DSC](stratified.png)"]
        table("stratified", "Per-slice DSC by object size and boundary roughness (A-FL Fig. 3 layout)",
              header, rows, notes)
    if overlays:
        figures = write_overlays(records, out, chosen, colours)
        sections += ["## Overlays (expert in green)", ""]
        sections += [f"![{p.stem}](overlays/{p.name})" for p in figures] + [""]
    report = out / "report.md"
    write_text(report, "\n".join(sections))
    return report
