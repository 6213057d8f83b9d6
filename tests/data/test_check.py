"""`microseg check` on a small phantom: every number against nibabel + numpy + medpy computed here,
the raters' means against `evaluate`'s rows, and broken folders giving exit 2 and one line."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from medpy.metric.binary import dc, hd95

from microseg.cli import main
from microseg.data.check import check_dataset, check_path, write_check
from microseg.data.prepare import prepare_cache
from microseg.evaluation.evaluate import evaluate

RATER_FOLDERS = {
    "non_expert": "non_expert_annotations",
    "clinician": "clinician_annotations",
    "master_student": "master_student_annotations",
    "medical_student": "medical_student_annotations",
}


def zyx(path: Path) -> np.ndarray:
    """A NIfTI as [Z, H, W] read with nibabel alone (slice z = nib_array[:, :, z].T)."""
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


def files(root: Path, split: str, folder: str) -> dict[str, Path]:
    """id -> file, paired by the trailing id of the name."""
    return {p.name.split("_")[-1].split(".")[0]: p for p in sorted((root / split / folder).glob("*.nii.gz"))}


def medpy_case(mask: np.ndarray, expert: np.ndarray, spacing_yx) -> tuple[float, float]:
    """The reference protocol by hand: medpy DSC / HD95 on slices where both are non-empty, mean over them."""
    both = [z for z in range(len(expert)) if mask[z].any() and expert[z].any()]
    return (
        float(np.mean([dc(mask[z], expert[z]) for z in both])),
        float(np.mean([hd95(mask[z], expert[z], voxelspacing=spacing_yx) for z in both])),
    )


def expected_raters(root: Path, split: str) -> dict[str, tuple[float, float]]:
    experts = files(root, split, "expert_annotations")
    out = {}
    for rater, folder in RATER_FOLDERS.items():
        masks = files(root, split, folder) if (root / split / folder).is_dir() else {}
        scores = []
        for case_id, path in masks.items():
            zooms = nib.load(experts[case_id]).header.get_zooms()  # (sx, sy, sz)
            scores.append(medpy_case(zyx(path) != 0, zyx(experts[case_id]) != 0, (zooms[1], zooms[0])))
        if scores:
            out[rater] = (float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores])))
    return out


@pytest.fixture(scope="module")
def report(phantom) -> dict:
    return check_dataset(phantom)


def test_rater_baseline_matches_medpy(report, phantom):
    for split in ("train", "test"):
        expected = expected_raters(phantom, split)
        found = report["splits"][split]["raters"]
        assert set(found) == set(expected) and expected
        for rater, (dsc, hd) in expected.items():
            assert found[rater]["dsc"]["mean"] == pytest.approx(dsc, abs=1e-9, rel=0)
            assert found[rater]["hd95_mm"]["mean"] == pytest.approx(hd, abs=1e-9, rel=0)


def test_rater_baseline_matches_evaluate_rows(report, trained_run, phantom, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with open(evaluate(run, phantom, device="cpu"), newline="") as handle:
        mean = next(row for row in csv.DictReader(handle) if row["case_id"] == "mean")
    raters = report["splits"]["test"]["raters"]
    assert {"clinician", "master_student", "medical_student"} <= set(raters)
    for rater, r in raters.items():
        assert r["dsc"]["mean"] == pytest.approx(float(mean[f"{rater}_dsc"]), abs=1e-9, rel=0)
        assert r["hd95_mm"]["mean"] == pytest.approx(float(mean[f"{rater}_hd95_mm"]), abs=1e-9, rel=0)


def test_split_numbers_match_nibabel(report, phantom):
    for split, s in report["splits"].items():
        images, experts = files(phantom, split, "micro_ultrasound_scans"), files(phantom, split, "expert_annotations")
        arrays = {i: zyx(p) for i, p in images.items()}
        assert s["patients"] == len(images) and s["case_ids"] == sorted(images)
        assert s["slices"]["total"] == sum(len(a) for a in arrays.values())
        assert s["intensity"]["min"] == min(int(a.min()) for a in arrays.values())
        assert s["intensity"]["max"] == max(int(a.max()) for a in arrays.values())
        assert s["size"] == {"usual": list(next(iter(arrays.values())).shape[1:]), "outliers": {}}
        sx, sy, sz = nib.load(next(iter(images.values()))).header.get_zooms()
        assert s["spacing_mm"]["usual"] == pytest.approx([sz, sy, sx], abs=1e-6)
        assert s["foreground_slices"] == {i: int((zyx(p) != 0).any(axis=(1, 2)).sum()) for i, p in experts.items()}
        assert s["problems"] == []


def test_cli_screen_and_strict_json(phantom, tmp_path, capsys):
    path = tmp_path / "check.json"
    assert main(["check", "--data", str(phantom), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "== train: 3 patients, 18 slices" in out and "== test: 2 patients" in out and "clinician" in out
    report = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["errors"] == 0 and set(report["splits"]) == {"train", "test"}


def rewrite(path: Path, change) -> None:
    """Rewrite a NIfTI with its own affine and header after ``change`` maps its [Z, H, W] array."""
    img = nib.load(path)
    array = change(np.asarray(img.dataobj).transpose(2, 1, 0)).transpose(2, 1, 0)
    header = img.header.copy()
    header.set_data_dtype(array.dtype)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), img.affine, header), path)


def _shape_mismatch(root):
    rewrite(root / "train/expert_annotations/expert_annotation_train_02.nii.gz", lambda a: a[:, :-1])
    return "expert_annotation_train_02.nii.gz: shape"


def _intensity(root):
    rewrite(root / "train/micro_ultrasound_scans/microUS_train_03.nii.gz", lambda a: a.astype(np.uint16) + 100)
    return "microUS_train_03.nii.gz: image intensities must lie in 0..254"


def _missing_file(root):
    (root / "test/expert_annotations/expert_annotation_test_02.nii.gz").unlink()
    return "microUS_test_02.nii.gz: no expert mask"


@pytest.mark.parametrize("breakage", [_shape_mismatch, _intensity, _missing_file])
def test_problems_give_exit_2_and_one_line(phantom, tmp_path, capsys, breakage):
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    culprit = breakage(root)
    code = main(["check", "--data", str(root)])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("microseg: error: dataset check found 1 error(s)") and culprit in err
    assert "error: " in out and culprit in out  # the screen names it too
    assert json.loads(Path(f"{root}.check.json").read_text())["errors"] == 1


def test_outliers_and_empty_experts_are_named_warnings(phantom, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    for folder, prefix in (
        ("micro_ultrasound_scans", "microUS"),
        ("expert_annotations", "expert_annotation"),
        ("non_expert_annotations", "nonexpert_annotation"),
    ):
        rewrite(root / f"train/{folder}/{prefix}_train_02.nii.gz", lambda a: a[:, :60])
    rewrite(root / "test/expert_annotations/expert_annotation_test_01.nii.gz", np.zeros_like)
    assert main(["check", "--data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "image size   64 x 96 px (H x W); outliers: 02 (60 x 96)" in out
    assert "warning: case 02: image size [60, 96] differs from the usual [64, 96]" in out
    assert "warning: case 01: " in out and "expert_annotation_test_01.nii.gz: mask is empty on every slice" in out
    assert "0 error(s), 2 warning(s)" in out


@pytest.mark.parametrize("folder", ["absent", "empty"])
def test_bad_folders_give_one_line(tmp_path, capsys, folder):
    (tmp_path / "empty").mkdir()
    code = main(["check", "--data", str(tmp_path / folder)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and str(tmp_path / folder) in err


def test_prepare_writes_the_check_beside_the_cache_and_reuses_it(phantom, tmp_path, capsys):
    cache = prepare_cache(phantom, tmp_path / "c.h5", size=16)
    written = check_path(cache)
    assert written == tmp_path / "c.check.json" and json.loads(written.read_text())["errors"] == 0
    first = written.stat().st_mtime_ns
    cache.unlink()
    prepare_cache(phantom, cache, size=16)
    assert written.stat().st_mtime_ns == first and "dataset check: 3 train, 2 test patients" in capsys.readouterr().err
    assert not math.isnan(json.loads(written.read_text())["splits"]["train"]["raters"]["non_expert"]["dsc"]["mean"])


def test_prepare_checks_as_it_reads_each_training_volume_once(phantom, tmp_path, monkeypatch):
    import microseg.data.check as check

    reads: Counter = Counter()
    real = check.read_volume
    monkeypatch.setattr(check, "read_volume", lambda path, kind="image": reads.update([Path(path)]) or real(path, kind))
    cache = prepare_cache(phantom, tmp_path / "c.h5", size=16)
    train_files = sorted(p.resolve() for p in (phantom / "train").rglob("*.nii.gz"))
    assert train_files and [reads[p] for p in train_files] == [1] * len(train_files)
    from_prepare = json.loads(check_path(cache).read_text())
    direct = json.loads(write_check(check_dataset(phantom), tmp_path / "direct.json").read_text())
    assert from_prepare.pop("fingerprint") and from_prepare == direct
