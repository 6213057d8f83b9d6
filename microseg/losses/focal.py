"""Sigmoid focal loss (Lin et al. 2017), the "PyTorch focal loss" baseline of seed 002.

FL = -alpha_t (1 - p_t)^gamma log(p_t),  alpha_t = alpha y + (1 - alpha)(1 - y),  mean over pixels:
the same value as `torchvision.ops.sigmoid_focal_loss(logits, target, alpha, gamma, "mean")`
(FACTS.md). Computed from the signed logit z = (2y - 1) x: log p_t = logsigmoid(z) and
(1 - p_t)^gamma = exp(gamma * logsigmoid(-z)), finite for any finite logit and any gamma >= 0.
`alpha=None` (or negative, as in torchvision) disables the class weighting (MONAI's default).
Seed 002's public code multiplies every pixel by alpha instead of alpha_t; that reading is
`0.25*focal:alpha=none`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from microseg.losses.base import SegLoss, register, signed_logits


def focal_terms(logits: Tensor, target: Tensor, gamma: float | Tensor) -> Tensor:
    """Per-pixel -(1 - p_t)^gamma log(p_t) for binary targets (gamma a float or a broadcastable tensor)."""
    z = signed_logits(logits, target)
    return -torch.exp(gamma * F.logsigmoid(-z)) * F.logsigmoid(z)


def class_weights(target: Tensor, alpha: float | Tensor) -> Tensor:
    """alpha_t = alpha y + (1 - alpha)(1 - y)."""
    return alpha * target + (1.0 - alpha) * (1.0 - target)


@register("focal")
class Focal(SegLoss):
    supports_3d = True

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha = None if alpha is None or alpha < 0 else float(alpha)
        self.gamma = float(gamma)

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        loss = focal_terms(logits, target, self.gamma)
        if self.alpha is not None:
            loss = class_weights(target, self.alpha) * loss
        return loss.mean()
