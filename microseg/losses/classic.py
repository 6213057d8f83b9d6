"""Binary cross-entropy and the compound baselines of seed 000 / 003 (MONAI's DiceCELoss, DiceFocalLoss).

  bce        = mean over pixels of -(y log p + (1 - y) log(1 - p)), from the logits (stable)
  dice_ce    = lambda_dice * dice + lambda_ce * bce
  dice_focal = lambda_dice * dice + lambda_focal * focal,
with MONAI's defaults: both lambdas 1, and the focal term of DiceFocalLoss unweighted by class
(alpha = None) with gamma 2. The Dice term takes `smooth` and `batch` as in `region.Dice`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from microseg.losses.base import SegLoss, WeightedSum, register
from microseg.losses.focal import Focal
from microseg.losses.region import Dice


@register("bce")
class BCE(SegLoss):
    supports_3d = True

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, target)


@register("dice_ce")
class DiceCE(WeightedSum):
    def __init__(
        self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth: float = 1e-5, batch: bool = False
    ) -> None:
        super().__init__([(lambda_dice, Dice(smooth, batch)), (lambda_ce, BCE())])


@register("dice_focal")
class DiceFocal(WeightedSum):
    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        alpha: float | None = None,
        gamma: float = 2.0,
        smooth: float = 1e-5,
        batch: bool = False,
    ) -> None:
        super().__init__([(lambda_dice, Dice(smooth, batch)), (lambda_focal, Focal(alpha, gamma))])
