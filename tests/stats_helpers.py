"""What the statistics tests share: statsmodels' Holm adjustment, the independent reference."""

from __future__ import annotations

import gc
from unittest import mock

import numpy as np
from statsmodels.stats.multitest import multipletests


def statsmodels_holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of one family by statsmodels' `multipletests`, without the full
    garbage collection it runs after each Holm call (half a second in a test process full of torch
    objects; it changes no number)."""
    with mock.patch.object(gc, "collect"):
        return multipletests(p_values, method="holm")[1]
