"""Adaptive focal loss of seed 002 (section "Proposed Adaptive_ Focal Loss", its pseudocode).

hard  = dilate(expert XOR non_expert, k),  easy = 1 - hard,  p = sigmoid(x),
focal = -beta (1 - p_t)^gamma_f log(p_t + eps),  p_t = p y + (1 - p)(1 - y),
gamma = (1 - mean(p)) + mean(non_expert)          (sample difficulty + annotation variability),
loss  = (gamma * sum(focal * hard) + sum(focal * easy) / gamma) / N.

Readings of what the paper leaves open (each a parameter):
- kernel_size = 4: the main (224 px) output's kernel; deep supervision passes 1, 2, 3, 4.
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
"""

from __future__ import annotations

import torch
from torch import Tensor

from microseg.errors import MicrosegError
from microseg.losses.base import SegLoss, register, signed_logits
from microseg.losses.hard_region import check_kernel_size, hard_region


@register("adaptive_focal")
class AdaptiveFocal(SegLoss):
    needs_non_expert = True
    aliases = {"k": "kernel_size"}

    def __init__(
        self,
        kernel_size: int = 4,
        beta: float = 0.5,
        eps: float = 1e-6,
        focusing: str = "adaptive",
        focal_gamma: float = 2.0,
        gamma_scope: str = "sample",
        detach_gamma: bool = True,
        gamma_min: float = 0.1,
    ) -> None:
        super().__init__()
        if focusing not in ("adaptive", "fixed"):
            raise MicrosegError(f"adaptive_focal option focusing must be 'adaptive' or 'fixed', got {focusing!r}")
        if gamma_scope not in ("sample", "batch"):
            raise MicrosegError(f"adaptive_focal option gamma_scope must be 'sample' or 'batch', got {gamma_scope!r}")
        if not gamma_min > 0:
            raise MicrosegError(f"adaptive_focal option gamma_min must be > 0, got {gamma_min}")
        self.kernel_size, self.beta, self.eps = check_kernel_size(kernel_size), float(beta), float(eps)
        self.focusing, self.focal_gamma = focusing, float(focal_gamma)
        self.gamma_scope, self.detach_gamma, self.gamma_min = gamma_scope, bool(detach_gamma), float(gamma_min)

    def adaptive_gamma(self, logits: Tensor, non_expert: Tensor) -> Tensor:
        """(1 - mean(sigmoid(x))) + mean(non_expert), per sample [B,1,1,1] or per batch (scalar)."""
        dims = tuple(range(1, logits.ndim)) if self.gamma_scope == "sample" else tuple(range(logits.ndim))
        gamma = 1.0 - torch.sigmoid(logits).mean(dims, keepdim=True) + non_expert.mean(dims, keepdim=True)
        gamma = gamma.clamp_min(self.gamma_min)
        return gamma.detach() if self.detach_gamma else gamma

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        hard = hard_region(target, non_expert, self.kernel_size)
        gamma = self.adaptive_gamma(logits, non_expert)
        z = signed_logits(logits, target)
        p_t = torch.sigmoid(z).clamp(self.eps, 1.0 - self.eps)
        one_minus_p_t = torch.sigmoid(-z).clamp(self.eps, 1.0 - self.eps)
        exponent = gamma if self.focusing == "adaptive" else self.focal_gamma
        focal = -self.beta * one_minus_p_t.pow(exponent) * torch.log(p_t + self.eps)
        return (focal * (gamma * hard + (1.0 - hard) / gamma)).mean()
