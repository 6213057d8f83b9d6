"""The preprocessing a run is trained with, in one record saved in every checkpoint.

Everything that turns a native slice into the network's input, and the network's outputs into
training targets, is fixed here and nowhere else, so a run is always evaluated with its
training's preprocessing. The record holds the numbers; the functions below are the behaviour,
and every caller (the slice cache, the dataset, the deep-supervision targets, evaluation and the
analyses) uses them from here:
- intensities: the dataset is pre-normalised to 0..INTENSITY_MAX (254, MicroSegNet); the
  network sees image / 254, clipped to 1 (``scale_intensity``);
- slice resize to size x size: images by area averaging (cv2.INTER_AREA, ``resize_image``),
  masks by area averaging then >= 0.5 (``resize_mask``). The reference rescales twice with
  bilinear interpolation (962x1372 -> 481x686 PNG -> 224x224), which aliases the speckle at
  these 4-6x reductions; area averaging is the anti-aliased version of the same map. Masks are
  area-averaged and thresholded at 0.5 so the boundary moves neither in nor out;
- deep-supervision targets: the expert and non-expert masks resized on the device to each
  head's size (``target_resize``, ``resize_target``, MicroSegNet's bilinear-then-truncate by
  default);
- per-scale hard-region dilation kernels, coarsest head first (1, 2, 3, 4 for the 28, 56, 112,
  224 outputs in MicroSegNet); the last one is the main output's, which evaluation scales to
  native pixels for the hard-region scores;
- how the probability map returns to the native size at evaluation (``prediction_resize``:
  bilinear, or MicroSegNet's test script's nearest; ``resize_prediction``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

INTENSITY_MAX = 254
"""The dataset's intensity range is 0..INTENSITY_MAX (MicroSegNet's pre-normalisation)."""
REFERENCE_KERNEL_SIZES = (1, 2, 3, 4)
"""MicroSegNet's hard-region dilation kernels for the 1/8, 1/4, 1/2 and full-size outputs."""
SIZE_MULTIPLE = 16
"""The encoder's stride (ViT-B/16 patches on the stride-16 map): every training size is a multiple of it."""
TARGET_RESIZES = ("bilinear_floor", "nearest", "area")
PREDICTION_RESIZES = ("bilinear", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """Training size, intensity scale, resize rules and per-scale kernels of one run."""

    size: int = 224
    intensity_max: int = INTENSITY_MAX
    kernel_sizes: tuple[int, ...] = REFERENCE_KERNEL_SIZES
    target_resize: str = "bilinear_floor"
    prediction_resize: str = "bilinear"

    @property
    def n_scales(self) -> int:
        return len(self.kernel_sizes)

    @property
    def main_kernel(self) -> int:
        """The main (full-size) output's dilation kernel."""
        return self.kernel_sizes[-1]

    @property
    def scale_sizes(self) -> tuple[int, ...]:
        """Each head's output size, coarsest first: size/8, size/4, size/2, size for four scales."""
        n = self.n_scales
        return tuple(self.size // 2 ** (n - 1 - i) for i in range(n))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kernel_sizes": list(self.kernel_sizes)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocess:
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in values.items() if k in known}
        if "kernel_sizes" in given:
            given["kernel_sizes"] = tuple(int(k) for k in given["kernel_sizes"])
        return cls(**given)


Image = TypeVar("Image", np.ndarray, Tensor)


def scale_intensity(image: Image, intensity_max: int = INTENSITY_MAX) -> Image:
    """The network's input: image / intensity_max clipped to [0, 1], float32 (a NumPy array or a tensor on its device)."""
    if isinstance(image, Tensor):
        return (image.float() / float(intensity_max)).clamp_(0, 1)
    return np.clip(image.astype(np.float32) / intensity_max, 0, 1)


def resize_image(slice_hw: np.ndarray, size: int) -> np.ndarray:
    """An image slice resized to ``size x size`` by area averaging (dtype kept)."""
    return cv2.resize(slice_hw, (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(slice_hw: np.ndarray, size: int) -> np.ndarray:
    """A binary slice resized to ``size x size``: area fraction >= 0.5 -> 1 (uint8)."""
    area = cv2.resize(slice_hw.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (area >= 0.5).view(np.uint8)


def resize_target(mask: Tensor, size: Sequence[int], mode: str = TARGET_RESIZES[0]) -> Tensor:
    """A {0,1} [B, C, *spatial] mask resized to `size` (spatial) on its device, still {0,1}; unchanged if already that size.

    - "bilinear_floor" (default): MicroSegNet's dataset code, `cv2.resize` (bilinear, half-pixel
      centres) and then `.long()`, which truncates: a pixel stays foreground only where every input
      pixel under the bilinear support is foreground (1e-6 tolerance for float rounding).
    - "nearest": the input pixel under each output pixel's centre (`nearest-exact`).
    - "area": the mean over each output pixel's footprint, thresholded at 0.5.
    """
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    mask = mask.to(torch.promote_types(mask.dtype, torch.float32))
    if mode == "nearest":
        return F.interpolate(mask, size=tuple(size), mode="nearest-exact")
    if mode == "area":
        return (F.interpolate(mask, size=tuple(size), mode="area") >= 0.5).to(mask.dtype)
    linear = "bilinear" if mask.ndim == 4 else "trilinear"
    resized = F.interpolate(mask, size=tuple(size), mode=linear, align_corners=False)
    return (resized >= 1.0 - 1e-6).to(mask.dtype)


def resize_prediction(prob: Tensor, size_hw: tuple[int, int], mode: str = PREDICTION_RESIZES[0]) -> Tensor:
    """A [B, 1, S, S] probability map back to the native slice size on its device (bilinear or nearest)."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(prob, size=size_hw, mode=mode, **kwargs)
