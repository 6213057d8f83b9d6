"""The phantom: exact real layout, determinism, header spacing, sweep shape, rater error bands and
order, where raters disagree, and the image evidence at strong and weak borders."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy.ndimage import distance_transform_edt

from microseg.cli import main
from microseg.core.errors import MicrosegError
from microseg.data import phantom
from microseg.data.layout import find_cases
from microseg.data.phantom import BLADDER_ANGLE_DEG, ScanGeometry, simulate_case, simulate_dataset

SIZE, SLICES = (64, 96), 7


def zyx(path) -> np.ndarray:
    """Read with nibabel directly: slice z is nib_array[:, :, z].T."""
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "set"
    return simulate_dataset(out, n_train=2, n_test=1, n_slices=SLICES, size=SIZE, seed=3)


def test_layout_is_exactly_the_real_one(small_phantom):
    files = {
        str(p.relative_to(small_phantom))
        for p in small_phantom.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    expected = set()
    for i in ("01", "02"):
        expected |= {
            f"train/micro_ultrasound_scans/microUS_train_{i}.nii.gz",
            f"train/expert_annotations/expert_annotation_train_{i}.nii.gz",
            f"train/non_expert_annotations/nonexpert_annotation_train_{i}.nii.gz",
        }
    expected |= {
        "test/micro_ultrasound_scans/microUS_test_01.nii.gz",
        "test/expert_annotations/expert_annotation_test_01.nii.gz",
        "test/non_expert_annotations/nonexpert_annotation_test_01.nii.gz",
        "test/clinician_annotations/clinician_annotation_test_01.nii.gz",
        "test/master_student_annotations/master_student_annotation_test_01.nii.gz",
        "test/medical_student_annotations/medical_student_annotation_test_01.nii.gz",
    }
    assert files == expected
    assert set(find_cases(small_phantom, "test")[0].raters) == {"clinician", "master_student", "medical_student"}


def test_header_spacing_intensities_and_sweep(small_phantom):
    img = nib.load(small_phantom / "train/micro_ultrasound_scans/microUS_train_01.nii.gz")
    sp = 0.033586 * 962 / SIZE[0]
    assert img.shape == (SIZE[1], SIZE[0], SLICES)  # nibabel (x, y, z)
    assert img.header.get_zooms() == pytest.approx((sp, sp, 48.0 / (SLICES - 1)), rel=1e-5)
    image = zyx(small_phantom / "train/micro_ultrasound_scans/microUS_train_01.nii.gz")
    assert image.dtype == np.uint8 and image.max() <= 254 and image.mean() > 30
    assert image[:, -1, 0].max() == 0 and image[:, 0, 0].max() == 0  # dark corners outside the fan
    for case in ("01", "02"):
        area = zyx(small_phantom / f"train/expert_annotations/expert_annotation_train_{case}.nii.gz").sum(axis=(1, 2))
        assert area[0] == 0 and area[-1] == 0
        assert area[SLICES // 2] > area[1] > 0 and area[SLICES // 2] > area[-2]


def test_same_seed_same_arrays(small_phantom, tmp_path):
    again = simulate_dataset(tmp_path / "again", n_train=1, n_test=0, n_slices=SLICES, size=SIZE, seed=3)
    other = simulate_dataset(tmp_path / "other", n_train=1, n_test=0, n_slices=SLICES, size=SIZE, seed=4)
    name = "train/micro_ultrasound_scans/microUS_train_01.nii.gz"
    assert np.array_equal(zyx(again / name), zyx(small_phantom / name))
    assert not np.array_equal(zyx(other / name), zyx(small_phantom / name))
    mask = "train/non_expert_annotations/nonexpert_annotation_train_01.nii.gz"
    assert np.array_equal(zyx(again / mask), zyx(small_phantom / mask))


RATED_SIZE, RATED_SLICES, RATED_PATIENTS = (120, 172), 16, 8
OTHERS = ("non_expert", "clinician", "master_student", "medical_student")


@pytest.fixture(scope="module")
def rated():
    """Eight test patients at a cheap size (0.27 mm pixels): the geometry and (image, masks) per patient."""
    geo = ScanGeometry(*RATED_SIZE)
    return geo, [
        simulate_case(geo, np.random.default_rng([5, 1, i]), RATED_SLICES, OTHERS) for i in range(1, RATED_PATIENTS + 1)
    ]


def medpy_patient_score(mask: np.ndarray, expert: np.ndarray, spacing: float) -> tuple[float, float]:
    """MicroSegNet's protocol with medpy: mean DSC / HD95 (mm) over slices where both masks are non-empty."""
    scores = [
        (mb.dc(m, e), mb.hd95(m, e, voxelspacing=spacing))
        for m, e in zip(mask, expert, strict=True)
        if m.any() and e.any()
    ]
    return tuple(np.mean(scores, axis=0))


def test_raters_err_like_people_bands_and_experience_order(rated):
    geo, cases = rated
    means = {
        r: np.mean([medpy_patient_score(masks[r], masks["expert"], geo.spacing) for _, masks in cases], axis=0)
        for r in OTHERS
    }
    for rater, (dsc, hd) in means.items():
        assert 0.85 <= dsc <= 0.93 and 2.0 <= hd <= 6.0, (rater, dsc, hd)
    dsc = {r: v[0] for r, v in means.items()}
    hd = {r: v[1] for r, v in means.items()}
    assert dsc["clinician"] > dsc["master_student"] > dsc["medical_student"]
    assert hd["clinician"] < hd["master_student"] < hd["medical_student"]
    students = [dsc["master_student"], dsc["medical_student"]]
    assert min(students) - 0.01 <= dsc["non_expert"] <= max(students) + 0.01


def test_rater_errors_concentrate_where_the_border_is_hard_to_see(rated):
    """Hard: within 60 deg of the bladder direction or 45 deg of the apex (opposite) direction from
    the gland centre, or a small gland near the sweep ends (under 40 % of the largest area). Most of
    the disagreement lies there, and per border pixel it is over three times as dense as elsewhere."""
    geo, cases = rated
    yy, xx = np.mgrid[: RATED_SIZE[0], : RATED_SIZE[1]]
    bladder = math.radians(BLADDER_ANGLE_DEG)
    xor_hard = xor_all = border_hard = border_all = 0
    for _, masks in cases:
        expert = masks["expert"].astype(bool)
        areas = expert.sum(axis=(1, 2))
        for z in np.flatnonzero(areas):
            cy, cx = yy[expert[z]].mean(), xx[expert[z]].mean()
            angle = np.arctan2(yy - cy, xx - cx)
            to_bladder = np.abs(np.angle(np.exp(1j * (angle - bladder))))
            hard = (to_bladder < math.radians(60)) | (to_bladder > math.radians(135)) | (areas[z] < 0.4 * areas.max())
            border = expert[z] & ~(
                np.roll(expert[z], 1, 0)
                & np.roll(expert[z], -1, 0)
                & np.roll(expert[z], 1, 1)
                & np.roll(expert[z], -1, 1)
            )
            border_hard, border_all = border_hard + (border & hard).sum(), border_all + border.sum()
            for rater in OTHERS:
                xor = expert[z] ^ masks[rater][z].astype(bool)
                xor_hard, xor_all = xor_hard + (xor & hard).sum(), xor_all + xor.sum()
    hard_share, easy_share = xor_hard / border_hard, (xor_all - xor_hard) / (border_all - border_hard)
    assert xor_hard / xor_all > 0.75 and hard_share > 3 * easy_share, (xor_hard / xor_all, hard_share, easy_share)


def test_gland_evidence_strong_borders_and_weak_bladder_side():
    """Mid-sweep: the gland is darker than its surroundings and rimmed by a brighter capsule away from
    the bladder and the apex; towards the bladder the border's intensity step (grey levels, outside
    minus inside) is on average under a third of that elsewhere."""
    geo = ScanGeometry(240, 343)
    steps = {"strong": [], "weak": []}
    for i in range(1, 4):
        image, masks = simulate_case(geo, np.random.default_rng([9, 0, i]), 5, ())
        img, expert = image[2].astype(float), masks["expert"][2].astype(bool)
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        cy, cx = yy[expert].mean(), xx[expert].mean()
        to_bladder = np.abs(np.angle(np.exp(1j * (np.arctan2(yy - cy, xx - cx) - math.radians(BLADDER_ANGLE_DEG)))))
        depth_in = distance_transform_edt(expert) * geo.spacing  # mm from the border, inside
        depth_out = distance_transform_edt(~expert) * geo.spacing
        inner = expert & (depth_in > 0.5) & (depth_in < 2.0)
        outer = ~expert & (depth_out > 0.3) & (depth_out < 1.0) & (img > 25)  # not the bladder's fluid
        rim = expert & (depth_in < 0.4)
        strong = (to_bladder > math.radians(80)) & (to_bladder < math.radians(130)) & geo.fov
        weak = (to_bladder < math.radians(20)) & geo.fov
        assert img[rim & strong].mean() > 1.1 * img[inner & strong].mean()
        for name, sector in (("strong", strong), ("weak", weak)):
            steps[name].append(img[outer & sector].mean() - img[inner & sector].mean())
    assert min(steps["strong"]) > 10 and np.mean(np.abs(steps["weak"])) < np.mean(steps["strong"]) / 3, steps


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


def test_interrupted_simulate_leaves_no_dataset(tmp_path, monkeypatch):
    out = tmp_path / "set"
    simulate_dataset(out, n_train=2, n_test=1, n_slices=3, size=(32, 48))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    written = []

    def write_then_die(path, *args, **kwargs):  # the third volume's write is interrupted
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        return real_write(path, *args, **kwargs)

    real_write = phantom.write_volume
    monkeypatch.setattr(phantom, "write_volume", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(out, n_train=3, n_test=2, n_slices=3, size=(32, 48), seed=5)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the earlier set, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary left beside it
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(tmp_path / "new", n_train=3, n_test=2, n_slices=3, size=(32, 48))
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # starts a pool of worker processes
def test_jobs_write_the_files_of_one_job(tmp_path):
    for jobs in (1, 2):
        simulate_dataset(tmp_path / str(jobs), n_train=2, n_test=1, n_slices=4, size=(48, 64), seed=2, jobs=jobs)
    files = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*.nii.gz"))
    assert len(files) == 2 * 3 + 6
    for name in files:
        one, two = (nib.load(tmp_path / str(jobs) / name) for jobs in (1, 2))
        assert np.array_equal(np.asarray(one.dataobj), np.asarray(two.dataobj)) and np.array_equal(
            one.affine, two.affine
        )


def test_slices_imaged_in_parallel_give_the_images_of_one_thread():
    """Each slice draws from its own stream: the case does not depend on how many threads image it,
    and no two slices share their speckle."""
    geo = ScanGeometry(48, 64)
    (one, masks_one), (three, masks_three) = (
        simulate_case(geo, np.random.default_rng([4, 1, 2]), 6, ("clinician",), threads) for threads in (1, 3)
    )
    assert np.array_equal(one, three) and all(np.array_equal(masks_one[k], masks_three[k]) for k in masks_one)
    assert not any(np.array_equal(one[z], one[z + 1]) for z in range(5))
