"""CALF, the conditionally adaptive loss (CALF, Tables 1-2).

Before training, the skewness S and excess kurtosis K of the per-image foreground areas
A_1..A_N pick one transform (Table 1, population moments: sigma with 1/N, i.e.
`scipy.stats.skew` / `scipy.stats.kurtosis(fisher=True)` with bias=True):
  S <= -1                 fisher    -E[y atanh(p) + (1 - y) atanh(1 - p)]
  -1 < S <= -0.5          logit     -E[y ln(p / (1 - p)) + (1 - y) ln((1 - p) / p)]
  -0.5 < S < 0            arcsine   -E[y asin(sqrt p) + (1 - y) asin(sqrt(1 - p))]
  S >= 1                  log10     -E[y log10 p + (1 - y) log10(1 - p)]
  0.5 <= S < 1            ln        -E[y ln p + (1 - y) ln(1 - p)]   (BCE)
  0 <= S < 0.5, K < 0     log10
  0 <= S < 0.5, K >= 0    bce_dice  BCE + (1 - (2 sum(y p) + eps) / (sum y + sum p + eps))
Readings:
- S = 0 exactly is not covered by the paper and joins the 0 < S <= 0.5 band (K decides); S = 0.5
  is claimed by two rows and goes to ln, mirroring -0.5 -> logit on the negative side.
- The paper's Dice term is printed with a minus sign that would make 1 - L_Dice reward poor
  overlap; BCE-Dice here is the usual BCE + Dice loss (`region.Dice`, eps = 1e-5).
- Images without foreground (`include_empty`, default true): Table 1 takes the moments over
  A_1..A_N, the areas of the dataset's N images x_1..x_N (Sec. 2), and the paper's datasets hold
  images without tumour (its loader sets the tumour-to-non-tumour ratio, 0.409 by default), so
  such an image counts with A_i = 0. `include_empty=false` keeps only images with foreground,
  reading Sec. 2.1's "distribution of foreground object sizes" literally. The choice can change
  the branch and is recorded in `CalfStats.include_empty` (the run's calf_stats.json).
- Bounded branches, per pixel with the transform R(z) of sigmoid(z), z = x for y and z = -x
  for 1 - y (each side computed from its own logit, no 1 - p cancellation):
  fisher R = atanh(sigmoid z) = (log1p(sigmoid z) - logsigmoid(-z)) / 2 and logit R = z are
  finite for every finite z, but unbounded above: the reward of a confidently right pixel could
  grow without end. Only that side is clamped, z <= logit(1 - clamp_eps) (p <= 1 - 1e-6 by
  default), so a confidently wrong pixel keeps its exact gradient (logit: -1/N for every pixel
  below that bound, however wrong). arcsine R = asin(sqrt(sigmoid z)) = atan(exp(z / 2)) is
  bounded, with a finite slope sqrt(p (1 - p)) / 2 in z; computed as atan(u) or pi/2 - atan(u),
  u = exp(-|z| / 2) in (0, 1], it keeps float32 precision near p = 1 and needs no clamp.
- The log branches use log-sigmoid (BCE with logits), exact and finite for finite logits.
Valid ranges: clamp_eps in (0, 0.01] (at least 1e-30); include_empty true or false, and equal to the one the
statistics were computed with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from microseg.core.errors import MicrosegError
from microseg.core.rules import GUARD, Flag, check_option
from microseg.losses.base import SegLoss, register
from microseg.losses.region import Dice


def _fisher(z: Tensor) -> Tensor:
    return 0.5 * (torch.log1p(torch.sigmoid(z)) - F.logsigmoid(-z))


def _arcsine(z: Tensor) -> Tensor:
    u = torch.exp(-0.5 * z.abs())
    return torch.where(z > 0, 0.5 * math.pi - torch.atan(u), torch.atan(u))


# R(z), the transform of p = sigmoid(z); the loss is -E[y R(x) + (1 - y) R(-x)].
BOUNDED_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "fisher": _fisher,
    "logit": lambda z: z,
    "arcsine": _arcsine,
}
UNBOUNDED_ABOVE = ("fisher", "logit")
BRANCHES = ("fisher", "logit", "arcsine", "log10", "ln", "bce_dice")


def choose_branch(skewness: float, kurtosis: float) -> str:
    """The transform of CALF's Table 2 for skewness S and excess kurtosis K."""
    if skewness <= -1.0:
        return "fisher"
    if skewness <= -0.5:
        return "logit"
    if skewness < 0.0:
        return "arcsine"
    if skewness >= 1.0:
        return "log10"
    if skewness >= 0.5:
        return "ln"
    return "log10" if kurtosis < 0.0 else "bce_dice"


@dataclass(frozen=True)
class CalfStats:
    """Moments of the training set's foreground areas, how many images they count, whether images without
    foreground were among them, and the CALF branch they select (checked: it must be the one S and K select)."""

    skewness: float
    kurtosis: float
    n: int
    branch: str
    include_empty: bool

    def __post_init__(self) -> None:
        numbers = all(
            isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in (self.skewness, self.kurtosis)
        )
        if not numbers or not (isinstance(self.n, Integral) and not isinstance(self.n, bool) and self.n >= 2):
            raise MicrosegError(f"CALF statistics need finite skewness and kurtosis and n >= 2, got {self}")
        if not isinstance(self.include_empty, bool):
            raise MicrosegError(f"CALF statistics: include_empty must be true or false, got {self.include_empty!r}")
        expected = choose_branch(self.skewness, self.kurtosis)
        if self.branch != expected:
            raise MicrosegError(
                f"CALF statistics: branch {self.branch!r} contradicts skewness {self.skewness:g} and kurtosis "
                f"{self.kurtosis:g}, which select {expected!r}"
            )

    def summary(self) -> str:
        return f"calf: skewness {self.skewness:.3f}, excess kurtosis {self.kurtosis:.3f} -> branch {self.branch}"


def calf_stats(areas: Any, include_empty: bool = True) -> CalfStats:
    """Skewness, excess kurtosis (population moments, Table 1) and branch of per-image foreground areas."""
    a = np.asarray(areas, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise MicrosegError("CALF: foreground areas must be finite and non-negative")
    if not include_empty:
        a = a[a > 0]
    if a.size < 2:
        which = "images" if include_empty else "images with foreground"
        raise MicrosegError(f"CALF needs the foreground areas of at least 2 {which}, got {a.size}")
    if np.ptp(a) == 0:
        raise MicrosegError("CALF: all foreground areas are equal, so their skewness is undefined")
    import scipy.stats  # here, not at the top: half a second of every process's start that trains no CALF

    skewness = float(scipy.stats.skew(a, bias=True))
    kurtosis = float(scipy.stats.kurtosis(a, fisher=True, bias=True))
    return CalfStats(skewness, kurtosis, int(a.size), choose_branch(skewness, kurtosis), include_empty)


def as_calf_stats(stats: CalfStats | dict | None) -> CalfStats:
    """A CalfStats, or one from its dict (asdict, calf_stats.json); MicrosegError when missing or malformed."""
    if stats is None:
        raise MicrosegError(
            "loss 'calf' needs dataset statistics (dataset_stats): the train stage computes them "
            "from the slice cache's foreground_areas"
        )
    if isinstance(stats, dict):
        names = [f.name for f in fields(CalfStats)]
        if sorted(stats) != sorted(names):
            raise MicrosegError(f"loss 'calf': statistics need the keys {', '.join(names)}, got {stats!r}")
        stats = CalfStats(**stats)
    if not isinstance(stats, CalfStats):
        raise MicrosegError(f"loss 'calf': statistics must be CalfStats (or its dict), got {stats!r}")
    return stats


@register("calf")
class CALF(SegLoss):
    supports_3d = True
    dataset_stats_param = "stats"
    option_rules = {"include_empty": Flag(), "clamp_eps": GUARD}

    @classmethod
    def dataset_statistics(cls, options: Mapping[str, Any], foreground_fractions: np.ndarray) -> CalfStats:
        """The moments of the training slices' foreground areas, with the term's `include_empty` choice."""
        include_empty = check_option(cls.name, "include_empty", options.get("include_empty", True), Flag())
        return calf_stats(foreground_fractions, include_empty)

    def __init__(
        self, stats: CalfStats | dict | None = None, include_empty: bool = True, clamp_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.set_options(include_empty=include_empty, clamp_eps=clamp_eps)
        self.stats = as_calf_stats(stats)
        if self.stats.include_empty != self.include_empty:
            raise MicrosegError(
                f"calf: option include_empty={self.include_empty} but the statistics were computed with "
                f"include_empty={self.stats.include_empty}"
            )
        self.branch = self.stats.branch
        self.max_logit = math.log1p(-self.clamp_eps) - math.log(self.clamp_eps)  # logit(1 - clamp_eps)
        self.dice = Dice() if self.branch == "bce_dice" else None

    def reward(self, z: Tensor) -> Tensor:
        """R(z) of a bounded branch, z clamped above at logit(1 - clamp_eps) where R is unbounded there."""
        if self.branch in UNBOUNDED_ABOVE:
            z = z.clamp(max=self.max_logit)
        return BOUNDED_TRANSFORMS[self.branch](z)

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        if self.branch in BOUNDED_TRANSFORMS:
            return -(target * self.reward(logits) + (1.0 - target) * self.reward(-logits)).mean()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        if self.branch == "log10":
            return bce / math.log(10.0)
        if self.branch == "ln":
            return bce
        assert self.dice is not None  # the bce_dice branch has its Dice term
        return bce + self.dice.compute(logits, target, non_expert)
