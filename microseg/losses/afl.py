"""A-FL, the volume- and smoothness-aware adaptive focal loss (A-FL, Eqs. 1-8), 2D and 3D.

From a patient's expert mask with P_fg / P_bg foreground / background voxel counts:
  alpha_va = P_bg / (P_fg + P_bg)                                  (Eq. 1)
  gamma_va = P_fg / (P_fg + P_bg)                                  (Eq. 2)
  gamma_mSa = mean over the mask of sqrt(gx^2 + gy^2 [+ gz^2])      (Eqs. 3-5)
  gamma_adaptive = gamma_va + gamma_mSa                            (Eq. 6)
  A-FL = -alpha_t (1 - p_t)^gamma_adaptive log(p_t), mean over pixels, then over the batch (Eq. 8).

Whose statistics (`stats`):
- "patient" (default): the paper computes the parameters "for each patient's tumor", from
  gradients "along the x, y, and z axes". A [B,1,D,H,W] volume is its own patient: its
  statistics come from its target. A [B,1,H,W] slice takes its patient's from `sample_stats`
  (`afl_fg_fraction`, `afl_gamma_msa`: [B] tensors, see `microseg.core.patient_stats`; the trainer hands
  them from the slice cache); without them the loss refuses to guess.
- "slice": every sample's own statistics from its target, whatever `sample_stats` holds (a
  slice is then its own patient, the per-slice reading).
Readings:
- Gradients are central differences inside the mask and one-sided at its borders, in voxel
  units (`torch.gradient` / `numpy.gradient` with unit spacing), over the spatial axes longer
  than 1: the paper averages "over the entire image tensor" (Eq. 5), i.e. on the voxel grid the
  network is trained on (its PICAI volumes resized to 30 x 256 x 256), not in millimetres.
- alpha_weighting="class": alpha_va weights the foreground term and 1 - alpha_va the background
  (Lin's alpha-balanced focal loss), the reading under which alpha_va "assigns higher weights to
  the minority foreground class" (Sec. 5.3). "uniform" multiplies every pixel by alpha_va, the
  literal Eq. 8.
- Ablation switches (Table 5): a term switched off is dropped; with alpha_va off, alpha_t uses
  the fixed `alpha` (0.25, in [0, 1]), and with both gammas off gamma is the fixed `gamma`
  (2, >= 0), so all three off is the Table 5 baseline row, Lin's focal loss with alpha 0.25 and
  gamma 2.
- No eps: log(p_t) = logsigmoid(z) and (1 - p_t)^gamma = exp(gamma logsigmoid(-z)) with
  z = (2y - 1) x are finite, with finite gradients, for any finite logit and gamma >= 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from microseg.core.errors import MicrosegError
from microseg.core.patient_stats import FG_FRACTION, GAMMA_MSA, PATIENT_STAT_KEYS
from microseg.core.rules import NON_NEGATIVE, UNIT_INTERVAL, Choice, Flag
from microseg.losses.base import SegLoss, register
from microseg.losses.focal import class_weights, focal_terms


def mean_gradient_magnitude(mask: Tensor) -> Tensor:
    """gamma_mSa: per sample mean of the gradient magnitude of a [B, C, *spatial] mask, shape [B,1,...]."""
    dims = tuple(range(1, mask.ndim))
    axes = [d for d in range(2, mask.ndim) if mask.shape[d] > 1]
    if not axes:
        return mask.new_zeros(mask.shape[:1] + (1,) * (mask.ndim - 1))
    squared = sum((g * g for g in torch.gradient(mask, dim=axes)), mask.new_zeros(()))
    return torch.sqrt(squared).mean(dims, keepdim=True)


@register("afl")
class AFL(SegLoss):
    supports_3d = True
    sample_stat_keys = PATIENT_STAT_KEYS
    option_rules = {
        "use_alpha_va": Flag(),
        "use_gamma_va": Flag(),
        "use_gamma_msa": Flag(),
        "alpha": UNIT_INTERVAL,
        "gamma": NON_NEGATIVE,
        "alpha_weighting": Choice(("class", "uniform")),
        "stats": Choice(("patient", "slice")),
    }

    def __init__(
        self,
        use_alpha_va: bool = True,
        use_gamma_va: bool = True,
        use_gamma_msa: bool = True,
        alpha: float = 0.25,
        gamma: float = 2.0,
        alpha_weighting: str = "class",
        stats: str = "patient",
    ) -> None:
        super().__init__()
        self.set_options(
            use_alpha_va=use_alpha_va,
            use_gamma_va=use_gamma_va,
            use_gamma_msa=use_gamma_msa,
            alpha=alpha,
            gamma=gamma,
            alpha_weighting=alpha_weighting,
            stats=stats,
        )

    def statistics(self, target: Tensor, sample_stats: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        """(foreground fraction, gamma_mSa) per sample, broadcastable [B,1,...]: given, or from the target."""
        shape = target.shape[:1] + (1,) * (target.ndim - 1)
        needed = [
            k
            for k, used in ((FG_FRACTION, self.use_alpha_va or self.use_gamma_va), (GAMMA_MSA, self.use_gamma_msa))
            if used
        ]
        given = sample_stats or {}
        if self.stats == "patient" and (target.ndim == 4 or any(k in given for k in needed)):
            missing = [k for k in needed if k not in given]
            if missing:
                raise MicrosegError(
                    f"loss 'afl' (stats=patient) needs each slice's patient statistics {missing} in sample_stats "
                    "([B] tensors, microseg.core.patient_stats; the trainer takes them from the cache), "
                    "or use afl:stats=slice"
                )
            zero = target.new_zeros(shape)
            fg_fraction, gamma_msa = (
                given[k].reshape(shape) if k in needed else zero for k in (FG_FRACTION, GAMMA_MSA)
            )
            return fg_fraction, gamma_msa
        fg_fraction = (target > 0.5).to(target.dtype).mean(tuple(range(1, target.ndim)), keepdim=True)
        gamma_msa = mean_gradient_magnitude(target) if self.use_gamma_msa else target.new_zeros(shape)
        return fg_fraction, gamma_msa

    def compute(
        self, logits: Tensor, target: Tensor, non_expert: Tensor | None, sample_stats: dict[str, Tensor] | None = None
    ) -> Tensor:
        fg_fraction, gamma_msa = self.statistics(target, sample_stats)
        alpha = 1.0 - fg_fraction if self.use_alpha_va else self.alpha
        gamma: float | Tensor = self.gamma
        if self.use_gamma_va or self.use_gamma_msa:
            gamma = (fg_fraction if self.use_gamma_va else 0.0) + (gamma_msa if self.use_gamma_msa else 0.0)
        weight = class_weights(target, alpha) if self.alpha_weighting == "class" else alpha
        return (weight * focal_terms(logits, target, gamma)).mean()
