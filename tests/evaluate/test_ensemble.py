"""`evaluate` / `predict --ensemble`: the members' probability maps averaged before the 0.5 threshold,
checked against the average computed by hand from each member's own network."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from cli_helpers import one_error, run_cli
from train_helpers import train_tiny
from microseg.data.layout import find_cases
from microseg.data.volumes import read_volume
from microseg.checkpoint import load_run_model
from microseg.preprocess import resize_image


def averaged_by_hand(runs, image: np.ndarray) -> np.ndarray:
    """mean_i sigmoid(f_i(slice)) resized bilinearly to the native grid, per slice: [Z, H, W]."""
    maps = []
    for run in runs:
        loaded = load_run_model(run, "cpu")
        model, pre = loaded.model, loaded.preprocess
        x = torch.from_numpy(np.stack([resize_image(s, pre.size) for s in image])).float()[:, None]
        with torch.no_grad():
            p = torch.sigmoid(model((x / pre.intensity_max).clamp(0, 1)).logits.float())
        maps.append(F.interpolate(p, size=image.shape[1:], mode="bilinear", align_corners=False)[:, 0].numpy())
    return np.mean(maps, axis=0)


def test_an_ensemble_evaluates_and_predicts_the_averaged_probabilities(trained_run, cache, phantom, tmp_path, capsys):
    other = train_tiny(cache, tmp_path / "other", seed=8, epochs=3)
    out = tmp_path / "ensemble"
    code, printed, err = run_cli(
        ["evaluate", "--ensemble", trained_run, other, "--out", out, "--data", phantom, "--device", "cpu"], capsys
    )
    assert code == 0, err
    record = json.loads((out / "metrics" / "evaluation.json").read_text())
    assert record["checkpoint"] == "ensemble" and record["ensemble"] == [str(trained_run), str(other)]
    assert (out / "metrics" / "per_patient.csv").is_file() and (out / "metrics" / "per_slice.csv").is_file()
    cases = find_cases(phantom, "test", require_non_expert=False)
    for case in cases:
        image = read_volume(case.image, "image").array
        p = averaged_by_hand([trained_run, other], image)
        written = read_volume(out / "predictions" / case.image.name, "mask").array.astype(bool)
        undecided = np.abs(p - 0.5) < 1e-5  # float32 rounding may tip a pixel this close to the threshold
        assert written.shape == p.shape and undecided.mean() < 1e-3
        assert np.array_equal(written[~undecided], (p > 0.5)[~undecided])
    mask = tmp_path / "predicted.nii.gz"
    code, _, err = run_cli(
        ["predict", "--ensemble", trained_run, other, "--input", cases[0].image, "--out", mask, "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    assert np.array_equal(
        read_volume(mask, "mask").array, read_volume(out / "predictions" / cases[0].image.name, "mask").array
    )


def test_ensemble_refusals(trained_run, phantom, tmp_path, capsys):
    code, _, err = run_cli(["evaluate", "--ensemble", trained_run, "--out", tmp_path / "e", "--data", phantom], capsys)
    one_error(code, err, "at least two runs")
    code, _, err = run_cli(["evaluate", "--ensemble", trained_run, trained_run, "--data", phantom], capsys)
    one_error(code, err, "--ensemble needs --out")
    code, _, err = run_cli(
        [
            "evaluate",
            "--run",
            trained_run,
            "--ensemble",
            trained_run,
            trained_run,
            "--out",
            tmp_path / "e",
            "--data",
            phantom,
        ],
        capsys,
    )
    one_error(code, err, "either --run RUN or --ensemble")
    assert not (tmp_path / "e").exists()
