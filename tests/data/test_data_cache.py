"""`microseg prepare`: cache content and orientation, reuse/rebuild, and bad inputs leaving nothing behind."""

from __future__ import annotations

import os

import h5py
import nibabel as nib
import numpy as np
import pytest

from data_helpers import blob_case, make_dataset, nifti_path, write_zyx
from microseg.cli import main
from microseg.core.errors import MicrosegError
from microseg.data.cache import foreground_areas, read_cache_info
from microseg.data.dataset import SliceDataset


def prepare(data, out, capsys, size=32) -> tuple[int, str, str]:
    code = main(["prepare", "--data", str(data), "--out", str(out), "--size", str(size)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_orientation_survives_the_cache(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", shape=(5, 48, 64))
    code, out, _ = prepare(data, tmp_path / "c.h5", capsys, size=32)
    assert code == 0 and "10 slices from 2 patients, 1 test cases" in out
    ds = SliceDataset(tmp_path / "c.h5")
    assert len(ds) == 10
    items = [ds[i] for i in range(len(ds))]
    assert [(it["case_id"], it["slice_index"]) for it in items] == [(c, z) for c in ("01", "02") for z in range(5)]
    blob = items[3]
    for key in ("expert", "non_expert"):
        ys, xs = np.nonzero(blob[key][0].numpy())
        # the L spans rows 2..13 of 48 and cols 3..19 of 64 -> rows ~1..9, cols ~1..10 of 32
        assert ys.min() >= 1 and ys.max() <= 9 and xs.min() >= 1 and xs.max() <= 10
        assert blob[key][0, 3, 2] == 1 and blob[key][0, 3, 8] == 0  # vertical bar on the left
        assert sum(float(it[key].sum()) for i, it in enumerate(items) if i != 3 and i != 8) == 0
    image = blob["image"][0].numpy()
    assert image[3, 2] == pytest.approx(200 / 254, abs=0.01) and image[25, 25] == pytest.approx(20 / 254, abs=0.01)
    # foreground fraction at native size, worked by hand: the L covers 12*5 + 4*12 = 108 of 48*64 pixels
    areas = foreground_areas(tmp_path / "c.h5")
    np.testing.assert_allclose(areas, [0, 0, 0, 108 / (48 * 64), 0] * 2, rtol=1e-6)


def test_test_split_is_recorded_by_path(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    prepare(data, tmp_path / "c.h5", capsys)
    info = read_cache_info(tmp_path / "c.h5")
    assert info.size == 32 and info.n_slices == 10 and info.case_ids == ["01", "02"]
    rec = info.test_cases["01"]
    assert rec["image"] == nifti_path(data.resolve(), "test", "image", "01")
    assert set(rec["raters"]) == {"clinician"} and rec["non_expert"] is not None
    assert rec["shape"] == (5, 48, 64) and rec["spacing"] == pytest.approx((0.5, 0.2, 0.1))


def test_reuse_and_rebuild(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", test_ids=())
    cache = tmp_path / "c.h5"
    prepare(data, cache, capsys)

    def identity(path):  # a rewrite renames a new file into place: a new inode (mtime may share a clock tick)
        return path.stat().st_ino, path.stat().st_mtime_ns

    first = identity(cache)
    code, out, _ = prepare(data, cache, capsys)
    assert code == 0 and out.startswith("cache up to date") and identity(cache) == first
    source = nifti_path(data, "train", "expert", "02")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # touched
    code, out, _ = prepare(data, cache, capsys)
    assert out.startswith("wrote cache") and identity(cache)[0] != first[0]
    image, mask = blob_case()
    mask[1, 30:40, 30:40] = 1  # changed content
    write_zyx(source, mask)
    prepare(data, cache, capsys)
    assert foreground_areas(cache)[6] == pytest.approx(100 / (48 * 64))
    code, out, _ = prepare(data, cache, capsys, size=16)  # a different size rebuilds too
    assert out.startswith("wrote cache") and read_cache_info(cache).size == 16


def _missing_non_expert(data):
    nifti_path(data, "train", "non_expert", "02").unlink()
    return "microUS_train_02.nii.gz"


def _shape_mismatch(data):
    write_zyx(nifti_path(data, "train", "expert", "02"), np.zeros((5, 48, 60), np.uint8))
    return "expert_annotation_train_02.nii.gz"


def _test_shape_mismatch(data):
    write_zyx(nifti_path(data, "test", "clinician", "01"), np.zeros((4, 48, 64), np.uint8))
    return "clinician_annotation_test_01.nii.gz"


def _non_binary(data):
    three_values = (np.arange(5 * 48 * 64) % 3).reshape(5, 48, 64).astype(np.uint8)
    write_zyx(nifti_path(data, "train", "non_expert", "01"), three_values)
    return "nonexpert_annotation_train_01.nii.gz"


def _truncated(data):
    path = nifti_path(data, "train", "image", "02")
    write_zyx(path, np.random.default_rng(0).integers(0, 255, (5, 48, 64), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-2000])  # header intact, voxel data cut short
    return "microUS_train_02.nii.gz"


def _nan(data):
    image = np.zeros((5, 48, 64), np.float32)
    image[2, 7, 9] = np.nan
    write_zyx(nifti_path(data, "train", "image", "01"), image)
    return "microUS_train_01.nii.gz"


def _empty(data):
    for path in sorted(data.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    return str(data)


def _one_folder(data):
    for path in sorted((data / "train").rglob("*.nii.gz")):
        path.rename(data / "train" / "micro_ultrasound_scans" / path.name)
    return "expert_annotation_train_01.nii.gz"


def _regrid(data, split, kind, case_id, change):
    """Rewrite one file of the dataset with its affine changed by ``change(affine) -> affine``."""
    path = nifti_path(data, split, kind, case_id)
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), change(img.affine.copy())), path)
    return path


def _flipped_expert(data):  # the mask stored left-right mirrored, its affine saying so
    path = _regrid(data, "train", "expert", "02", lambda a: a @ np.diag([-1.0, 1, 1, 1]))
    return path.name, "axis directions", "microUS_train_02.nii.gz"


def _oblique_non_expert(data):
    c, s = np.cos(np.radians(5)), np.sin(np.radians(5))
    rotation = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    path = _regrid(data, "train", "non_expert", "01", lambda a: rotation @ a)
    return path.name, "axis directions", "microUS_train_01.nii.gz"


def _expert_spacing(data):
    path = _regrid(data, "train", "expert", "01", lambda a: a @ np.diag([1, 1, 2.0, 1]))
    return path.name, "spacing (mm) (1, 0.2, 0.1)", "(0.5, 0.2, 0.1)"


def _test_origin(data):  # header-level check of the test split
    def shift(affine):
        affine[:3, 3] += (0.0, 0.0, 0.5)
        return affine

    path = _regrid(data, "test", "clinician", "01", shift)
    return path.name, "origin (mm)", "microUS_test_01.nii.gz"


def _unit_float_image(data):  # a float export scaled to 0..1: black on the dataset's 0..254 scale
    image, _ = blob_case()
    write_zyx(nifti_path(data, "train", "image", "02"), image.astype(np.float32) / 255)
    return "microUS_train_02.nii.gz", "0..254", "span only"


def _twelve_bit_image(data):
    image, _ = blob_case()
    write_zyx(nifti_path(data, "train", "image", "01"), image.astype(np.uint16) * 16)
    return "microUS_train_01.nii.gz", "0..254", "found 320..3200"


def _constant_image(data):
    write_zyx(nifti_path(data, "train", "image", "01"), np.zeros((5, 48, 64), np.uint8))
    return "microUS_train_01.nii.gz", "constant"


def _split_without_scans(data):
    for path in (data / "test" / "micro_ultrasound_scans").iterdir():
        path.unlink()
    (data / "test" / "micro_ultrasound_scans").rmdir()
    return "has no 'test' split", str(data / "test" / "micro_ultrasound_scans")


def _unpaired_rater(data):
    write_zyx(nifti_path(data, "test", "clinician", "07"), np.zeros((5, 48, 64), np.uint8))
    return "clinician_annotation_test_07.nii.gz: no matching image"


@pytest.mark.parametrize(
    "breakage",
    [
        _missing_non_expert,
        _shape_mismatch,
        _test_shape_mismatch,
        _non_binary,
        _truncated,
        _nan,
        _empty,
        _one_folder,
        _flipped_expert,
        _oblique_non_expert,
        _expert_spacing,
        _test_origin,
        _unit_float_image,
        _twelve_bit_image,
        _constant_image,
        _split_without_scans,
        _unpaired_rater,
    ],
)
def test_bad_inputs_fail_cleanly(tmp_path, capsys, breakage):
    data = make_dataset(tmp_path / "data")
    needles = breakage(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = prepare(data, out_dir / "cache.h5", capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microseg: error: ")
    for needle in (needles,) if isinstance(needles, str) else needles:
        assert needle in lines[0]
    assert list(out_dir.iterdir()) == []  # no cache, no temporary file


def test_an_expert_mask_empty_on_every_slice_warns_once_and_goes_on(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    empty = write_zyx(nifti_path(data, "train", "expert", "02"), np.zeros((5, 48, 64), np.uint8))
    code, out, err = prepare(data, tmp_path / "c.h5", capsys)
    assert code == 0 and "wrote cache" in out
    ours = [line for line in err.splitlines() if line.startswith("microseg:")]
    assert ours == [f"microseg: warning: {empty}: mask is empty on every slice"]
    np.testing.assert_allclose(foreground_areas(tmp_path / "c.h5")[5:], 0)


def test_masks_of_other_types_and_macos_companion_files_are_accepted(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    _, mask = blob_case()
    write_zyx(nifti_path(data, "train", "expert", "01"), mask.astype(np.float32))  # 0.0 / 1.0
    write_zyx(nifti_path(data, "train", "non_expert", "02"), mask.astype(np.int16) * 255)
    for path in list(data.rglob("*.nii.gz")):  # a copy from a Mac: AppleDouble companions beside every file
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07")
    code, out, err = prepare(data, tmp_path / "c.h5", capsys)
    assert code == 0 and "10 slices from 2 patients, 1 test cases" in out and "microseg:" not in err
    assert foreground_areas(tmp_path / "c.h5")[3] == pytest.approx(108 / (48 * 64))


@pytest.mark.parametrize("size", [100, 0, -32, 8])
def test_a_size_no_model_can_take_is_refused_before_anything_is_written(tmp_path, capsys, size):
    data = make_dataset(tmp_path / "data")
    code, _, err = prepare(data, tmp_path / "out" / "c.h5", capsys, size=size)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--size must be a positive multiple of 16" in lines[0]
    assert f"(got {size})" in lines[0] and not (tmp_path / "out").exists()


def test_prepare_help_says_the_size_multiple(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "a multiple of 16" in " ".join(capsys.readouterr().out.split())


def test_refuses_to_overwrite_other_files_and_rejects_non_caches(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    other = tmp_path / "notes.h5"
    other.write_text("precious")
    code, _, err = prepare(data, other, capsys)
    assert code == 2 and "not a microseg cache" in err and other.read_text() == "precious"
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    for path in (tmp_path / "plain.h5", other, tmp_path / "absent.h5"):
        with pytest.raises(MicrosegError, match=path.name):
            read_cache_info(path)
