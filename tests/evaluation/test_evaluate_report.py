"""Evaluation, prediction and comparison, checked against medpy, scipy and hand computations."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import cv2
import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from medpy.metric.binary import dc, hd95
from scipy.stats import wilcoxon

from microseg.cli import main
from microseg.evaluation.evaluate import evaluate
from train_helpers import train_tiny


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def rows_of(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row[next(iter(row))]: row for row in csv.DictReader(handle)}


def zyx(path: Path) -> np.ndarray:
    """A NIfTI as [Z, H, W] read with nibabel alone (slice z = nib_array[:, :, z].T)."""
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def evaluated(trained_run, phantom, tmp_path_factory):
    """The tiny run, its output bias shifted so that ~30% of the test pixels are foreground (two
    epochs on a toy set predict nothing yet), evaluated on the phantom's test split."""
    from microseg.core.preprocess import resize_image
    from microseg.runs.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path_factory.mktemp("evaluated") / "tiny_af"
    shutil.copytree(trained_run, run)
    state = load_checkpoint(run / "last.pt")
    model = state.build_model()
    volume = zyx(sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0])
    x = torch.from_numpy(np.stack([resize_image(s, 32) for s in volume])).float()[:, None] / 254
    with torch.no_grad():
        logits = model(x).logits
    state.model["seg_head.bias"] -= torch.quantile(logits.flatten(), 0.7)
    save_checkpoint(state, run / "last.pt")
    (run / "best.pt").unlink(missing_ok=True)
    evaluate(run, phantom, device="cpu")
    return run


def test_per_patient_matches_medpy_on_written_predictions(evaluated, phantom):
    table = rows_of(evaluated / "metrics" / "per_patient.csv")
    images = sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))
    assert len(images) == 2 and {"mean", "std", "median"} <= set(table)
    for image_path in images:
        case_id = image_path.name[-9:-7]
        pred_path = evaluated / "predictions" / image_path.name
        assert np.allclose(nib.load(pred_path).affine, nib.load(image_path).affine)  # source geometry
        pred = zyx(pred_path) > 0
        ref = zyx(phantom / "test" / "expert_annotations" / f"expert_annotation_test_{case_id}.nii.gz") > 0
        sx, sy, _ = nib.load(image_path).header.get_zooms()
        both = [z for z in range(len(ref)) if pred[z].any() and ref[z].any()]
        assert len(both) >= 2
        expected_dsc = np.mean([dc(pred[z], ref[z]) for z in both])
        expected_hd = np.mean([hd95(pred[z], ref[z], voxelspacing=(sy, sx)) for z in both])
        row = table[case_id]
        assert float(row["dsc"]) == pytest.approx(expected_dsc, abs=1e-9)
        assert float(row["hd95_mm"]) == pytest.approx(expected_hd, abs=1e-6)
        assert int(row["n_slices"]) == len(both)
        clinician = zyx(phantom / "test" / "clinician_annotations" / f"clinician_annotation_test_{case_id}.nii.gz") > 0
        rater = [dc(clinician[z], ref[z]) for z in range(len(ref)) if clinician[z].any() and ref[z].any()]
        assert float(row["clinician_dsc"]) == pytest.approx(np.mean(rater), abs=1e-9)


def test_hard_region_dsc_by_hand(evaluated, phantom):
    row = rows_of(evaluated / "metrics" / "per_patient.csv")["01"]
    test = phantom / "test"
    expert = zyx(test / "expert_annotations" / "expert_annotation_test_01.nii.gz") > 0
    pred = zyx(evaluated / "predictions" / "microUS_test_01.nii.gz") > 0
    others = [zyx(p) > 0 for p in sorted(test.glob("*_annotations/*_test_01.nii.gz")) if "/expert_" not in str(p)]
    assert len(others) == 4  # non-expert, clinician, master student, medical student
    k = round(4 * expert.shape[1] / 32)  # the training kernel (4 at the 32 px output) in native rows
    region = np.zeros_like(expert)
    for other in others:
        for z in range(len(expert)):
            xor = (expert[z] ^ other[z]).astype(np.uint8)
            region[z] |= cv2.dilate(xor, np.ones((k, k), np.uint8)) > 0
    inter = np.count_nonzero(pred & expert & region)
    expected = 2 * inter / (np.count_nonzero(pred & region) + np.count_nonzero(expert & region))
    assert 0 < expected < 1 and float(row["hard_dsc"]) == pytest.approx(expected, abs=1e-12)
    assert float(row["hard_error_rate"]) == pytest.approx(np.count_nonzero((pred ^ expert) & region) / region.sum())


def test_compare_tables_plots_and_tests(evaluated, cache, phantom, tmp_path):
    second = train_tiny(cache, tmp_path / "runs" / "tiny_bce", loss="ag_bce", epochs=1)
    evaluate(second, phantom, device="cpu")
    out = tmp_path / "report"
    assert main(["compare", str(evaluated), str(second), "--out", str(out), "--overlays"]) == 0
    report = (out / "report.md").read_text()
    for heading in ("Table 1 layout", "Table 2 layout", "Wilcoxon", "other annotators", "hard region", "roughness"):
        assert heading in report
    history = csv_rows(evaluated / "history.csv")
    table = csv_rows(out / "loss_table.csv")
    assert [float(r[f"{evaluated.name} (adaptive_focal)"]) for r in table] == [float(r["loss"]) for r in history]
    assert math.isnan(float(table[1][f"{second.name} (ag_bce)"]))  # one epoch only
    a = rows_of(evaluated / "metrics" / "per_patient.csv")
    b = rows_of(second / "metrics" / "per_patient.csv")
    per_patient = rows_of(out / "per_patient.csv")
    dsc_a = [float(a[c]["dsc"]) for c in ("01", "02")]
    assert float(per_patient["mean"][f"{evaluated.name} (adaptive_focal) DSC"]) == pytest.approx(np.mean(dsc_a))
    diffs = [float(a[c]["hd95_mm"]) - float(b[c]["hd95_mm"]) for c in ("01", "02")]
    tests = csv_rows(out / "wilcoxon.csv")
    hd_test = next(t for t in tests if t["metric"] == "HD95 (mm)")
    if any(math.isnan(d) for d in diffs):
        assert hd_test["n"] == str(sum(not math.isnan(d) for d in diffs))
    else:
        assert float(hd_test["p_value"]) == pytest.approx(wilcoxon(diffs).pvalue)
    for png in ["loss_curves.png", "stratified.png", *[f"overlays/{p.name}" for p in (out / "overlays").iterdir()]]:
        picture = matplotlib.image.imread(out / png)
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture[..., :3].std() > 0.05


def test_predict_file_and_folder(trained_run, phantom, tmp_path):
    source = phantom / "test" / "micro_ultrasound_scans"
    one = sorted(source.glob("*.nii.gz"))[0]
    assert main(["predict", "--run", str(trained_run), "--input", str(one), "--out", str(tmp_path / "one.nii.gz")]) == 0
    assert zyx(tmp_path / "one.nii.gz").shape == zyx(one).shape
    assert main(["predict", "--run", str(trained_run), "--input", str(source), "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(p.name for p in source.iterdir())


@pytest.mark.parametrize("case", ["missing_run", "no_split", "bad_protocol_cases"])
def test_bad_evaluate_inputs_give_one_line(case, trained_run, phantom, tmp_path, capsys):
    args = {
        "missing_run": ["evaluate", "--run", str(tmp_path / "nope"), "--data", str(phantom)],
        "no_split": ["evaluate", "--run", str(trained_run), "--data", str(phantom), "--split", "validation"],
        "bad_protocol_cases": ["compare", str(trained_run), "--out", str(tmp_path / "r"), "--cases", "01:x"],
    }[case]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("microseg: error:")


FIRST_RELEASE_KEYS = {
    "model",
    "optimizer",
    "scaler",
    "epoch",
    "step",
    "accum",
    "history",
    "best_dsc",
    "model_config",
    "train_config",
    "calf_stats",
}  # and "rng": dropout's stream now follows from the position


def test_checkpoint_round_trips_and_carries_its_preprocessing(trained_run):
    from microseg.core.preprocess import Preprocess
    from microseg.runs.checkpoint import load_checkpoint

    state = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and set(state) >= FIRST_RELEASE_KEYS  # still a plain dict on disk
    checkpoint = load_checkpoint(trained_run / "last.pt")
    assert checkpoint.preprocess == Preprocess(size=32, kernel_sizes=(1, 2, 3, 4))
    assert checkpoint.preprocess.scale_sizes == (4, 8, 16, 32)
    assert checkpoint.epoch == 2 and checkpoint.step == 0 and checkpoint.scheduler["last_epoch"] == 6


def test_first_release_checkpoint_loads_and_evaluates_to_the_same_numbers(evaluated, phantom, tmp_path):
    """A run whose checkpoint has the first release's 12-key dict (no preprocess, no scheduler)."""
    old = tmp_path / "first_release"
    shutil.copytree(evaluated, old, ignore=shutil.ignore_patterns("metrics", "predictions"))
    state = torch.load(old / "last.pt", map_location="cpu", weights_only=True)
    state = {**{key: state[key] for key in FIRST_RELEASE_KEYS}, "rng": torch.get_rng_state()}
    state["train_config"]["deep_supervision"] = True  # the first release's train config had it
    torch.save(state, old / "last.pt")
    evaluate(old, phantom, device="cpu")
    new, first = (
        list(csv.reader((run / "metrics" / "per_patient.csv").read_text().splitlines())) for run in (evaluated, old)
    )
    assert first == new


def test_prediction_follows_the_checkpoints_preprocessing(evaluated, phantom, tmp_path):
    """A run whose Preprocess says nearest predicts as `--resize nearest` does on the same weights."""
    import dataclasses

    from microseg.runs.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "nearest_run"
    shutil.copytree(evaluated, run, ignore=shutil.ignore_patterns("metrics", "predictions"))  # last.pt only
    checkpoint = load_checkpoint(run / "last.pt")
    checkpoint.preprocess = dataclasses.replace(checkpoint.preprocess, prediction_resize="nearest")
    save_checkpoint(checkpoint, run / "last.pt")
    one = sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]
    assert main(["predict", "--run", str(run), "--input", str(one), "--out", str(tmp_path / "own.nii.gz")]) == 0
    assert (
        main(
            [
                "predict",
                "--run",
                str(evaluated),
                "--input",
                str(one),
                "--out",
                str(tmp_path / "asked.nii.gz"),
                "--resize",
                "nearest",
            ]
        )
        == 0
    )
    own = zyx(tmp_path / "own.nii.gz")
    assert own.any() and np.array_equal(own, zyx(tmp_path / "asked.nii.gz"))


def test_inference_keeps_the_trainings_precision_on_cuda_only():
    from types import SimpleNamespace

    from microseg.runs.checkpoint import Checkpoint, RunModel

    def on(device: str) -> SimpleNamespace:
        return SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device(device))]))

    for amp in ("bf16", "fp16", None):
        checkpoint = Checkpoint({}, {}, None, train_config={"amp": amp})  # type: ignore[arg-type]
        assert RunModel(on("cuda"), None, checkpoint, None).amp == amp  # type: ignore[arg-type]
        assert RunModel(on("cpu"), None, checkpoint, None).amp is None  # type: ignore[arg-type]
