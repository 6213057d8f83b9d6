"""Binary cross-entropy and A-FL's compound baselines (MONAI's DiceCELoss, DiceFocalLoss).

  bce        = mean over pixels of -(y log p + (1 - y) log(1 - p)), from the logits (stable)
  dice_ce    = lambda_dice * dice + lambda_ce * bce
  dice_focal = lambda_dice * dice + lambda_focal * focal,
with MONAI's defaults: both lambdas 1, and the focal term of DiceFocalLoss unweighted by class
(alpha = None) with gamma 2. The Dice term takes `smooth` and `batch` as in `region.Dice`, the
focal term `alpha` and `gamma` as in `focal.Focal` (same ranges); the lambdas must be > 0 (a
term weighted 0 is the other loss alone: name that one).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from microseg.core.rules import POSITIVE
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
    option_rules = {"lambda_dice": POSITIVE, "lambda_ce": POSITIVE, **Dice.option_rules}

    def __init__(
        self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth: float = 1e-5, batch: bool = False
    ) -> None:
        o = self.check_options(lambda_dice=lambda_dice, lambda_ce=lambda_ce, smooth=smooth, batch=batch)
        super().__init__([(o["lambda_dice"], Dice(o["smooth"], o["batch"])), (o["lambda_ce"], BCE())])


@register("dice_focal")
class DiceFocal(WeightedSum):
    option_rules = {
        "lambda_dice": POSITIVE,
        "lambda_focal": POSITIVE,
        "alpha": Focal.option_rules["alpha"],
        "gamma": Focal.option_rules["gamma"],
        **Dice.option_rules,
    }

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        alpha: float | None = None,
        gamma: float = 2.0,
        smooth: float = 1e-5,
        batch: bool = False,
    ) -> None:
        o = self.check_options(
            lambda_dice=lambda_dice, lambda_focal=lambda_focal, alpha=alpha, gamma=gamma, smooth=smooth, batch=batch
        )
        dice, focal = Dice(o["smooth"], o["batch"]), Focal(o["alpha"], o["gamma"])
        super().__init__([(o["lambda_dice"], dice), (o["lambda_focal"], focal)])
