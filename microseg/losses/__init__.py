"""Loss registry: every loss by name (`build_loss("adaptive_focal+dice")`), and the deep-supervision wrapper.

One module per loss family: focal, ag_bce, adaptive_focal, afl, calf, region (dice, iou,
tversky), classic (bce, dice_ce, dice_focal); hard_region holds the XOR-dilated hard region
shared by AG-BCE, the adaptive focal loss and the analyses; registry parses loss specs (once, into a
LossSpec: what build_loss, dataset_statistics and DeepSupervision take);
deep_supervision weights the heads. Imports only core/ (metrics/ is independent of it).
"""

from __future__ import annotations

from microseg.losses import adaptive_focal, afl, ag_bce, calf, classic, focal, region  # noqa: F401  (registers)
from microseg.losses.base import LOSSES, SAMPLE_STAT_KEYS, SegLoss, WeightedSum, register
from microseg.losses.calf import CalfStats, calf_stats
from microseg.losses.deep_supervision import DeepSupervisedLoss, DeepSupervision
from microseg.losses.hard_region import dilate, hard_region
from microseg.losses.registry import (
    LossSpec,
    as_loss_spec,
    build_loss,
    canonical_spec,
    check_spec,
    dataset_statistics,
    parse_spec,
)

__all__ = [
    "LOSSES",
    "SAMPLE_STAT_KEYS",
    "CalfStats",
    "DeepSupervisedLoss",
    "DeepSupervision",
    "LossSpec",
    "SegLoss",
    "WeightedSum",
    "as_loss_spec",
    "build_loss",
    "calf_stats",
    "canonical_spec",
    "check_spec",
    "dataset_statistics",
    "dilate",
    "hard_region",
    "parse_spec",
    "register",
]
