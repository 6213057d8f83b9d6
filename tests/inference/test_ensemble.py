"""`evaluate` / `predict --ensemble`: the members' probability maps averaged before the 0.5 threshold,
checked against the average computed by hand from each member's own network; every member checked
as `evaluate --run` checks its run (its lock, its training cache's sources, its checkpoint's trust),
and each member's checkpoint recorded in evaluation.json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import one_error, run_cli
from microseg.core.preprocess import resize_image
from microseg.data.layout import find_cases
from microseg.data.volumes import read_volume
from microseg.runs.checkpoint import load_run_model
from microseg.runs.folder import RunLock
from train_helpers import train_tiny


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
    before = sorted(p.name for p in trained_run.iterdir())
    code, _, err = run_cli(
        ["evaluate", "--ensemble", trained_run, trained_run, "--out", trained_run, "--data", phantom], capsys
    )
    one_error(code, err, f"--out {trained_run} is a trained run")
    assert sorted(p.name for p in trained_run.iterdir()) == before


@pytest.fixture
def members(trained_run, tmp_path):
    """Two copies of the session's run, as two members a test may change."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(trained_run, first)
    shutil.copytree(trained_run, second)
    return first, second


def ensemble_argv(verb: str, runs, phantom, tmp_path) -> list:
    if verb == "evaluate":
        return ["evaluate", "--ensemble", *runs, "--out", tmp_path / "out", "--data", phantom, "--device", "cpu"]
    scan = find_cases(phantom, "test", require_non_expert=False)[0].image
    return ["predict", "--ensemble", *runs, "--input", scan, "--out", tmp_path / "out" / "mask.nii.gz"]


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_a_member_that_train_writes_is_refused_naming_its_pid(verb, members, phantom, tmp_path, capsys):
    first, second = members
    lock = RunLock(second)
    lock.acquire()  # as `train` holds it while it writes the run
    try:
        code, _, err = run_cli(ensemble_argv(verb, [first, second], phantom, tmp_path), capsys)
        one_error(code, err, f"run {second} is being written", f"pid {os.getpid()}")
    finally:
        lock.release()
    assert not (tmp_path / "out").exists()
    assert not (first / ".lock").exists()  # the locks it took are given back


def test_a_member_whose_sources_changed_is_refused_unless_told(trained_run, phantom, tmp_path, capsys):
    from microseg.data.prepare import prepare_cache

    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    own = train_tiny(prepare_cache(data, tmp_path / "cache.h5", size=32), tmp_path / "own", epochs=1)
    scans = sorted((data / "train" / "micro_ultrasound_scans").glob("*.nii.gz"))
    shutil.copy(scans[0], scans[1])  # the member's training scan replaced by another patient's
    for verb in ("evaluate", "predict"):
        argv = ensemble_argv(verb, [trained_run, own], phantom, tmp_path)
        code, _, err = run_cli(argv, capsys)
        one_error(code, err, str(scans[1]), "changed since the cache")
        assert not (tmp_path / "out").exists()
        code, _, err = run_cli([*argv, "--no-source-check"], capsys)
        assert code == 0, err
        shutil.rmtree(tmp_path / "out")


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_member_checkpoint_that_cannot_be_trusted_is_refused(verb, damage, members, phantom, tmp_path, capsys):
    first, second = members
    best = second / "best.pt"
    if damage == "truncated":
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    else:
        best.unlink()
        (second / "last.pt").unlink()
    code, _, err = run_cli(ensemble_argv(verb, [first, second], phantom, tmp_path), capsys)
    one_error(code, err, str(best) if damage == "truncated" else f"{second} holds no checkpoint")
    assert not (tmp_path / "out").exists()


def test_the_evaluation_records_each_members_checkpoint(members, phantom, tmp_path, capsys):
    first, second = members
    code, printed, err = run_cli(ensemble_argv("evaluate", [first, second], phantom, tmp_path), capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "metrics" / "evaluation.json").read_text())
    assert [m["run"] for m in record["members"]] == [str(first.resolve()), str(second.resolve())]
    for member, run in zip(record["members"], (first, second), strict=True):
        checkpoint = run / member["checkpoint"]
        assert member["checkpoint"] == "best.pt"
        assert member["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        assert member["checkpoint_epoch"] == torch.load(checkpoint, weights_only=True)["epoch"]
        assert f"{checkpoint} (epoch {member['checkpoint_epoch']}" in printed
    assert not (first / ".lock").exists() and not (second / ".lock").exists()
