"""NIfTI volumes in and out: the one place that knows the axis order.

In memory a volume is ``[Z, H, W]``: slice ``z`` is ``array[z]``, 962 rows x 1372 columns on
the real data, exactly the reference's ``sitk.GetArrayFromImage(img)[z]``. nibabel's array is
``(x, y, z)``, so ``array = nib_array.transpose(2, 1, 0)`` and slice ``z`` is
``nib_array[:, :, z].T``. As in the reference this is a pure axis reversal: the affine's
direction (flips, obliquity) is kept for writing but never applied to the array.
Spacing is reported in the same order, ``(sz, sy, sx)`` in mm.

Validation (every failure is a one-line ``MicrosegError`` naming the file):
images must be finite with intensities in 0..254 (the dataset's pre-normalised range; they
are rounded to the nearest integer, so values in [-0.5, 254.5) pass) and are returned as
uint8, which is also what the reference trains on (8-bit PNG slices). Masks must be finite and
two-valued at most (0 and one non-zero value, e.g. {0,1} or {0,255}); they are returned as
uint8 {0, 1}.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from microseg.atomic import atomic_path
from microseg.errors import MicrosegError

READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


@dataclass
class Volume:
    """A volume in ``[Z, H, W]`` order with its geometry."""

    array: np.ndarray  # [Z, H, W]
    spacing: tuple[float, float, float]  # (sz, sy, sx) in mm
    affine: np.ndarray  # 4x4, nibabel (x, y, z) convention
    header: nib.Nifti1Header
    path: Path


def _load(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise MicrosegError(f"{path}: file not found")
    try:
        img = nib.load(path)
    except ImageFileError:
        raise MicrosegError(f"{path}: not a readable NIfTI file (corrupt, truncated or another format)") from None
    except READ_ERRORS as err:
        raise MicrosegError(f"{path}: not a readable NIfTI file ({_one_line(err)})") from None
    if len(img.shape) != 3:
        raise MicrosegError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}")
    return img


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def volume_shape(path: str | Path) -> tuple[int, int, int]:
    """``(Z, H, W)`` of a NIfTI volume from its header alone (no voxel data read)."""
    x, y, z = _load(Path(path)).shape
    return (z, y, x)


def volume_spacing(path: str | Path) -> tuple[float, float, float]:
    """``(sz, sy, sx)`` in mm from the header alone."""
    return _spacing(Path(path), _load(Path(path)))


def _spacing(path: Path, img: nib.Nifti1Image) -> tuple[float, float, float]:
    zooms = [float(v) for v in img.header.get_zooms()[:3]]
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise MicrosegError(f"{path}: invalid voxel spacing {tuple(zooms)} in the header")
    return (zooms[2], zooms[1], zooms[0])


def read_volume(path: str | Path, kind: Literal["image", "mask"] = "image") -> Volume:
    """Read and validate a volume; image -> uint8 0..254, mask -> uint8 {0, 1}; ``[Z, H, W]``."""
    path = Path(path)
    img = _load(path)
    try:
        data = np.asarray(img.dataobj)
    except READ_ERRORS as err:
        raise MicrosegError(f"{path}: corrupt or truncated NIfTI data ({_one_line(err)})") from None
    if data.dtype.kind not in "biuf":
        raise MicrosegError(f"{path}: unsupported voxel type {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise MicrosegError(f"{path}: contains NaN or infinite values")
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    array = _as_image(path, array) if kind == "image" else _as_mask(path, array)
    return Volume(array, _spacing(path, img), img.affine.copy(), img.header.copy(), path)


def _as_image(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        hi = int(array.max(initial=0))
        if hi > 254:
            raise MicrosegError(f"{path}: image intensities must lie in 0..254, found up to {hi}")
        return array
    lo, hi = float(array.min(initial=0)), float(array.max(initial=0))
    if lo < -0.5 or hi >= 254.5:
        raise MicrosegError(f"{path}: image intensities must lie in 0..254, found {lo:g}..{hi:g}")
    return np.rint(array).astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)


def _as_mask(path: Path, array: np.ndarray) -> np.ndarray:
    nonzero = array != 0
    values = array[nonzero]
    if values.size and (values != values[0]).any():
        found = np.unique(values)[:4].tolist()
        raise MicrosegError(f"{path}: mask is not binary (non-zero values {found}...; expected 0 and one label)")
    return nonzero.view(np.uint8)


def require_same_shape(mask: Volume, image: Volume) -> None:
    """MicrosegError naming the mask when its ``[Z, H, W]`` differs from the image's."""
    if mask.array.shape != image.array.shape:
        raise MicrosegError(
            f"{mask.path}: shape {mask.array.shape} does not match image {image.path.name} {image.array.shape}"
        )


def _save(path: Path, array_zyx: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None) -> None:
    img = nib.Nifti1Image(np.asarray(array_zyx).transpose(2, 1, 0), affine, header=header)
    img.set_data_dtype(array_zyx.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_mask(path: str | Path, mask_zyx: np.ndarray, like: Volume) -> None:
    """Write a ``[Z, H, W]`` mask as uint8 {0, 1} NIfTI on ``like``'s grid, atomically."""
    mask_zyx = np.asarray(mask_zyx)
    if mask_zyx.shape != like.array.shape:
        raise ValueError(f"mask shape {mask_zyx.shape} differs from volume shape {like.array.shape}")
    _save(Path(path), (mask_zyx != 0).astype(np.uint8), like.affine, like.header.copy())


def write_volume(path: str | Path, array_zyx: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Write a ``[Z, H, W]`` array (its own dtype) with ``spacing = (sz, sy, sx)`` mm, atomically.

    The affine is ``diag(sx, sy, sz, 1)`` in nibabel's (x, y, z) order; units are mm.
    """
    sz, sy, sx = spacing
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    _save(Path(path), np.asarray(array_zyx), np.diag([sx, sy, sz, 1.0]), header)
