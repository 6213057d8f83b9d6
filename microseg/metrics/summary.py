"""A per-patient metric summarised over patients: mean, std, median and count of its defined values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, population std (ddof=0, numpy's default), median and count n of the non-NaN values.

    All NaN or no values: mean, std and median are NaN, n = 0.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "n": int(v.size)}
