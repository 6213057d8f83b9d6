"""Training augmentation (the micro-US adaptive focal paper's): one random geometry for the image and both masks.

The micro-US adaptive focal paper applies "random rotations, flips, and intensity variations"
to the training images (its Algorithm 1: "rotation, scaling, flipping") and gives no
parameters; MicroSegNet applies none (its dataset only resizes the slice and masks to the four
output scales: `--no-augment`, the `microsegnet` recipe). Exactly those four, with albumentations
2.x and parameters of our choosing:
- flips: horizontal (p = 0.5); no vertical flip: the probe face is always the top edge, so a
  vertically flipped slice is one the network never meets;
- rotation +-15 deg and scaling 0.9..1.1, one Affine (p = 0.7), no translation; bilinear for the
  image, nearest neighbour for the masks (they stay binary), zero fill;
- intensity variations: brightness and contrast +-0.15 (p = 0.5), image only.
Inputs are uint8 ``[S, S]`` arrays; call as ``aug(image=img, masks=[expert, non_expert])``.

This is the one module that imports albumentations: importing it asks the package index for its
latest version unless NO_ALBUMENTATIONS_UPDATE is set, so the variable is set first (only the
`download` commands use the network).
"""

from __future__ import annotations

import os

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # before the import: no version check over the network

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations import Compose  # noqa: E402


def build_augmentation(seed: int | None = None) -> Compose:
    """The training augmentation (any slice size); ``seed`` fixes its random stream."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                rotate=(-15, 15),
                scale=(0.9, 1.1),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        ],
        seed=seed,
    )
