"""The adaptive focal loss (micro-US adaptive focal: section "Proposed Adaptive_ Focal Loss", its pseudocode).

hard  = dilate(expert XOR non_expert, k),  easy = 1 - hard,  p = sigmoid(x),
focal = -beta (1 - p_t)^gamma_f log(p_t + eps),  p_t = p y + (1 - p)(1 - y),
gamma = (1 - mean(p)) + mean(non_expert)          (sample difficulty + annotation variability),
loss  = (gamma * sum(focal * hard) + sum(focal * easy) / gamma) / N.

Readings of what the paper leaves open (each a parameter):
- kernel_size = the main (224 px) output's kernel, `REFERENCE_KERNEL_SIZES[-1]` (4); deep
  supervision passes each scale's.
- beta = 0.5: AG-BCE's beta, and the value in a public implementation of this pseudocode
  (`adaptive_focal_loss` beside MicroSegNet's AG-BCE; "the public code" below).
- focusing="adaptive": the focal exponent gamma_f is the adaptive gamma (the pseudocode writes
  one gamma for both, and so does that code); "fixed" uses `focal_gamma` (2) instead.
- gamma_scope="sample": gamma from each sample's own means, N = H*W*C per sample, mean over
  the batch (the paper: gamma adapts to "each sample"). "batch" takes both means over the whole
  batch and N = B*H*W, which is what the public code computes on a batch tensor.
- detach_gamma=True: gamma is a weight, not an objective; with its gradient, the 1 - mean(p)
  term would move every probability, labels aside, to trade hard against easy weight. The
  public code detaches it too (`.item()`).
- gamma is in [0, 2] by construction (both means lie in [0, 1]); it is clamped below at
  `gamma_min` = 0.1 so that easy / gamma stays bounded when mean(p) -> 1 with an empty
  non-expert mask.
- p is clamped to [eps, 1 - eps] before p_t, as in the public code. p_t and 1 - p_t are
  computed as sigmoid(+-(2y - 1) x), so there is no 1 - p cancellation, and the clamp keeps
  (1 - p_t)^gamma_f differentiable for gamma_f < 1.
- mean(p) is over probabilities: the pseudocode's "mean(ypred)" over raw logits is unbounded.

Valid ranges: beta > 0 (a scale: beta < 0 gives a negative loss); eps in [1e-30, 0.01];
focal_gamma >= 0; gamma_min in (0, 2] (gamma itself lies in [0, 2]); k an integer >= 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from microseg.core.preprocess import REFERENCE_KERNEL_SIZES
from microseg.core.rules import GUARD, KERNEL, NON_NEGATIVE, POSITIVE, Choice, Flag, Number
from microseg.losses.base import SegLoss, register, signed_logits
from microseg.losses.hard_region import hard_region


@register("adaptive_focal")
class AdaptiveFocal(SegLoss):
    needs_non_expert = True
    aliases = {"k": "kernel_size"}
    option_rules = {
        "kernel_size": KERNEL,
        "beta": POSITIVE,
        "eps": GUARD,
        "focusing": Choice(("adaptive", "fixed")),
        "focal_gamma": NON_NEGATIVE,
        "gamma_scope": Choice(("sample", "batch")),
        "detach_gamma": Flag(),
        "gamma_min": Number(0.0, 2.0, low_open=True),
    }

    def __init__(
        self,
        kernel_size: int = REFERENCE_KERNEL_SIZES[-1],
        beta: float = 0.5,
        eps: float = 1e-6,
        focusing: str = "adaptive",
        focal_gamma: float = 2.0,
        gamma_scope: str = "sample",
        detach_gamma: bool = True,
        gamma_min: float = 0.1,
    ) -> None:
        super().__init__()
        self.set_options(
            kernel_size=kernel_size,
            beta=beta,
            eps=eps,
            focusing=focusing,
            focal_gamma=focal_gamma,
            gamma_scope=gamma_scope,
            detach_gamma=detach_gamma,
            gamma_min=gamma_min,
        )

    def adaptive_gamma(self, logits: Tensor, non_expert: Tensor) -> Tensor:
        """(1 - mean(sigmoid(x))) + mean(non_expert), per sample [B,1,1,1] or per batch (scalar)."""
        dims = tuple(range(1, logits.ndim)) if self.gamma_scope == "sample" else tuple(range(logits.ndim))
        gamma = 1.0 - torch.sigmoid(logits).mean(dims, keepdim=True) + non_expert.mean(dims, keepdim=True)
        gamma = gamma.clamp_min(self.gamma_min)
        return gamma.detach() if self.detach_gamma else gamma

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        assert non_expert is not None  # needs_non_expert: `check_inputs` refused a missing one
        hard = hard_region(target, non_expert, self.kernel_size)
        gamma = self.adaptive_gamma(logits, non_expert)
        z = signed_logits(logits, target)
        p_t = torch.sigmoid(z).clamp(self.eps, 1.0 - self.eps)
        one_minus_p_t = torch.sigmoid(-z).clamp(self.eps, 1.0 - self.eps)
        exponent = gamma if self.focusing == "adaptive" else self.focal_gamma
        focal = -self.beta * one_minus_p_t.pow(exponent) * torch.log(p_t + self.eps)
        return (focal * (gamma * hard + (1.0 - hard) / gamma)).mean()
