"""Sigmoid focal loss (Lin et al. 2017), the "PyTorch focal loss" baseline of micro-US adaptive focal.

FL = -alpha_t (1 - p_t)^gamma log(p_t),  alpha_t = alpha y + (1 - alpha)(1 - y),  mean over pixels:
the same value as `torchvision.ops.sigmoid_focal_loss(logits, target, alpha, gamma, "mean")`.
Computed from the signed logit z = (2y - 1) x: log p_t = logsigmoid(z) and
(1 - p_t)^gamma = exp(gamma * logsigmoid(-z)), finite for any finite logit and any gamma >= 0.

Options: alpha in [0, 1], or `none` for no class weighting (MONAI's default; torchvision spells
it alpha < 0); gamma >= 0. micro-US adaptive focal's public code multiplies every pixel by alpha
instead of alpha_t; that reading is `0.25*focal:alpha=none`.

`double_sigmoid=true` (not the default) reproduces that paper's PyTorch-focal baseline as its
public training code computes it: the network's sigmoid outputs are passed to the focal loss,
which applies its own sigmoid again, FL(sigmoid(x)). Then p = sigmoid(sigmoid(x)) only spans
(0.5, 0.731), so a background pixel costs at least 0.75 * 0.5^2 * ln 2 = 0.130 (alpha 0.25,
gamma 2) however right the network is, and the chain rule multiplies every gradient by
sigmoid'(x) <= 1/4, vanishing where the network is confident: the loss plateaus near 0.13 (the
paper's Table 1: 0.128 after 10 epochs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from microseg.core.rules import NON_NEGATIVE, Flag, Number
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
    option_rules = {"alpha": Number(0.0, 1.0, none=True), "gamma": NON_NEGATIVE, "double_sigmoid": Flag()}

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, double_sigmoid: bool = False) -> None:
        super().__init__()
        self.set_options(alpha=alpha, gamma=gamma, double_sigmoid=double_sigmoid)

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        x = torch.sigmoid(logits) if self.double_sigmoid else logits
        loss = focal_terms(x, target, self.gamma)
        if self.alpha is not None:
            loss = class_weights(target, self.alpha) * loss
        return loss.mean()
