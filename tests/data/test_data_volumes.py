"""NIfTI reading/writing: axis order, spacing, validation, grid checks, geometry-preserving writes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from data_helpers import blob_case, write_zyx
from microseg.core.errors import MicrosegError
from microseg.core.preprocess import INTENSITY_MAX
from microseg.data.volumes import (
    read_geometry,
    read_mask_for,
    read_volume,
    require_same_geometry,
    write_mask,
    write_volume,
)


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


@pytest.mark.parametrize(
    "label,dtype",
    [(1, np.uint8), (255, np.uint8), (1.0, np.float32), (255, np.int16), (65535, np.uint16), (-1, np.int8)],
)
def test_binary_masks_of_any_type_read_as_zero_one(tmp_path, label, dtype):
    _, mask = blob_case()  # NIfTI has no bool type: bool masks arrive as 0/1 integers
    write_zyx(tmp_path / "m.nii.gz", mask.astype(dtype) * np.array(label, dtype))
    out = read_volume(tmp_path / "m.nii.gz", "mask").array
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16, np.int32])
def test_images_of_any_type_in_range_are_rounded_to_uint8(tmp_path, dtype):
    ramp = np.linspace(0, INTENSITY_MAX, 3 * 8 * 8).reshape(3, 8, 8)
    ramp = ramp + 0.4 if np.dtype(dtype).kind == "f" else ramp  # 254.4 still rounds to 254
    write_zyx(tmp_path / "img.nii.gz", ramp.astype(dtype))
    out = read_volume(tmp_path / "img.nii.gz").array
    assert out.dtype == np.uint8 and out.max() == INTENSITY_MAX
    np.testing.assert_array_equal(out, np.floor(ramp.astype(dtype) + 0.5).astype(np.uint8))


@pytest.mark.parametrize(
    "name,array,kind,needle",
    [
        ("nan.nii.gz", np.where(np.eye(8)[None] > 0, np.nan, 1.0).astype(np.float32), "image", "NaN"),
        ("inf.nii.gz", np.full((2, 8, 8), np.inf, dtype=np.float32), "mask", "NaN"),
        ("bright.nii.gz", np.full((2, 8, 8), 255, dtype=np.uint8), "image", "0..254"),
        ("negative.nii.gz", np.full((2, 8, 8), -3, dtype=np.int16), "image", "0..254"),
        ("ct.nii.gz", np.arange(128, dtype=np.int16).reshape(2, 8, 8) * 30 - 1024, "image", "found -1024..2786"),
        ("twelve_bit.nii.gz", np.arange(128, dtype=np.uint16).reshape(2, 8, 8) * 32, "image", "found 0..4064"),
        ("unit.nii.gz", np.linspace(0, 1, 128, dtype=np.float32).reshape(2, 8, 8), "image", "span only 0..1"),
        ("binary.nii.gz", np.eye(8, dtype=np.uint8)[None].repeat(2, 0), "image", "span only 0..1"),
        ("black.nii.gz", np.zeros((2, 8, 8), np.uint8), "image", "constant"),
        ("grey.nii.gz", np.full((2, 8, 8), 90.0, np.float32), "image", "constant"),
        ("soft.nii.gz", np.linspace(0, 1, 128, dtype=np.float32).reshape(2, 8, 8), "mask", "not binary"),
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
    nib.save(nib.gifti.GiftiImage(), tmp_path / "surface.gii")  # readable by nibabel, but not a voxel grid
    for read in (read_geometry, read_volume):
        with pytest.raises(MicrosegError, match="surface.gii: not a NIfTI volume"):
            read(tmp_path / "surface.gii")


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


def _save_xyz(path, array_zyx, affine):
    """Save a [Z, H, W] array with an explicit nibabel affine (x, y, z order)."""
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine), path)
    return path


BASE = np.diag([0.1, 0.2, 0.5, 1.0])
BASE[:3, 3] = (5.0, -3.0, 1.0)


def _translated(affine: np.ndarray, shift_mm) -> np.ndarray:
    moved = affine.copy()
    moved[:3, 3] += shift_mm  # half a voxel of the smallest spacing (0.1 mm) along y
    return moved


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize(
    "name,affine,shape,needle",
    [
        ("shape.nii.gz", BASE, (5, 48, 60), "shape (5, 48, 60), but its image"),
        ("spacing.nii.gz", BASE @ np.diag([1.0, 1.0, 1.01, 1.0]), (5, 48, 64), "spacing (mm) (0.505, 0.2, 0.1)"),
        ("flipped.nii.gz", BASE @ np.diag([-1.0, 1, 1, 1]), (5, 48, 64), "axis directions"),
        ("oblique.nii.gz", _rotation_z(10) @ BASE, (5, 48, 64), "axis directions"),
        ("origin.nii.gz", _translated(BASE, (0, 0.05, 0)), (5, 48, 64), "origin (mm) (5, -2.95, 1)"),
    ],
)
def test_a_mask_off_its_image_grid_names_both_files_and_the_property(tmp_path, name, affine, shape, needle):
    image, _ = blob_case()
    image_path = _save_xyz(tmp_path / "image.nii.gz", image, BASE)
    mask_path = _save_xyz(tmp_path / name, np.zeros(shape, np.uint8), affine)
    with pytest.raises(MicrosegError) as header_err:
        require_same_geometry(read_geometry(mask_path), read_geometry(image_path))
    with pytest.raises(MicrosegError) as data_err:
        read_mask_for(read_volume(image_path), mask_path)
    for err in (header_err, data_err):
        message = str(err.value)
        assert needle in message and str(mask_path) in message and str(image_path) in message and "\n" not in message


def test_grids_equal_within_float32_header_rounding_or_both_oblique_pass(tmp_path, capsys):
    image, mask = blob_case()
    for affine in (BASE, _rotation_z(25) @ BASE @ np.diag([-1.0, 1, 1, 1])):  # the same oblique, flipped grid
        image_path = _save_xyz(tmp_path / "image.nii.gz", image, affine)
        nudged = affine * (1 + 3e-7)  # what a float32 round trip through another tool may do
        nudged[3, 3] = 1
        mask_path = _save_xyz(tmp_path / "mask.nii.gz", mask, nudged)
        volume = read_volume(image_path)
        np.testing.assert_array_equal(read_mask_for(volume, mask_path).array, mask)
        require_same_geometry(read_geometry(mask_path), volume.geometry)
    assert capsys.readouterr().err == ""


def test_an_empty_mask_warns_once_and_is_returned(tmp_path, capsys):
    image, _ = blob_case()
    image_path = _save_xyz(tmp_path / "image.nii.gz", image, BASE)
    empty = _save_xyz(tmp_path / "empty.nii.gz", np.zeros(image.shape, np.uint8), BASE)
    assert read_mask_for(read_volume(image_path), empty).array.sum() == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"microseg: warning: {empty}: mask is empty on every slice"]


def test_a_mask_file_name_without_a_nifti_suffix_is_refused(tmp_path):
    image, mask = blob_case()
    like = read_volume(write_zyx(tmp_path / "img.nii.gz", image))
    with pytest.raises(MicrosegError, match=r"pred\.png: a NIfTI file name must end in \.nii or \.nii\.gz"):
        write_mask(tmp_path / "pred.png", mask, like)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz"]
