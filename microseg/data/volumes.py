"""NIfTI volumes in and out: the one place that knows the axis order.

In memory a volume is ``[Z, H, W]``: slice ``z`` is ``array[z]``, 962 rows x 1372 columns on
the real data, exactly the reference's ``sitk.GetArrayFromImage(img)[z]``. nibabel's array is
``(x, y, z)``, so ``array = nib_array.transpose(2, 1, 0)`` and slice ``z`` is
``nib_array[:, :, z].T``. As in the reference this is a pure axis reversal: the affine's
direction (flips, obliquity) is kept for writing but never applied to the array.
Spacing is reported in the same order, ``(sz, sy, sx)`` in mm.

Validation (every failure is a one-line ``MicrosegError`` naming the file):
images must be finite with intensities in 0..INTENSITY_MAX (the dataset's pre-normalised
range, ``microseg.core.preprocess``; any integer or float type, rounded to the nearest integer, so
values in [-0.5, INTENSITY_MAX + 0.5) pass) and are returned as uint8, which is also what the
reference trains on (8-bit PNG slices). An image whose intensities span no more than 0..1 (a
float export scaled to 0..1, a bool or 0/1 volume) or a constant image is refused: on the
dataset's scale it is black. Masks must be finite and two-valued at most (0 and one non-zero
value: {0,1}, {0,255}, bool, 0.0/1.0); they are returned as uint8 {0, 1}.

Where an image and its masks meet, ``require_same_geometry`` checks that they lie on the same
voxel grid: shape, spacing, origin and axis directions (``GEOMETRY_TOLERANCE``).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import numpy.typing as npt
from isal import igzip, isal_zlib
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import SpatialHeader, SpatialImage

from microseg.core.atomic import atomic_path
from microseg.core.errors import MicrosegError, warn
from microseg.core.preprocess import INTENSITY_MAX
from microseg.data.layout import NIFTI_SUFFIXES

_ISAL_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # isal's stub: an instance; it is the class
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, _ISAL_ERROR, ImageFileError)
GEOMETRY_TOLERANCE = {"spacing": 1e-4, "origin": 1e-2, "direction": 1e-4}
"""How far a mask's grid may differ from its image's: spacing relative, origin in units of the
smallest voxel size, axis directions as differences of direction cosines (1e-4 ~ 0.006 degrees);
far above float32 header rounding, far below any real misregistration."""


@dataclass(frozen=True)
class Geometry:
    """A volume's voxel grid: ``[Z, H, W]`` shape, ``(sz, sy, sx)`` spacing in mm, nibabel affine."""

    path: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3]

    @property
    def directions(self) -> np.ndarray:
        """Unit axis directions, one column per nibabel axis (x, y, z)."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass
class Volume:
    """A volume in ``[Z, H, W]`` order with its geometry."""

    array: np.ndarray  # [Z, H, W]
    spacing: tuple[float, float, float]  # (sz, sy, sx) in mm
    affine: np.ndarray  # 4x4, nibabel (x, y, z) convention
    header: SpatialHeader
    path: Path

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.path, self.array.shape, self.spacing, self.affine)


def _load(path: Path) -> SpatialImage:
    if not path.is_file():
        raise MicrosegError(f"{path}: file not found")
    try:
        img = nib.load(path)
    except ImageFileError:
        raise MicrosegError(f"{path}: not a readable NIfTI file (corrupt, truncated or another format)") from None
    except READ_ERRORS as err:
        raise MicrosegError(f"{path}: not a readable NIfTI file ({_one_line(err)})") from None
    if not isinstance(img, SpatialImage):
        raise MicrosegError(f"{path}: not a NIfTI volume (a {type(img).__name__})")
    if len(img.shape) != 3:
        raise MicrosegError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}")
    return img


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_geometry(path: str | Path) -> Geometry:
    """A NIfTI volume's grid from its header alone (no voxel data read)."""
    path = Path(path)
    img = _load(path)
    x, y, z = img.shape
    return Geometry(path, (z, y, x), _spacing(path, img), img.affine.copy())


def _spacing(path: Path, img: SpatialImage) -> tuple[float, float, float]:
    zooms = [float(v) for v in img.header.get_zooms()[:3]]
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise MicrosegError(f"{path}: invalid voxel spacing {tuple(zooms)} in the header")
    return (zooms[2], zooms[1], zooms[0])


class SlabReader:
    """One NIfTI volume read in slabs of consecutive slices, z ascending, each voxel decompressed once.

    ``read(start, stop)`` returns slices start..stop-1 as ``[n, H, W]``, validated as
    ``read_volume`` validates a whole volume (image -> uint8 0..INTENSITY_MAX, mask -> uint8
    {0, 1}); ``finish()`` after the last slab runs the checks that need every slice (a constant
    or 0..1 image) and closes the file. Memory is one slab: nibabel's array proxy reads the
    slab's bytes (on disk slice z is one contiguous block) from a file kept open, ``.nii.gz``
    through ISA-L's gzip (``isal.igzip``, 2-3x zlib's speed).
    """

    def __init__(self, path: str | Path, kind: Literal["image", "mask"] = "image"):
        self.path, self.kind = Path(path), kind
        img = _load(self.path)
        x, y, z = img.shape
        self.geometry = Geometry(self.path, (z, y, x), _spacing(self.path, img), img.affine.copy())
        self.header = img.header.copy()
        self._file = (igzip.open if self.path.name.endswith(".gz") else open)(self.path, "rb")
        stored = img.dataobj  # the file's own layout (an image's header has its data offset reset)
        if not isinstance(stored, ArrayProxy):
            raise MicrosegError(f"{self.path}: not a NIfTI volume (a {type(img).__name__})")
        spec = (stored.shape, stored.dtype, stored.offset, stored.slope, stored.inter)
        self._proxy = ArrayProxy(self._file, spec, mmap=False)
        self._next, self._lo, self._hi = 0, math.inf, -math.inf
        self._label: float | None = None  # the mask's one non-zero value, once seen

    @property
    def empty(self) -> bool:
        """True while no non-zero voxel has been read (a mask empty on every slice, once finished)."""
        return self._label is None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Slices start..stop-1 (start is where the previous slab ended) as a validated ``[n, H, W]`` array."""
        if start != self._next:
            raise ValueError(f"{self.path}: slabs must be read in order (next is {self._next}, asked {start})")
        stop = min(stop, self.geometry.shape[0])
        try:
            data = np.asarray(self._proxy[:, :, start:stop])
        except READ_ERRORS as err:
            raise MicrosegError(f"{self.path}: corrupt or truncated NIfTI data ({_one_line(err)})") from None
        self._next = stop
        if data.dtype.kind not in "biuf":
            raise MicrosegError(f"{self.path}: unsupported voxel type {data.dtype}")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise MicrosegError(f"{self.path}: contains NaN or infinite values")
        array = np.ascontiguousarray(data.transpose(2, 1, 0))
        return self._as_image(array) if self.kind == "image" else self._as_mask(array)

    def finish(self) -> None:
        """The whole-volume checks, once every slice has been read; closes the file."""
        self.close()
        if self._next != self.geometry.shape[0]:
            raise ValueError(f"{self.path}: finished after {self._next} of {self.geometry.shape[0]} slices")
        lo, hi = (self._lo, self._hi) if self._lo <= self._hi else (0.0, 0.0)
        if self.kind == "image" and lo == hi:
            raise MicrosegError(f"{self.path}: image is constant ({lo:g} in every voxel): nothing to segment")
        if self.kind == "image" and hi <= 1:
            raise MicrosegError(
                f"{self.path}: image intensities span only {lo:g}..{hi:g}, but the dataset is "
                f"0..{INTENSITY_MAX} (a 0..1 export? multiply it by {INTENSITY_MAX})"
            )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SlabReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _as_image(self, array: np.ndarray) -> np.ndarray:
        if not array.size:
            return array.astype(np.uint8)
        lo, hi = float(array.min()), float(array.max())
        if lo < -0.5 or hi >= INTENSITY_MAX + 0.5:
            found = f"up to {hi:g}" if array.dtype == np.uint8 else f"{lo:g}..{hi:g}"
            raise MicrosegError(
                f"{self.path}: image intensities must lie in 0..{INTENSITY_MAX} (the dataset's "
                f"range), found {found}; rescale the volume to 0..{INTENSITY_MAX}"
            )
        self._lo, self._hi = min(self._lo, lo), max(self._hi, hi)
        if array.dtype == np.uint8:
            return array
        return np.rint(array).astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)

    def _as_mask(self, array: np.ndarray) -> np.ndarray:
        """0/1 bytes of a mask slab; MicrosegError unless every non-zero voxel of the volume has one label.

        Counted, not gathered: the slab is binary iff it holds as many voxels equal to its label
        (the first non-zero value seen) as non-zero voxels. A uint8 slab of 0s and 1s is its own answer.
        """
        top = array.max() if array.dtype == np.uint8 and array.size and self._label in (None, 1) else None
        if top is not None and top <= 1:
            self._label = 1 if top else self._label
            return array
        nonzero = array != 0
        n = np.count_nonzero(nonzero)
        if n:
            label = array.flat[np.argmax(nonzero)] if self._label is None else self._label
            if np.count_nonzero(array == label) != n:
                found = np.unique(np.append(array[nonzero], label))[:4].tolist()
                raise MicrosegError(
                    f"{self.path}: mask is not binary (non-zero values {found}...; expected 0 and one label)"
                )
            self._label = label
        return nonzero.view(np.uint8)


def read_volume(path: str | Path, kind: Literal["image", "mask"] = "image") -> Volume:
    """Read and validate a volume; image -> uint8 0..INTENSITY_MAX, mask -> uint8 {0, 1}; ``[Z, H, W]``."""
    with SlabReader(path, kind) as reader:
        array = reader.read(0, reader.geometry.shape[0])
        reader.finish()
    geometry = reader.geometry
    return Volume(array, geometry.spacing, geometry.affine, reader.header, geometry.path)


def _numbers(values: Iterable[Any]) -> str:
    """``(a, b, c)`` with 6 significant digits; nested sequences recursively."""
    items = [_numbers(v) if np.ndim(v) else f"{float(v):.6g}" for v in values]
    return f"({', '.join(items)})"


def _mismatch(mask: Geometry, image: Geometry) -> tuple[str, str, str] | None:
    """The first property in which the two grids differ beyond GEOMETRY_TOLERANCE, with both values."""
    tol = GEOMETRY_TOLERANCE
    if mask.shape != image.shape:
        return "shape", _numbers(mask.shape), _numbers(image.shape)
    ms, is_ = np.array(mask.spacing), np.array(image.spacing)
    if (np.abs(ms - is_) > tol["spacing"] * np.maximum(ms, is_)).any():
        return "spacing (mm)", _numbers(ms), _numbers(is_)
    if (np.abs(mask.directions - image.directions) > tol["direction"]).any():
        return "axis directions", _numbers(mask.directions.T.round(4)), _numbers(image.directions.T.round(4))
    if (np.abs(mask.origin - image.origin) > tol["origin"] * min(image.spacing)).any():
        return "origin (mm)", _numbers(mask.origin), _numbers(image.origin)
    return None


def require_same_geometry(mask: Geometry, image: Geometry) -> None:
    """MicrosegError naming both files when the mask's grid is not the image's.

    Shape, spacing, axis directions (flips, obliquity) and origin are compared within
    GEOMETRY_TOLERANCE: the arrays are never resampled, so a mask on another grid would be
    scored against voxels it does not describe.
    """
    found = _mismatch(mask, image)
    if found is not None:
        name, mask_value, image_value = found
        raise MicrosegError(f"{mask.path}: {name} {mask_value}, but its image {image.path} has {image_value}")


def read_mask_for(image: Volume, path: str | Path) -> Volume:
    """Read the mask at ``path`` of ``image``: binary, on the image's grid (``require_same_geometry``).

    A mask empty on every slice is legitimate but suspicious (a sweep that misses the gland, an
    export that lost its labels): one warning line names it and the caller goes on.
    """
    mask = read_volume(path, "mask")
    require_same_geometry(mask.geometry, image.geometry)
    if not mask.array.any():
        warn(f"{mask.path}: mask is empty on every slice")
    return mask


@contextlib.contextmanager
def volume_writer(
    path: str | Path,
    shape_zyx: tuple[int, int, int],
    dtype: npt.DTypeLike,
    affine: np.ndarray,
    header: SpatialHeader | None = None,
) -> Iterator[Callable[[np.ndarray], None]]:
    """Write a ``[Z, H, W]`` volume slab by slab, z ascending: yields ``write(slab)``; atomic.

    The file holds what ``nibabel.save`` writes for the whole array (the same header, the voxels
    in the same order: on disk x varies fastest, then y, then z, i.e. each ``[n, H, W]`` slab's
    C-order bytes), ``.nii.gz`` compressed at level 1 (nibabel's default) by ISA-L's gzip.
    """
    path, data_dtype = Path(path), np.dtype(dtype)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise MicrosegError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    z, y, x = shape_zyx
    img = nib.Nifti1Image(np.broadcast_to(np.zeros((), data_dtype), (x, y, z)), affine, header=header)
    img.set_data_dtype(data_dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.update_header()
    written = 0

    def write(slab: np.ndarray) -> None:
        nonlocal written
        slab = np.ascontiguousarray(slab, dtype=data_dtype)
        if slab.shape[1:] != (y, x) or written + len(slab) > z:
            raise ValueError(f"{path}: slab of shape {slab.shape} after {written} of {z} slices")
        out.write(slab.data)
        written += len(slab)

    with atomic_path(path) as tmp:
        with igzip.open(tmp, "wb", compresslevel=1) if path.name.endswith(".gz") else open(tmp, "wb") as out:
            img.header.write_to(out)
            out.write(bytes(int(img.header.get_data_offset()) - out.tell()))
            yield write
        if written != z:
            raise ValueError(f"{path}: {written} of {z} slices written")


def _save(path: Path, array_zyx: np.ndarray, affine: np.ndarray, header: SpatialHeader | None) -> None:
    with volume_writer(path, array_zyx.shape, array_zyx.dtype, affine, header) as write:
        write(array_zyx)


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
