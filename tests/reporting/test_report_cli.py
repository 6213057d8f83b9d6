"""evaluate and compare through the CLI: what evaluate records and prints, a clean predictions folder,
runs that do not pair refused, an empty expert volume warned about, the report's opening and strata."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch

from microseg.cli import main


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def rows_of(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}


def run_cli(args: list[str], capsys) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def one_error_line(code: int, err: list[str]) -> str:
    assert code == 2 and len(err) == 1 and err[0].startswith("microseg: error:"), err
    return err[0]


def predicting_copy(trained_run: Path, phantom: Path, run: Path) -> Path:
    """A copy of the tiny run whose output bias is shifted (in best.pt and last.pt) so that ~30% of
    the test pixels are foreground: two epochs on a toy set predict nothing yet."""
    from microseg.core.preprocess import resize_image
    from microseg.runs.checkpoint import load_checkpoint, save_checkpoint

    shutil.copytree(trained_run, run)
    volume = np.asarray(nib.load(sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]).dataobj)
    x = torch.from_numpy(np.stack([resize_image(s, 32) for s in volume.transpose(2, 1, 0)])).float()[:, None] / 254
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / name)
        with torch.no_grad():
            logits = state.build_model()(x).logits
        state.model["seg_head.bias"] -= torch.quantile(logits.flatten(), 0.7)
        save_checkpoint(state, run / name)
    return run


@pytest.fixture(scope="module")
def predicting_run(trained_run, phantom, tmp_path_factory) -> Path:
    return predicting_copy(trained_run, phantom, tmp_path_factory.mktemp("predicting") / "tiny_af")


@pytest.fixture(scope="module")
def evaluated_cli(predicting_run, phantom, tmp_path_factory):
    """A copy of the tiny run, evaluated on the test split through the CLI over a stale predictions folder."""
    run = tmp_path_factory.mktemp("cli") / "tiny_af"
    shutil.copytree(predicting_run, run)
    (run / "predictions").mkdir()
    (run / "predictions" / "microUS_train_07.nii.gz").write_bytes(b"an earlier evaluation's file")
    code = main(["evaluate", "--run", str(run), "--data", str(phantom), "--device", "cpu"])
    assert code == 0
    return run


def test_evaluate_prints_checkpoint_overwrite_and_means(predicting_run, phantom, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(predicting_run, run)
    code, out, _ = run_cli(["evaluate", "--run", run, "--data", phantom, "--device", "cpu"], capsys)
    assert code == 0
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    lines = out.strip().splitlines()
    assert f"with best.pt (epoch {state['epoch']}, best validation DSC {state['best_dsc']:.4f})" in lines[0]
    assert f"overwrites {run / 'metrics'}/ and {run / 'predictions'}/" in lines[0]
    mean = rows_of(run / "metrics" / "per_patient.csv")["mean"]
    assert f"mean over 2 of 2 patients: DSC {float(mean['dsc']):.4f}, HD95 {float(mean['hd95_mm']):.3f} mm" in out


def test_evaluation_json_and_a_clean_predictions_folder(evaluated_cli, phantom):
    record = json.loads((evaluated_cli / "metrics" / "evaluation.json").read_text())
    state = torch.load(evaluated_cli / "best.pt", map_location="cpu", weights_only=True)
    assert record["data"] == str(phantom.resolve()) and record["split"] == "test"
    assert record["protocol"] == "microsegnet" and record["resize"] == "bilinear"
    assert record["checkpoint"] == "best.pt" and record["checkpoint_epoch"] == state["epoch"]
    images = sorted(p.name for p in (phantom / "test" / "micro_ultrasound_scans").iterdir())
    assert sorted(p.name for p in (evaluated_cli / "predictions").iterdir()) == images  # the stale file is gone
    assert not [p for p in evaluated_cli.iterdir() if p.name.startswith(".predictions")]  # no temporary left


def test_failed_evaluation_keeps_the_earlier_predictions(evaluated_cli, phantom, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(evaluated_cli, run)
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    (data / "test" / "micro_ultrasound_scans" / "microUS_test_02.nii.gz").write_bytes(b"\x1f\x8b truncated")
    before = {p.name: p.read_bytes() for p in (run / "predictions").iterdir()}
    code, _, err = run_cli(["evaluate", "--run", run, "--data", data, "--device", "cpu"], capsys)
    assert "microUS_test_02.nii.gz" in one_error_line(code, err)
    assert {p.name: p.read_bytes() for p in (run / "predictions").iterdir()} == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_per_patient_volume_and_smoothness(evaluated_cli, phantom):
    """volume_ml from nibabel's voxel count and zooms; gamma_mSa by numpy on the 32 px training grid."""
    table = rows_of(evaluated_cli / "metrics" / "per_patient.csv")
    for case in ("01", "02"):
        img = nib.load(phantom / "test" / "expert_annotations" / f"expert_annotation_test_{case}.nii.gz")
        expert = np.asarray(img.dataobj).transpose(2, 1, 0) > 0
        assert float(table[case]["volume_ml"]) == pytest.approx(expert.sum() * np.prod(img.header.get_zooms()) / 1000)
        stack = np.stack(
            [cv2.resize(z.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA) >= 0.5 for z in expert]
        ).astype(np.float64)
        gradient = np.sqrt(sum(g**2 for g in np.gradient(stack)))
        assert float(table[case]["gamma_msa"]) == pytest.approx(gradient.mean(), rel=1e-9)


def test_compare_refuses_runs_of_different_splits(evaluated_cli, phantom, tmp_path, capsys):
    train = tmp_path / "on_train"
    shutil.copytree(evaluated_cli, train)
    assert main(["evaluate", "--run", str(train), "--data", str(phantom), "--split", "train", "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    code, _, err = run_cli(["compare", evaluated_cli, train, "--out", out], capsys)
    line = one_error_line(code, err)
    assert f"split test: {evaluated_cli}" in line and f"split train: {train}" in line
    assert not (out / "report.md").exists() and not (out / "wilcoxon.csv").exists()


def test_compare_refuses_runs_of_different_protocols(evaluated_cli, phantom, tmp_path, capsys):
    other = tmp_path / "all_slices"
    shutil.copytree(evaluated_cli, other)
    assert (
        main(["evaluate", "--run", str(other), "--data", str(phantom), "--protocol", "all-slices", "--device", "cpu"])
        == 0
    )
    capsys.readouterr()
    code, _, err = run_cli(["compare", evaluated_cli, other, "--out", tmp_path / "report"], capsys)
    line = one_error_line(code, err)
    assert f"protocol microsegnet: {evaluated_cli}" in line and f"protocol all-slices: {other}" in line


def test_empty_expert_volume_is_warned_and_evaluation_goes_on(predicting_run, phantom, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    path = data / "test" / "expert_annotations" / "expert_annotation_test_02.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), path)
    run = tmp_path / "run"
    shutil.copytree(predicting_run, run)
    code, out, err = run_cli(["evaluate", "--run", run, "--data", data, "--device", "cpu"], capsys)
    assert code == 0
    warnings = [line for line in err if line.startswith("microseg: warning:")]
    assert len(warnings) == 1 and "case 02" in warnings[0] and "empty on every slice" in warnings[0]
    assert "NaN under protocol microsegnet" in warnings[0]
    assert "mean over 1 of 2 patients" in out and "left out: 02" in out
    row = rows_of(run / "metrics" / "per_patient.csv")["02"]
    assert math.isnan(float(row["dsc"])) and float(row["volume_ml"]) == 0.0


def test_report_opens_with_what_was_compared_and_its_results(evaluated_cli, cache, phantom, tmp_path, capsys):
    from train_helpers import train_tiny

    trained = train_tiny(cache, tmp_path / "runs" / "raw_bce", loss="ag_bce", epochs=1)
    second = predicting_copy(trained, phantom, tmp_path / "runs" / "tiny_bce")
    assert main(["evaluate", "--run", str(second), "--data", str(phantom), "--device", "cpu"]) == 0
    out = tmp_path / "report"
    code, _, _ = run_cli(["compare", evaluated_cli, second, "--out", out], capsys)
    assert code == 0
    report = (out / "report.md").read_text()
    opening = report.split("## Results")[0]
    assert "| tiny_af | adaptive_focal | tiny | 2 of 2 | best.pt (epoch" in opening
    assert "| tiny_bce | ag_bce | tiny | 1 of 1 |" in opening
    assert f"Data: {phantom.resolve()}; split test, protocol microsegnet; 2 patients (01, 02)." in opening
    results = report.split("## Results")[1].split("##")[0]
    assert "On DSC the best is" in results and "95% CI" in results
    assert "With 2 patients the exact two-sided Wilcoxon signed-rank test cannot give p below 2 / 2^2 = 0.5" in results
    # the dataset check prepare wrote beside the cache: its inter-rater baseline, as check.json holds it
    check = json.loads(cache.with_suffix(".check.json").read_text())
    assert "Inter-rater baseline from the dataset check" in report and str(cache.with_suffix(".check.json")) in report
    baseline = rows_of_split(out / "dataset_check.csv")
    clinician = check["splits"]["test"]["raters"]["clinician"]
    assert float(baseline["test", "clinician"]["DSC mean"]) == pytest.approx(clinician["dsc"]["mean"])
    tests = csv_rows(out / "wilcoxon.csv")
    assert {"mean_diff", "ci95_low", "ci95_high"} <= set(tests[0])
    strata = csv_rows(out / "stratified_patients.csv")
    assert {(r["factor"], r["stratum"]) for r in strata} >= {("volume", "small"), ("smoothness", "poor")}
    scored = sum(
        not math.isnan(float(row["dsc"]))
        for run in (evaluated_cli, second)
        for case, row in rows_of(run / "metrics" / "per_patient.csv").items()
        if case in ("01", "02")
    )
    assert sum(int(r["n_patients"]) for r in strata if r["factor"] == "volume") == scored
    assert (out / "stratified_patients.png").stat().st_size > 1000


def rows_of_split(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as handle:
        return {(row["split"], row["rater"]): row for row in csv.DictReader(handle)}


def test_help_of_evaluate_and_compare(capsys):
    def help_of(verb: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([verb, "--help"])
        assert exit_.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    evaluate = help_of("evaluate")
    assert (
        "best.pt" in evaluate and "last.pt" in evaluate and "Overwrites the run's metrics/ and predictions/" in evaluate
    )
    assert "split to evaluate: train or test" in evaluate
    assert "must share the split and protocol" in help_of("compare")


def test_evaluate_refuses_an_unknown_split(trained_run, phantom, capsys):
    code, _, err = run_cli(["evaluate", "--run", trained_run, "--data", phantom, "--split", "val"], capsys)
    assert "--split 'val' is not one of train, test" in one_error_line(code, err)
