"""NIfTI reading/writing: axis order, spacing, validation, geometry-preserving writes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from data_helpers import blob_case, write_zyx
from microseg.data.volumes import read_volume, write_mask, write_volume
from microseg.errors import MicrosegError


def test_orientation_and_spacing_match_the_reference_convention(tmp_path):
    image, mask = blob_case(shape=(5, 48, 64), z=3)
    write_zyx(tmp_path / "img.nii.gz", image)
    write_zyx(tmp_path / "mask.nii.gz", mask)
    vol = read_volume(tmp_path / "mask.nii.gz", "mask")
    assert vol.array.shape == (5, 48, 64)
    assert vol.spacing == pytest.approx((0.5, 0.2, 0.1))  # (sz, sy, sx) from zooms (0.1, 0.2, 0.5)
    ys, xs = np.nonzero(vol.array[3])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (2, 13, 3, 19)  # top-left L, rows 2..13
    assert vol.array[3, 2, 3] == 1 and vol.array[3, 2, 10] == 0  # the bar is on the left, foot at the bottom
    assert vol.array.sum() == vol.array[3].sum()
    img = read_volume(tmp_path / "img.nii.gz")
    assert img.array.dtype == np.uint8 and img.array[3, 5, 4] == 200 and img.array[3, 40, 60] == 20
    # independent check through nibabel's own array: slice z is nib_array[:, :, z].T
    raw = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj)
    np.testing.assert_array_equal(vol.array[3], raw[:, :, 3].T)


def test_mask_values_and_float_images_are_normalised(tmp_path):
    _, mask = blob_case()
    write_zyx(tmp_path / "m255.nii.gz", (mask * 255).astype(np.uint8))
    np.testing.assert_array_equal(read_volume(tmp_path / "m255.nii.gz", "mask").array, mask)
    write_zyx(tmp_path / "fimg.nii.gz", np.full((3, 8, 8), 254.4, dtype=np.float32))
    assert read_volume(tmp_path / "fimg.nii.gz").array.max() == 254


@pytest.mark.parametrize(
    "name,array,kind,needle",
    [
        ("nan.nii.gz", np.where(np.eye(8)[None] > 0, np.nan, 1.0).astype(np.float32), "image", "NaN"),
        ("inf.nii.gz", np.full((2, 8, 8), np.inf, dtype=np.float32), "mask", "NaN"),
        ("bright.nii.gz", np.full((2, 8, 8), 255, dtype=np.uint8), "image", "0..254"),
        ("negative.nii.gz", np.full((2, 8, 8), -3, dtype=np.int16), "image", "0..254"),
        ("three.nii.gz", (np.arange(128).reshape(2, 8, 8) % 3).astype(np.uint8), "mask", "not binary"),
    ],
)
def test_bad_values_name_the_file(tmp_path, name, array, kind, needle):
    write_zyx(tmp_path / name, array)
    with pytest.raises(MicrosegError, match=needle) as err:
        read_volume(tmp_path / name, kind)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(MicrosegError, match="not found"):
        read_volume(tmp_path / "missing.nii.gz")
    image, _ = blob_case()
    path = write_zyx(tmp_path / "cut.nii.gz", image)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(MicrosegError, match="cut.nii.gz"):
        read_volume(path)
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(MicrosegError, match="junk.nii.gz"):
        read_volume(tmp_path / "junk.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.uint8), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(MicrosegError, match="flat.nii: expected a 3D volume"):
        read_volume(tmp_path / "flat.nii")


def test_write_mask_keeps_the_source_geometry(tmp_path):
    image, mask = blob_case()
    affine = np.array([[-0.1, 0, 0, 5.0], [0, 0.2, 0, -3.0], [0, 0, 0.5, 1.0], [0, 0, 0, 1]])
    xyz = np.ascontiguousarray(image.transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(xyz.astype(np.float32), affine), tmp_path / "src.nii.gz")
    like = read_volume(tmp_path / "src.nii.gz")
    write_mask(tmp_path / "pred.nii.gz", mask.astype(bool), like)
    out = nib.load(tmp_path / "pred.nii.gz")
    np.testing.assert_allclose(out.affine, affine)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(out.dataobj)[:, :, 3].T, mask[3])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_write_volume_header(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_volume(tmp_path / "v.nii", array, (2.0, 0.5, 0.25))
    img = nib.load(tmp_path / "v.nii")
    assert img.header.get_zooms() == pytest.approx((0.25, 0.5, 2.0))
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 1].T, array[1])
