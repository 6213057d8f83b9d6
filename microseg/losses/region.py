"""Soft region-overlap losses on p = sigmoid(x): Dice, IoU (Jaccard) and Tversky, 2D and 3D.

With TP = sum(p y), FP = sum(p (1 - y)), FN = sum((1 - p) y) and smoothing s:
  dice    = 1 - (2 TP + s) / (sum p + sum y + s)                 (Milletari et al. 2016)
  iou     = 1 - (TP + s) / (sum p + sum y - TP + s)              (Rahman & Wang 2016)
  tversky = 1 - (TP + s) / (TP + alpha FP + beta FN + s)         (Salehi et al. 2017)
MONAI's conventions, which A-FL's baselines were built with: s = 1e-5 in numerator and
denominator, sums per sample (`batch=False`) then the mean over the batch; `batch=True` sums
over the whole batch. Tversky's alpha weights false positives and beta false negatives; the
defaults 0.3 / 0.7 are Salehi et al.'s recommended setting (0.5 / 0.5 would be Dice up to the
smoothing).

Valid ranges: smooth > 0 (at least 1e-30: an empty target with an empty prediction is 0 / 0
without it, and a negative one can make the loss explode); Tversky's alpha, beta >= 0 with
alpha + beta > 0 (both 0 make the loss constant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from microseg.core.errors import MicrosegError
from microseg.core.rules import FLOAT32_TINY, NON_NEGATIVE, Flag, Number
from microseg.losses.base import SegLoss, register

SMOOTH = Number(FLOAT32_TINY, text=f"> 0 (at least {FLOAT32_TINY:g})")


def overlap_sums(logits: Tensor, target: Tensor, batch: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(TP, sum p, sum y) per sample and channel, or over the whole batch."""
    p = torch.sigmoid(logits)
    dims = tuple(range(logits.ndim)) if batch else tuple(range(2, logits.ndim))
    return (p * target).sum(dims), p.sum(dims), target.sum(dims)


class _Region(SegLoss):
    supports_3d = True
    option_rules = {"smooth": SMOOTH, "batch": Flag()}

    def __init__(self, smooth: float = 1e-5, batch: bool = False) -> None:
        super().__init__()
        self.set_options(smooth=smooth, batch=batch)


@register("dice")
class Dice(_Region):
    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        tp, sum_p, sum_y = overlap_sums(logits, target, self.batch)
        return (1.0 - (2.0 * tp + self.smooth) / (sum_p + sum_y + self.smooth)).mean()


@register("iou")
class IoU(_Region):
    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        tp, sum_p, sum_y = overlap_sums(logits, target, self.batch)
        return (1.0 - (tp + self.smooth) / (sum_p + sum_y - tp + self.smooth)).mean()


@register("tversky")
class Tversky(_Region):
    option_rules = {"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, **_Region.option_rules}

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1e-5, batch: bool = False) -> None:
        super().__init__(smooth, batch)
        self.set_options(alpha=alpha, beta=beta)
        if self.alpha + self.beta == 0:
            raise MicrosegError("tversky: options alpha=0 and beta=0 make the loss constant; alpha + beta must be > 0")

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        tp, sum_p, sum_y = overlap_sums(logits, target, self.batch)
        fp, fn = sum_p - tp, sum_y - tp
        return (1.0 - (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)).mean()
