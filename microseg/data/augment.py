"""Training augmentation: the same random geometry for the image and both masks.

Random rotations, flips and intensity changes as in MicroSegNet / the adaptive-focal paper,
with albumentations 2.x:
- horizontal flip (p = 0.5); no vertical flip: the probe face is always the top edge, so a
  vertically flipped slice is one the network never meets;
- Affine (p = 0.7): rotation +-15 deg, scale 0.9..1.1, shift up to size / 16 pixels;
  bilinear for the image, nearest neighbour for the masks (they stay binary), zero fill;
- brightness/contrast +-0.15 (p = 0.5) and Gaussian noise with sd 1..4 % of full scale (p = 0.3),
  image only.
Inputs are uint8 ``[S, S]`` arrays; call as ``aug(image=img, masks=[expert, non_expert])``.
"""

from __future__ import annotations

import albumentations as A
import cv2


def build_augmentation(size: int, seed: int | None = None) -> A.Compose:
    """The training augmentation for ``size x size`` slices; ``seed`` fixes its random stream."""
    shift = max(1, size // 16)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), translate_px=(-shift, shift),
                     interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
        ],
        seed=seed,
    )
