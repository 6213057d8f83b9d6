"""A-FL, the volume- and smoothness-aware adaptive focal loss of seed 000 (Eqs. 1-8), 2D and 3D.

Per sample (per patient for volumes), from its target mask with P_fg / P_bg foreground /
background pixel counts:
  alpha_va = P_bg / (P_fg + P_bg)                                  (Eq. 1)
  gamma_va = P_fg / (P_fg + P_bg)                                  (Eq. 2)
  gamma_mSa = mean over the mask of sqrt(gx^2 + gy^2 [+ gz^2])      (Eqs. 3-5)
  gamma_adaptive = gamma_va + gamma_mSa                            (Eq. 6)
  A-FL = -alpha_t (1 - p_t)^gamma_adaptive log(p_t), mean over pixels, then over the batch (Eq. 8).

Readings:
- Gradients are central differences inside the mask and one-sided at its borders, unit spacing
  (`torch.gradient`, i.e. `numpy.gradient`), over the spatial axes (H, W [, D]) of longer than 1.
- alpha_weighting="class": alpha_va weights the foreground term and 1 - alpha_va the background
  (Lin's alpha-balanced focal loss), the reading under which alpha_va "assigns higher weights to
  the minority foreground class" (Sec. 5.3). "uniform" multiplies every pixel by alpha_va, the
  literal Eq. 8.
- Ablation switches (Table 5): a term switched off is dropped; with alpha_va off, alpha_t uses
  the fixed `alpha` (0.25), and with both gammas off gamma is the fixed `gamma` (2), so all
  three off is the Table 5 baseline row, Lin's focal loss with alpha 0.25 and gamma 2.
- No eps: log(p_t) = logsigmoid(z) and (1 - p_t)^gamma = exp(gamma logsigmoid(-z)) with
  z = (2y - 1) x are finite, with finite gradients, for any finite logit and gamma >= 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from microseg.errors import MicrosegError
from microseg.losses.base import SegLoss, register
from microseg.losses.focal import class_weights, focal_terms


def mean_gradient_magnitude(mask: Tensor) -> Tensor:
    """gamma_mSa: per sample mean of the gradient magnitude of a [B, C, *spatial] mask, shape [B,1,...]."""
    dims = tuple(range(1, mask.ndim))
    axes = [d for d in range(2, mask.ndim) if mask.shape[d] > 1]
    if not axes:
        return mask.new_zeros(mask.shape[:1] + (1,) * (mask.ndim - 1))
    squared = sum(g * g for g in torch.gradient(mask, dim=axes))
    return torch.sqrt(squared).mean(dims, keepdim=True)


@register("afl")
class AFL(SegLoss):
    supports_3d = True

    def __init__(
        self,
        use_alpha_va: bool = True,
        use_gamma_va: bool = True,
        use_gamma_msa: bool = True,
        alpha: float = 0.25,
        gamma: float = 2.0,
        alpha_weighting: str = "class",
    ) -> None:
        super().__init__()
        if alpha_weighting not in ("class", "uniform"):
            raise MicrosegError(f"afl option alpha_weighting must be 'class' or 'uniform', got {alpha_weighting!r}")
        self.use_alpha_va, self.use_gamma_va = bool(use_alpha_va), bool(use_gamma_va)
        self.use_gamma_msa = bool(use_gamma_msa)
        self.alpha, self.gamma, self.alpha_weighting = float(alpha), float(gamma), alpha_weighting

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        fg_fraction = (target > 0.5).to(logits.dtype).mean(tuple(range(1, target.ndim)), keepdim=True)
        alpha = 1.0 - fg_fraction if self.use_alpha_va else self.alpha
        gamma: float | Tensor = self.gamma
        if self.use_gamma_va or self.use_gamma_msa:
            gamma = (fg_fraction if self.use_gamma_va else 0.0) + (
                mean_gradient_magnitude(target) if self.use_gamma_msa else 0.0
            )
        weight = class_weights(target, alpha) if self.alpha_weighting == "class" else alpha
        return (weight * focal_terms(logits, target, gamma)).mean()
