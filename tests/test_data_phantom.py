"""The phantom: exact real layout, determinism, header spacing, sweep shape, intensities, hard regions."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from microseg.cli import main
from microseg.data.layout import find_cases
from microseg.data.phantom import BLADDER_ANGLE_DEG, simulate_dataset
from microseg.errors import MicrosegError

SIZE, SLICES = (64, 96), 7


def zyx(path) -> np.ndarray:
    """Read with nibabel directly: slice z is nib_array[:, :, z].T."""
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "set"
    return simulate_dataset(out, n_train=2, n_test=1, n_slices=SLICES, size=SIZE, seed=3)


def test_layout_is_exactly_the_real_one(phantom):
    files = {str(p.relative_to(phantom)) for p in phantom.rglob("*") if p.is_file() and not p.name.startswith(".")}
    expected = set()
    for i in ("01", "02"):
        expected |= {f"train/micro_ultrasound_scans/microUS_train_{i}.nii.gz",
                     f"train/expert_annotations/expert_annotation_train_{i}.nii.gz",
                     f"train/non_expert_annotations/nonexpert_annotation_train_{i}.nii.gz"}
    expected |= {"test/micro_ultrasound_scans/microUS_test_01.nii.gz",
                 "test/expert_annotations/expert_annotation_test_01.nii.gz",
                 "test/non_expert_annotations/nonexpert_annotation_test_01.nii.gz",
                 "test/clinician_annotations/clinician_annotation_test_01.nii.gz",
                 "test/master_student_annotations/master_student_annotation_test_01.nii.gz",
                 "test/medical_student_annotations/medical_student_annotation_test_01.nii.gz"}
    assert files == expected
    assert set(find_cases(phantom, "test")[0].raters) == {"clinician", "master_student", "medical_student"}


def test_header_spacing_intensities_and_sweep(phantom):
    img = nib.load(phantom / "train/micro_ultrasound_scans/microUS_train_01.nii.gz")
    sp = 0.033586 * 962 / SIZE[0]
    assert img.shape == (SIZE[1], SIZE[0], SLICES)  # nibabel (x, y, z)
    assert img.header.get_zooms() == pytest.approx((sp, sp, 48.0 / (SLICES - 1)), rel=1e-5)
    image = zyx(phantom / "train/micro_ultrasound_scans/microUS_train_01.nii.gz")
    assert image.dtype == np.uint8 and image.max() <= 254 and image.mean() > 30
    assert image[:, -1, 0].max() == 0 and image[:, 0, 0].max() == 0  # dark corners outside the fan
    for case in ("01", "02"):
        area = zyx(phantom / f"train/expert_annotations/expert_annotation_train_{case}.nii.gz").sum(axis=(1, 2))
        assert area[0] == 0 and area[-1] == 0
        assert area[SLICES // 2] > area[1] > 0 and area[SLICES // 2] > area[-2]


def test_same_seed_same_arrays(phantom, tmp_path):
    again = simulate_dataset(tmp_path / "again", n_train=1, n_test=0, n_slices=SLICES, size=SIZE, seed=3)
    other = simulate_dataset(tmp_path / "other", n_train=1, n_test=0, n_slices=SLICES, size=SIZE, seed=4)
    name = "train/micro_ultrasound_scans/microUS_train_01.nii.gz"
    assert np.array_equal(zyx(again / name), zyx(phantom / name))
    assert not np.array_equal(zyx(other / name), zyx(phantom / name))
    mask = "train/non_expert_annotations/nonexpert_annotation_train_01.nii.gz"
    assert np.array_equal(zyx(again / mask), zyx(phantom / mask))


def test_gland_is_hypoechoic_and_raters_disagree_at_the_weak_boundary(tmp_path):
    root = simulate_dataset(tmp_path / "p", n_train=1, n_test=1, n_slices=9, size=(96, 137), seed=11)
    image = zyx(root / "test/micro_ultrasound_scans/microUS_test_01.nii.gz").astype(float)
    expert = zyx(root / "test/expert_annotations/expert_annotation_test_01.nii.gz").astype(bool)
    yy, xx = np.mgrid[: expert.shape[1], : expert.shape[2]]
    bladder = math.radians(BLADDER_ANGLE_DEG)
    for rater in ("non_expert", "clinician", "master_student", "medical_student"):
        folder = "non_expert_annotations/nonexpert" if rater == "non_expert" else f"{rater}_annotations/{rater}"
        other = zyx(root / f"test/{folder}_annotation_test_01.nii.gz").astype(bool)
        in_sector = total = 0
        for z in range(2, 7):
            cy, cx = yy[expert[z]].mean(), xx[expert[z]].mean()
            xor = expert[z] ^ other[z]
            delta = np.angle(np.exp(1j * (np.arctan2(yy - cy, xx - cx) - bladder)))
            in_sector += (xor & (np.abs(delta) < math.radians(60))).sum()  # a third of all directions
            total += xor.sum()
        assert total > 0 and in_sector / total > (0.7 if rater == "non_expert" else 0.6), rater
    z = 4  # mid-sweep, away from the bladder: the gland is darker than a ring of tissue around it
    ring = np.zeros_like(expert[z])
    for dy in range(-6, 7):
        for dx in range(-6, 7):
            ring |= np.roll(expert[z], (dy, dx), axis=(0, 1))
    cy, cx = yy[expert[z]].mean(), xx[expert[z]].mean()
    away = np.abs(np.angle(np.exp(1j * (np.arctan2(yy - cy, xx - cx) - bladder)))) > math.radians(60)
    inside, around = image[z][expert[z] & away].mean(), image[z][ring & ~expert[z] & away & (image[z] > 0)].mean()
    assert inside < 0.9 * around


def test_out_folder_policy_and_cli(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.txt").write_text("keep me")
    with pytest.raises(MicrosegError, match="not empty"):
        simulate_dataset(busy, n_train=1, n_test=0, n_slices=3, size=(32, 48))
    out = tmp_path / "set"
    args = ["simulate", "--out", str(out), "--slices", "3", "--size", "32", "48", "--test", "1"]
    assert main(args + ["--train", "2"]) == 0
    assert main(args + ["--train", "1"]) == 0  # rewriting a phantom set drops its stale files
    assert [c.case_id for c in find_cases(out, "train")] == ["01"]
    assert main(["simulate", "--out", str(tmp_path / "x"), "--slices", "2"]) == 2
    assert "--slices" in capsys.readouterr().err
