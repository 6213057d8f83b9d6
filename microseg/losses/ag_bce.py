"""AG-BCE, MicroSegNet's annotation-guided binary cross-entropy.

hard = dilate(expert XOR non_expert, k),  easy = 1 - hard,
bce  = -(beta y log(p + eps) + (1 - beta)(1 - y) log(1 - p + eps)),  p = sigmoid(x),
loss = (sum(bce * easy) / (1 + w) + w * sum(bce * hard) / (1 + w)) / number_of_pixels,

with beta = 0.5, eps = 1e-6, w = 4 and k = the main output's kernel
(`REFERENCE_KERNEL_SIZES[-1]`, 4; deep supervision passes each scale's). `number_of_pixels` is
the whole batch's B*H*W, as the reference computes it on a batch tensor (it equals the
per-sample value averaged over the batch, all samples being the same size). p and 1 - p are
sigmoid(x) and sigmoid(-x), so log(1 - p + eps) has no cancellation near p = 1; eps stays inside
the logs as in the paper.

Valid ranges: w > 0 (the hard region's weight relative to the easy region's 1); beta in (0, 1)
(both classes count: beta = 0 or 1 has a trivial minimiser, beta > 1 a negative loss); eps in
[1e-30, 0.01]; k an integer >= 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from microseg.core.preprocess import REFERENCE_KERNEL_SIZES
from microseg.core.rules import GUARD, KERNEL, POSITIVE, Number
from microseg.losses.base import SegLoss, register
from microseg.losses.hard_region import hard_region

CLASS_BALANCE = Number(0.0, 1.0, low_open=True, high_open=True)
"""beta: the foreground's share of the BCE, strictly between 0 and 1."""


def eps_bce(logits: Tensor, target: Tensor, beta: float, eps: float) -> Tensor:
    """Per-pixel -(beta y log(sigmoid(x) + eps) + (1 - beta)(1 - y) log(sigmoid(-x) + eps))."""
    positive = torch.log(torch.sigmoid(logits) + eps)
    negative = torch.log(torch.sigmoid(-logits) + eps)
    return -(beta * target * positive + (1.0 - beta) * (1.0 - target) * negative)


@register("ag_bce")
class AGBCE(SegLoss):
    needs_non_expert = True
    aliases = {"w": "hard_weight", "k": "kernel_size"}
    option_rules = {"hard_weight": POSITIVE, "kernel_size": KERNEL, "beta": CLASS_BALANCE, "eps": GUARD}

    def __init__(
        self,
        hard_weight: float = 4.0,
        kernel_size: int = REFERENCE_KERNEL_SIZES[-1],
        beta: float = 0.5,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.set_options(hard_weight=hard_weight, kernel_size=kernel_size, beta=beta, eps=eps)

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        assert non_expert is not None  # needs_non_expert: `check_inputs` refused a missing one
        hard = hard_region(target, non_expert, self.kernel_size)
        w = self.hard_weight
        weight = (1.0 - hard) / (1.0 + w) + hard * (w / (1.0 + w))
        return (weight * eps_bce(logits, target, self.beta, self.eps)).mean()
