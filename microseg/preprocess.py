"""The preprocessing a run is trained with, in one record saved in every checkpoint.

Everything that turns a native slice into the network's input, and the network's outputs into
training targets, is fixed here and nowhere else, so a run is always evaluated with its
training's preprocessing:
- intensities: the dataset is pre-normalised to 0..INTENSITY_MAX (254, MicroSegNet); the
  network sees image / 254, clipped to 1;
- slice resize to size x size: images by area averaging (cv2.INTER_AREA), masks by area
  averaging then >= 0.5 (the slice cache, ``microseg.data.cache``);
- deep-supervision targets: the expert and non-expert masks resized on the device to each
  head's size (``target_resize``, MicroSegNet's bilinear-then-truncate by default);
- per-scale hard-region dilation kernels, coarsest head first (1, 2, 3, 4 for the 28, 56, 112,
  224 outputs in MicroSegNet); the last one is the main output's, which evaluation scales to
  native pixels for the hard-region scores;
- how the probability map returns to the native size at evaluation (``prediction_resize``:
  bilinear, or MicroSegNet's test script's nearest).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

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
    def from_dict(cls, values: dict[str, Any]) -> "Preprocess":
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in values.items() if k in known}
        if "kernel_sizes" in given:
            given["kernel_sizes"] = tuple(int(k) for k in given["kernel_sizes"])
        return cls(**given)
