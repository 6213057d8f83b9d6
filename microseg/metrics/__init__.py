"""Segmentation metrics: DSC and HD95 of two masks (`scores`), the per-case evaluation protocols
(`protocols`) and the summary over patients (`summary`). Imports only `microseg.core`.

Every public name is importable from here (`from microseg.metrics import dice, hd95, score_case`).
"""

from microseg.metrics.protocols import (
    ONE_SIDED_HD95,
    PROTOCOLS,
    CaseScore,
    CaseScorer,
    SliceScore,
    check_protocol,
    score_case,
)
from microseg.metrics.scores import QUERY_NS, TRANSFORM_PIXEL_NS, TREE_POINT_NS, dice, hd95
from microseg.metrics.summary import summarize

__all__ = [
    "ONE_SIDED_HD95",
    "PROTOCOLS",
    "QUERY_NS",
    "TRANSFORM_PIXEL_NS",
    "TREE_POINT_NS",
    "CaseScore",
    "CaseScorer",
    "SliceScore",
    "check_protocol",
    "dice",
    "hd95",
    "score_case",
    "summarize",
]
