"""Streaming evaluation (slabs of slices) against a plain whole-volume computation: nibabel,
medpy, OpenCV and numpy on whole arrays, written here independently of microseg."""

from __future__ import annotations

import csv
import gzip
import math
import shutil

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medpy.metric.binary import dc, hd95

from microseg.data.volumes import SlabReader, volume_writer
from microseg.evaluation.evaluate import evaluate
from microseg.runs.checkpoint import load_checkpoint, save_checkpoint

RATERS = ("non_expert", "clinician", "master_student", "medical_student")
FILES = {
    "expert": "expert_annotations/expert",
    "non_expert": "non_expert_annotations/nonexpert",
    "clinician": "clinician_annotations/clinician",
    "master_student": "master_student_annotations/master_student",
    "medical_student": "medical_student_annotations/medical_student",
}


def zyx(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


def rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def run(trained_run, phantom, tmp_path_factory):
    """The tiny run with its output bias shifted so that ~30% of the test pixels are foreground."""
    run = tmp_path_factory.mktemp("streaming") / "tiny"
    shutil.copytree(trained_run, run)
    state = load_checkpoint(run / "last.pt")
    model = state.build_model()
    volume = zyx(sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0])
    x = torch.from_numpy(np.stack([cv2.resize(s, (32, 32), interpolation=cv2.INTER_AREA) for s in volume]))
    with torch.no_grad():
        logits = model(x.float()[:, None] / 254).logits
    state.model["seg_head.bias"] -= torch.quantile(logits.flatten(), 0.7)
    save_checkpoint(state, run / "last.pt")
    (run / "best.pt").unlink(missing_ok=True)
    return run


def whole_volume(run, phantom, case_id: str, protocol: str) -> tuple[dict, list[dict]]:
    """per_patient and per_slice values of one case, computed on whole volumes."""
    state = load_checkpoint(run / "last.pt")
    model = state.build_model().eval()
    test = phantom / "test"
    image_path = test / "micro_ultrasound_scans" / f"microUS_test_{case_id}.nii.gz"
    image = zyx(image_path)
    masks = {name: zyx(test / f"{file}_annotation_test_{case_id}.nii.gz") > 0 for name, file in FILES.items()}
    sx, sy, sz = (float(v) for v in nib.load(image_path).header.get_zooms())
    x = torch.from_numpy(np.stack([cv2.resize(s, (32, 32), interpolation=cv2.INTER_AREA) for s in image]))
    with torch.no_grad():
        prob = torch.sigmoid(model(x.float()[:, None] / 254).logits)
    pred = (F.interpolate(prob, size=image.shape[1:], mode="bilinear", align_corners=False)[:, 0] > 0.5).numpy()
    expert = masks["expert"]

    def score(a: np.ndarray) -> tuple[float, float, dict]:
        if protocol == "volume":
            return dc(a, expert), hd95(a, expert, voxelspacing=(sz, sy, sx)), {}
        both = [z for z in range(len(a)) if a[z].any() and expert[z].any()]
        per = {z: (dc(a[z], expert[z]), hd95(a[z], expert[z], voxelspacing=(sy, sx))) for z in both}
        return np.mean([d for d, _ in per.values()]), np.mean([h for _, h in per.values()]), per

    dsc, hd, per_slice = score(pred)
    row = {"dsc": dsc, "hd95_mm": hd, "volume_ml": expert.sum() * sx * sy * sz / 1000}
    small = np.stack([cv2.resize(s.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA) >= 0.5 for s in expert])
    row["gamma_msa"] = np.sqrt(sum(g**2 for g in np.gradient(small.astype(np.float64)))).mean()
    k = round(4 * expert.shape[1] / 32)
    region = np.zeros_like(expert)
    for name in RATERS:
        region |= (
            np.stack(
                [
                    cv2.dilate((expert[z] ^ masks[name][z]).astype(np.uint8), np.ones((k, k), np.uint8))
                    for z in range(len(expert))
                ]
            )
            > 0
        )
        row[f"{name}_dsc"], row[f"{name}_hd95_mm"], _ = score(masks[name])
    row["hard_dsc"] = 2 * (pred & expert & region).sum() / ((pred & region).sum() + (expert & region).sum())
    row["hard_error_rate"] = ((pred ^ expert) & region).sum() / region.sum()
    slices = []
    for z in sorted(set(per_slice) | set(np.flatnonzero(expert.any((1, 2))).tolist())):
        d, h = per_slice.get(z, (math.nan, math.nan))
        area = expert[z].sum() * sy * sx
        gamma = np.hypot(*np.gradient(expert[z].astype(np.float64))).mean() if expert[z].any() else math.nan
        slices.append(
            {"z": z, "dsc": d, "hd95_mm": h, "area_mm2": area if expert[z].any() else math.nan, "gamma_msa": gamma}
        )
    return row, slices, pred


@pytest.mark.parametrize("protocol,slab", [("microsegnet", 4), ("microsegnet", 5), ("volume", 4), ("all-slices", 1)])
def test_streaming_equals_whole_volume(run, phantom, protocol, slab):
    n_slices = len(zyx(sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]))
    assert n_slices % slab or slab == 1  # slabs split the volume unevenly
    evaluate(run, phantom, protocol=protocol, device="cpu", batch_size=slab)
    patients = {r["case_id"]: r for r in rows(run / "metrics" / "per_patient.csv")}
    per_slice = rows(run / "metrics" / "per_slice.csv")
    for case_id in ("01", "02"):
        want, slices, pred = whole_volume(run, phantom, case_id, protocol)
        np.testing.assert_array_equal(zyx(run / "predictions" / f"microUS_test_{case_id}.nii.gz") > 0, pred)
        if protocol == "all-slices":
            continue  # its one-sided slices: test_metrics; here the prediction and the descriptors
        for key, value in want.items():
            assert float(patients[case_id][key]) == pytest.approx(value, abs=1e-9), key
        got = [r for r in per_slice if r["case_id"] == case_id]
        assert [int(r["z"]) for r in got] == [s["z"] for s in slices]
        for row, s in zip(got, slices, strict=True):
            for key in ("dsc", "hd95_mm", "area_mm2", "gamma_msa"):
                assert float(row[key]) == pytest.approx(s[key], abs=1e-9, nan_ok=True), key


def test_slab_reader_and_writer_match_nibabel(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (7, 9, 11), dtype=np.uint8)
    affine = np.array([[-0.1, 0, 0, 5.0], [0, 0.2, 0, -3.0], [0, 0, 0.5, 1.0], [0, 0, 0, 1]])
    source = tmp_path / "src.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0)), affine), source)
    with SlabReader(source) as reader:
        slabs = [reader.read(start, start + 3) for start in (0, 3, 6)]
        reader.finish()
        header = reader.header
    assert [len(s) for s in slabs] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(slabs), image)
    with volume_writer(tmp_path / "out.nii.gz", image.shape, np.uint8, affine, header) as write:
        for s in slabs:
            write(s)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0)), affine, header), tmp_path / "ref.nii.gz")
    assert gzip.decompress((tmp_path / "out.nii.gz").read_bytes()) == gzip.decompress(
        (tmp_path / "ref.nii.gz").read_bytes()
    )


@pytest.mark.slow  # starts pools of worker processes
def test_jobs_give_the_outputs_of_one_job(run, phantom, tmp_path):
    from microseg.data.check import check_dataset

    outputs = []
    for jobs in (1, 2):
        evaluate(run, phantom, device="cpu", jobs=jobs)
        metrics = {name: (run / "metrics" / name).read_bytes() for name in ("per_patient.csv", "per_slice.csv")}
        masks = {p.name: zyx(p) for p in sorted((run / "predictions").iterdir())}
        outputs.append((metrics, masks, check_dataset(phantom, jobs=jobs)))
    (metrics_1, masks_1, check_1), (metrics_2, masks_2, check_2) = outputs
    assert metrics_1 == metrics_2 and check_1 == check_2 and len(masks_1) == 2
    assert masks_1.keys() == masks_2.keys() and all(np.array_equal(masks_1[k], masks_2[k]) for k in masks_1)


def test_outputs_do_not_depend_on_the_threads(run, phantom):
    """The forward runs on one torch thread per task whatever the process's share of the cores (a
    convolution's sums depend on how its threads split them), and predict writes evaluate's masks."""
    import torch

    from microseg.inference.predict import predict

    outputs, before = [], torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)  # the size of evaluate's and predict's thread pools
            evaluate(run, phantom, device="cpu", batch_size=2)
            masks = {p.name: zyx(p) for p in sorted((run / "predictions").iterdir())}
            images = phantom / "test" / "micro_ultrasound_scans"
            predicted = predict(run, images, run / f"predict{threads}", device="cpu")
            assert all(np.array_equal(zyx(p), masks[p.name]) for p in predicted)
            outputs.append(((run / "metrics" / "per_slice.csv").read_bytes(), masks))
    finally:
        torch.set_num_threads(before)
    (csv_1, masks_1), (csv_3, masks_3) = outputs
    assert csv_1 == csv_3 and all(np.array_equal(masks_1[k], masks_3[k]) for k in masks_1)


@pytest.mark.slow  # starts a pool of worker processes
def test_prepare_jobs_write_the_cache_of_one_job(phantom, tmp_path):
    import h5py

    from microseg.data.prepare import prepare_cache

    caches = [prepare_cache(phantom, tmp_path / f"{jobs}.h5", size=32, jobs=jobs) for jobs in (1, 2)]
    with h5py.File(caches[0]) as one, h5py.File(caches[1]) as two:
        assert sorted(one) == sorted(two) and len(one["images"]) == 18
        for key in ("images", "expert", "non_expert", "case_id", "slice_index", "expert_fraction"):
            assert np.array_equal(one[key][()], two[key][()]), key
        assert all(dict(one[f"train/{c}"].attrs).keys() == dict(two[f"train/{c}"].attrs).keys() for c in one["train"])
        for case in one["train"]:
            for name, value in one[f"train/{case}"].attrs.items():
                assert np.array_equal(value, two[f"train/{case}"].attrs[name]), name
    assert (tmp_path / "1.check.json").read_text().replace("1.h5", "") == (
        tmp_path / "2.check.json"
    ).read_text().replace("2.h5", "")


@pytest.mark.parametrize("verb", ["check", "simulate"])
def test_jobs_below_one_is_one_line_naming_the_flag(verb, tmp_path, capsys):
    from microseg.cli import main

    args = {"check": ["--data", str(tmp_path)], "simulate": ["--out", str(tmp_path / "x")]}[verb]
    assert main([verb, *args, "--jobs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--jobs must be an integer >= 1, got 0" in err
    assert not (tmp_path / "x").exists()  # nothing written
