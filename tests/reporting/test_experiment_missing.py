"""`compare EXP`: missing is worst (an empty prediction, a cell with no evaluation), `--missing drop`,
HD95's cap from the images' headers, the primary metric, and `experiment power`; experiments written by
hand, every number recomputed from the cells' CSVs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_experiment_report import (
    LOSSES,
    N_PATIENTS,
    SEEDS,
    chosen_scores,
    read_rows,
    refused,
    run_cli,
    write_experiment,
)


def scores_with(empty: dict[tuple, list[int]] | None = None, **kwargs) -> dict[tuple, dict[str, np.ndarray]]:
    """chosen_scores with NaN (an empty prediction) at the given patient indices of the given cells."""
    scores = chosen_scores(**kwargs)
    for key, indices in (empty or {}).items():
        for metric in ("dsc", "hd95_mm"):
            scores[key][metric] = scores[key][metric].copy()
            scores[key][metric][indices] = math.nan
    return scores


def grid(scores: dict[tuple, dict[str, np.ndarray]], metric: str, worst: float, missing=()) -> np.ndarray:
    """[loss, seed, patient] with NaN and the cells in `missing` at `worst`."""
    x = np.array([[scores[loss, seed, None][metric] for seed in SEEDS] for loss in LOSSES])
    for loss, seed, _ in missing:
        x[LOSSES.index(loss), SEEDS.index(seed)] = math.nan
    return np.where(np.isnan(x), worst, x)


def test_an_empty_prediction_and_an_unevaluated_cell_count_as_the_worst_value(tmp_path, capsys):
    scores = scores_with({("mid", 1, None): [2, 5], ("low", 3, None): [0]})
    exp = write_experiment(tmp_path / "exp", scores, unevaluated=[("mid", 2, None)])
    code, _, err = run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)
    assert code == 0 and err == [
        "microseg: warning: 1 of 9 cells are not evaluated (mid__s2): each counts as the worst value of every metric"
    ]
    observed = [v for k, s in scores.items() if k != ("mid", 2, None) for v in s["hd95_mm"] if not math.isnan(v)]
    cap = max(observed)  # the data folder of these cells does not exist: the largest HD95 scored
    rows = {r["loss"]: r for r in read_rows(tmp_path / "r" / "losses.csv")}
    for metric, title, worst in (("dsc", "DSC", 0.0), ("hd95_mm", "HD95 (mm)", cap)):
        x = grid(scores, metric, worst, [("mid", 2, None)])
        for i, loss in enumerate(LOSSES):
            assert float(rows[loss][f"{title} mean"]) == pytest.approx(x[i].mean(), abs=1e-12)
            assert float(rows[loss][f"{title} seed sd"]) == pytest.approx(np.std(x[i].mean(axis=1), ddof=1))
        assert [rows[loss][f"{title} missing scores"] for loss in LOSSES] == ["0", "2", "1"]
    assert [(rows[x]["cells"], rows[x]["evaluated"], rows[x]["missing cells"]) for x in LOSSES] == [
        ("3", "3", "0"),
        ("3", "2", "1"),
        ("3", "3", "0"),
    ]
    per_patient = {r["case_id"]: r for r in read_rows(tmp_path / "r" / "per_patient.csv")}
    assert float(per_patient["03"]["mid DSC"]) == pytest.approx(scores["mid", 3, None]["dsc"][2] / 3)
    significance = {(r["metric"], r["loss_a"], r["loss_b"]): r for r in read_rows(tmp_path / "r" / "significance.csv")}
    x = grid(scores, "dsc", 0.0, [("mid", 2, None)])
    assert float(significance["DSC", "good", "mid"]["mean_diff"]) == pytest.approx((x[0] - x[1]).mean())
    text = (tmp_path / "r" / "report.md").read_text()
    top = text.split("## What was compared", 1)[0]
    assert "**Missing is worst**: 1 cell(s) of the design have no evaluation (mid seed 2)" in top
    assert "patients of evaluated cells have no score: DSC 3, HD95 3; each missing score counts" in top
    assert f"counts as DSC 0 or HD95 {cap:.3f} mm (the largest HD95 scored in this comparison" in text
    paragraph = text.split("## Results\n\n", 1)[1].split("\n", 1)[0]
    assert (
        "Missing is worst: 1 cell(s) without an evaluation (mid seed 2); 3 patient(s) without a DSC (mid 2, low 1); "
        f"3 patient(s) without a HD95 (mid 2, low 1) count as the worst value (DSC 0.0000 and HD95 {cap:.3f} mm)."
    ) in paragraph
    cells = {r["cell"]: r for r in read_rows(tmp_path / "r" / "cells.csv")}
    assert cells["mid__s2"]["state"] == "trained, not evaluated"


def phantom_test_patients(phantom: Path) -> dict[str, float]:
    """Test patient id -> the image's in-plane diagonal in mm, from the NIfTI header with nibabel."""
    found = {}
    for path in sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz")):
        header = nib.load(path).header
        (x, y, _), (sx, sy, _) = header.get_data_shape(), header.get_zooms()
        found[re.search(r"_(\d+)\.nii\.gz$", path.name).group(1)] = math.hypot(x * sx, y * sy)
    return found


def test_hd95s_worst_value_is_the_largest_image_diagonal_of_the_test_patients(phantom, tmp_path, capsys):
    diagonals = phantom_test_patients(phantom)
    patients = sorted(diagonals)
    rng = np.random.default_rng(1)
    scores = {
        (loss, seed, None): {"dsc": rng.uniform(0.8, 0.9, len(patients)), "hd95_mm": rng.uniform(1, 2, len(patients))}
        for loss in ("a", "b")
        for seed in (1, 2)
    }
    scores["b", 2, None]["hd95_mm"][0] = math.nan
    exp = write_experiment(
        tmp_path / "exp", scores, test=patients, patients=patients, evaluation={"data": str(phantom)}
    )
    assert run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)[0] == 0
    cap = max(diagonals.values())
    rows = {r["loss"]: r for r in read_rows(tmp_path / "r" / "losses.csv")}
    b = np.array([scores["b", s, None]["hd95_mm"] for s in (1, 2)])
    assert float(rows["b"]["HD95 (mm) mean"]) == pytest.approx(np.where(np.isnan(b), cap, b).mean())
    text = (tmp_path / "r" / "report.md").read_text()
    assert f"HD95 {cap:.3f} mm (the largest image diagonal of the {len(patients)} patients' images in" in text


def test_missing_drop_drops_empty_slots_then_patients(tmp_path, capsys):
    scores = scores_with({("low", 3, None): [0, 4]})
    exp = write_experiment(tmp_path / "exp", scores, unevaluated=[("mid", 2, None)])
    code, _, err = run_cli(["compare", exp, "--out", tmp_path / "r", "--missing", "drop"], capsys)
    assert code == 0 and err[0].endswith("(mid__s2): dropped")
    kept_patients = [p for p in range(N_PATIENTS) if p not in (0, 4)]
    rows = {r["loss"]: r for r in read_rows(tmp_path / "r" / "losses.csv")}
    for loss in LOSSES:  # seed 2 dropped (mid has none), then patients 01 and 05 (low's NaN)
        x = np.array([scores[loss, s, None]["dsc"][kept_patients] for s in (1, 3)])
        assert float(rows[loss]["DSC mean"]) == pytest.approx(x.mean())
    significance = {(r["metric"], r["loss_a"], r["loss_b"]): r for r in read_rows(tmp_path / "r" / "significance.csv")}
    good_low = significance["DSC", "good", "low"]  # the pair's own grid: all 3 seeds, 8 patients
    assert (good_low["replicates"], good_low["patients"]) == ("3", "8")
    d = np.array([scores["good", s, None]["dsc"] - scores["low", s, None]["dsc"] for s in SEEDS])[:, kept_patients]
    assert float(good_low["mean_diff"]) == pytest.approx(d.mean())
    good_mid = significance["DSC", "good", "mid"]
    assert (good_mid["replicates"], good_mid["patients"]) == ("2", "10")
    text = (tmp_path / "r" / "report.md").read_text()
    assert text.split("## What was compared", 1)[0].count("**Missing values dropped** (`--missing drop`)") == 1
    assert "the statistics use DSC 2 of 3 replicate slots and 8 of 10 patients" in text
    assert float(rows["good"]["DSC missing scores"]) == 0 and rows["mid"]["missing cells"] == "1"


def test_missing_drop_that_leaves_nothing_and_missing_on_run_folders_are_refused(tmp_path, capsys):
    scores = chosen_scores(("good", "low"), (1,))
    exp = write_experiment(tmp_path / "exp", scores, unevaluated=[("low", 1, None)])
    code, _, err = run_cli(["compare", exp, "--out", tmp_path / "r", "--missing", "drop"], capsys)
    assert code == 2 and err[-1].startswith("microseg: error: --missing drop leaves no complete grid of DSC")
    assert not (tmp_path / "r").exists()
    runs = [exp / "runs" / "good__s1"]
    line = refused(["compare", *runs, "--out", tmp_path / "r", "--missing", "drop"], capsys, tmp_path / "r")
    assert "--missing applies to experiment folders" in line


def with_primary(exp: Path, primary: str) -> Path:
    record = json.loads((exp / "experiment.json").read_text())
    record["plan"]["primary"] = primary
    (exp / "experiment.json").write_text(json.dumps(record))
    return exp


def test_the_primary_metric_carries_the_verdict_and_holm_family(tmp_path, capsys):
    exp = with_primary(write_experiment(tmp_path / "exp", chosen_scores()), "hd95_mm")
    assert run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)[0] == 0
    rows = read_rows(tmp_path / "r" / "significance.csv")
    assert [(r["metric"], r["family"]) for r in rows] == [("HD95 (mm)", "primary")] * 3 + [("DSC", "secondary")] * 3
    text = (tmp_path / "r" / "report.md").read_text()
    paragraph = text.split("## Results\n\n", 1)[1].split("\n", 1)[0]
    assert "primary metric HD95, secondary DSC" in paragraph and "On HD95 (primary;" in paragraph
    assert "Secondary, DSC (the same test" in paragraph and "## What this design resolves on HD95" in text
    assert {r["metric"] for r in read_rows(tmp_path / "r" / "power.csv")} == {"HD95 (mm)"}


def test_experiments_of_different_primary_metrics_and_an_unknown_primary_are_refused(tmp_path, capsys):
    scores = chosen_scores()
    first = write_experiment(tmp_path / "a", {k: v for k, v in scores.items() if k[0] != "low"})
    second = with_primary(
        write_experiment(tmp_path / "b", {k: v for k, v in scores.items() if k[0] == "low"}), "hd95_mm"
    )
    line = refused(["compare", first, second, "--out", tmp_path / "r"], capsys, tmp_path / "r")
    assert "different primary metrics (dsc, hd95_mm)" in line
    with_primary(first, "iou")
    line = refused(["compare", first, "--out", tmp_path / "r"], capsys, tmp_path / "r")
    assert "primary must be one of the report's metrics (dsc, hd95_mm), got 'iou'" in line


def test_experiment_power_prints_one_line_per_design_and_the_seeds_needed(tmp_path, capsys):
    from microseg.stats.power import Components, seeds_needed, simulate_test

    exp = write_experiment(tmp_path / "exp", chosen_scores())
    code, out, err = run_cli(["experiment", "power", exp, "--delta", "0.004", "--seeds", "2", "5"], capsys)
    assert code == 0 and not err, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"pilot {exp}: 3 losses x 3 seed(s) x 10 patients; DSC (primary) differences:")
    assert lines[1].startswith("test: alpha 0.05 / 3 = 0.01667 (Holm's first step over the 3 pair(s) of 3 losses)")
    assert [line.split(":")[0] for line in lines[2:4]] == ["2 seed(s) x 10 patients", "5 seed(s) x 10 patients"]
    significance = [r for r in read_rows(compare_report(exp, tmp_path, capsys)) if r["family"] == "primary"]
    components = Components(
        *(
            float(np.mean([float(r[c]) ** 2 for r in significance]))
            for c in ("patient_sd", "replicate_sd", "residual_sd")
        )
    )
    for line, seeds in zip(lines[2:4], (2, 5), strict=True):
        power = simulate_test(components, seeds, N_PATIENTS, 0.05 / 3).power(0.004)
        assert f"power {power:.2f} at 0.004 DSC" in line
    needed = seeds_needed(components, 0.004, 0, N_PATIENTS, 0.05 / 3)
    assert lines[-1] == (
        f"to resolve 0.004 DSC at 80% power with 10 patients, run {needed} seeds"
        if needed
        else "no number of seeds up to 200 resolves 0.004 DSC at 80% power with 10 patients: plan more patients "
        "(--patients N)"
    )
    code, out, _ = run_cli(
        ["experiment", "power", exp, "--delta", "0.004", "--patients", "40", "--losses", "2"], capsys
    )
    assert code == 0 and "x 40 patients" in out and "alpha 0.05 / 1 = 0.05" in out
    assert len(out.strip().splitlines()) == 2 + 3 + 1  # the pilot's seeds, 2x and 4x


def compare_report(exp: Path, tmp_path: Path, capsys) -> Path:
    assert run_cli(["compare", exp, "--out", tmp_path / "report"], capsys)[0] == 0
    return tmp_path / "report" / "significance.csv"


def test_experiment_power_refusals(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", chosen_scores())
    for args, says in (
        (["--delta", "0"], "--delta must be > 0"),
        (["--delta", "0.01", "--patients", "1"], "--patients must be at least 2"),
        (["--delta", "0.01", "--seeds", "0"], "--seeds must be at least 1"),
    ):
        code, _, err = run_cli(["experiment", "power", exp, *args], capsys)
        assert code == 2 and err == [f"microseg: error: {err[0].removeprefix('microseg: error: ')}"] and says in err[0]
    one = write_experiment(tmp_path / "one", chosen_scores(("good",)))
    code, _, err = run_cli(["experiment", "power", one, "--delta", "0.01"], capsys)
    assert code == 2 and "has one loss" in err[-1]


def test_cells_that_predict_nothing_score_the_worst_value(tmp_path, capsys):
    blank = {"dsc": np.full(N_PATIENTS, math.nan), "hd95_mm": np.full(N_PATIENTS, math.nan)}
    scores = chosen_scores(("good", "low"), (1, 2))
    scores = {k: (v if k == ("good", 1, None) else blank) for k, v in scores.items()}
    exp = write_experiment(tmp_path / "exp", scores)
    assert run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)[0] == 0
    cap = scores["good", 1, None]["hd95_mm"].max()  # no images here: the largest HD95 scored
    rows = {r["loss"]: r for r in read_rows(tmp_path / "r" / "losses.csv")}
    assert float(rows["low"]["DSC mean"]) == 0 and float(rows["low"]["HD95 (mm) mean"]) == pytest.approx(cap)
    assert rows["low"]["DSC missing scores"] == str(2 * N_PATIENTS) and rows["good"]["DSC missing scores"] == "10"
    good = np.array([scores["good", 1, None]["dsc"], np.zeros(N_PATIENTS)])
    assert float(rows["good"]["DSC mean"]) == pytest.approx(good.mean())
    assert run_cli(["experiment", "power", exp, "--delta", "0.01"], capsys)[0] == 0
    nothing = write_experiment(tmp_path / "nothing", {k: blank for k in scores})
    code, _, err = run_cli(["compare", nothing, "--out", tmp_path / "n"], capsys)
    assert code == 2 and "HD95 has no worst value" in err[-1] and "--missing drop" in err[-1]


def test_losses_with_identical_scores_leave_no_variance_to_plan_from(tmp_path, capsys):
    scores = chosen_scores(("good", "low"), (1, 2))
    for seed in (1, 2):
        scores["low", seed, None] = scores["good", seed, None]
    exp = write_experiment(tmp_path / "exp", scores)
    assert run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)[0] == 0
    (row, *_) = read_rows(tmp_path / "r" / "significance.csv")
    assert (float(row["mean_diff"]), float(row["p_value"]), row["significant"]) == (0.0, 1.0, "no")
    assert not (tmp_path / "r" / "power.csv").exists()
    code, _, err = run_cli(["experiment", "power", exp, "--delta", "0.01"], capsys)
    assert code == 2 and "differences have no variance at all" in err[-1]
