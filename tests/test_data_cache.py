"""`microseg prepare`: cache content and orientation, reuse/rebuild, and bad inputs leaving nothing behind."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from data_helpers import blob_case, make_dataset, nifti_path, write_zyx
from microseg.cli import main
from microseg.data.cache import foreground_areas, read_cache_info
from microseg.data.dataset import SliceDataset
from microseg.errors import MicrosegError


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
    first = cache.stat().st_mtime_ns
    code, out, _ = prepare(data, cache, capsys)
    assert code == 0 and out.startswith("cache up to date") and cache.stat().st_mtime_ns == first
    source = nifti_path(data, "train", "expert", "02")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # touched
    code, out, _ = prepare(data, cache, capsys)
    assert out.startswith("wrote cache") and cache.stat().st_mtime_ns != first
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


@pytest.mark.parametrize("breakage", [_missing_non_expert, _shape_mismatch, _test_shape_mismatch, _non_binary,
                                      _truncated, _nan, _empty, _one_folder])
def test_bad_inputs_fail_cleanly(tmp_path, capsys, breakage):
    data = make_dataset(tmp_path / "data")
    culprit = breakage(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = prepare(data, out_dir / "cache.h5", capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microseg: error: ") and culprit in lines[0]
    assert list(out_dir.iterdir()) == []  # no cache, no temporary file


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
