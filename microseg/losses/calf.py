"""CALF, the conditionally adaptive loss of seed 004 (Tables 1-2).

Before training, the skewness S and excess kurtosis K of the per-image foreground areas
A_1..A_N pick one transform (Table 1, population moments: sigma with 1/N, i.e.
`scipy.stats.skew` / `kurtosis(fisher=True)` with bias=True):
  S <= -1                 fisher    -E[y atanh(p) + (1 - y) atanh(1 - p)]
  -1 < S <= -0.5          logit     -E[y ln(p / (1 - p)) + (1 - y) ln((1 - p) / p)]
  -0.5 < S < 0            arcsine   -E[y asin(sqrt p) + (1 - y) asin(sqrt(1 - p))]
  S >= 1                  log10     -E[y log10 p + (1 - y) log10(1 - p)]
  0.5 <= S < 1            ln        -E[y ln p + (1 - y) ln(1 - p)]   (BCE)
  0 <= S < 0.5, K < 0     log10
  0 <= S < 0.5, K >= 0    bce_dice  BCE + (1 - (2 sum(y p) + eps) / (sum y + sum p + eps))
Readings: S = 0 exactly is not covered by the paper and joins the 0 < S <= 0.5 band (K
decides); S = 0.5 is claimed by two rows and goes to ln, mirroring -0.5 -> logit on the
negative side. The paper's Dice term is printed with a minus sign that would make
1 - L_Dice reward poor overlap; BCE-Dice here is the usual BCE + Dice loss (`region.Dice`,
eps = 1e-5). Areas of 0 (images without foreground) are left out by default: the moments
describe "foreground object sizes". Fisher and logit are unbounded as p -> 1 and arcsine
has an infinite slope at 0 and 1, so those three clamp p and 1 - p (each computed as
sigmoid(+-x)) to [clamp_eps, 1 - clamp_eps] = [1e-6, 1 - 1e-6]; the log branches use
log-sigmoid, exact and finite for finite logits, so they need no clamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from microseg.errors import MicrosegError
from microseg.losses.base import SegLoss, register
from microseg.losses.region import Dice

# T(p, q) with q = 1 - p; the loss is -E[y T(p, q) + (1 - y) T(q, p)].
BOUNDED_TRANSFORMS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "fisher": lambda p, q: 0.5 * (torch.log1p(p) - torch.log(q)),
    "logit": lambda p, q: torch.log(p) - torch.log(q),
    "arcsine": lambda p, q: torch.asin(torch.sqrt(p)),
}
BRANCHES = ("fisher", "logit", "arcsine", "log10", "ln", "bce_dice")


@dataclass(frozen=True)
class CalfStats:
    """Moments of the training set's foreground areas and the CALF branch they select."""

    skewness: float
    kurtosis: float
    n: int
    branch: str


def choose_branch(skewness: float, kurtosis: float) -> str:
    """The transform of seed 004's Table 2 for skewness S and excess kurtosis K."""
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


def calf_stats(areas: Any, include_empty: bool = False) -> CalfStats:
    """Skewness, excess kurtosis (population moments, Table 1) and branch of per-image foreground areas."""
    a = np.asarray(areas, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise MicrosegError("CALF: foreground areas must be finite and non-negative")
    if not include_empty:
        a = a[a > 0]
    if a.size < 2:
        raise MicrosegError(f"CALF needs the foreground areas of at least 2 images with foreground, got {a.size}")
    d = a - a.mean()
    variance = np.mean(d**2)
    if variance == 0:
        raise MicrosegError("CALF: all foreground areas are equal, so their skewness is undefined")
    skewness = float(np.mean(d**3) / variance**1.5)
    kurtosis = float(np.mean(d**4) / variance**2 - 3.0)
    return CalfStats(skewness, kurtosis, int(a.size), choose_branch(skewness, kurtosis))


@register("calf")
class CALF(SegLoss):
    supports_3d = True

    def __init__(self, stats: CalfStats | dict | None = None, clamp_eps: float = 1e-6) -> None:
        super().__init__()
        if stats is None:
            raise MicrosegError(
                "loss 'calf' needs dataset statistics (calf_stats): the train stage computes them "
                "from the slice cache's foreground_areas"
            )
        if isinstance(stats, dict):
            try:
                stats = CalfStats(**stats)
            except TypeError as err:
                raise MicrosegError(f"loss 'calf': bad statistics {stats!r}: {err}") from None
        if not isinstance(stats, CalfStats) or stats.branch not in BRANCHES:
            raise MicrosegError(f"loss 'calf': statistics must be CalfStats with a branch in {BRANCHES}, got {stats!r}")
        self.stats, self.branch, self.clamp_eps = stats, stats.branch, float(clamp_eps)
        self.dice = Dice() if self.branch == "bce_dice" else None

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        if self.branch in BOUNDED_TRANSFORMS:
            transform = BOUNDED_TRANSFORMS[self.branch]
            p = torch.sigmoid(logits).clamp(self.clamp_eps, 1.0 - self.clamp_eps)
            q = torch.sigmoid(-logits).clamp(self.clamp_eps, 1.0 - self.clamp_eps)
            return -(target * transform(p, q) + (1.0 - target) * transform(q, p)).mean()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        if self.branch == "log10":
            return bce / math.log(10.0)
        if self.branch == "ln":
            return bce
        return bce + self.dice.compute(logits, target, non_expert)
