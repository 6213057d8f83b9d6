"""Statistics of one patient's expert mask volume, computed once by ``prepare`` and handed with each slice.

A-FL (Islam et al., Enhancing Semantic Segmentation with Adaptive Focal Loss, Eqs. 1-5) weights
its focal term by the patient's foreground fraction P_fg / (P_fg + P_bg) and by gamma_mSa, the
mean gradient magnitude of the patient's mask volume. They are statistics of the data, not of a
loss: the slice cache stores them per patient (``PATIENT_STAT_KEYS``), the dataset hands them with
every slice of that patient, and the analyses stratify patients by them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from microseg.core.errors import MicrosegError

FG_FRACTION, GAMMA_MSA = "afl_fg_fraction", "afl_gamma_msa"
PATIENT_STAT_KEYS = (FG_FRACTION, GAMMA_MSA)
"""The per-patient statistics, by the names the cache and a batch carry them under."""
_CHUNK_SLICES = 32  # slices per chunk of `patient_statistics`: its float64 temporaries stay small


def patient_statistics(expert_volume_zyx: Any, spacing_zyx: Sequence[float] | None = None) -> tuple[float, float]:
    """(P_fg / (P_fg + P_bg), gamma_mSa) of one patient's expert volume [Z, Y, X] (non-zero = foreground).

    gamma_mSa is the mean over all voxels of |numpy.gradient| (central differences, one-sided at
    the borders) over the axes longer than 1. `spacing_zyx=None` is the paper's voxel units (unit
    spacing, on the grid the network trains on: pass the stack of training-size slices); a
    (dz, dy, dx) spacing gives gradients per unit of that spacing instead (not A-FL's reading).
    """
    volume = np.asarray(expert_volume_zyx)
    if volume.ndim != 3 or volume.size == 0 or not np.all(np.isfinite(volume)):
        raise MicrosegError(f"A-FL patient statistics need a finite [Z, Y, X] volume, got shape {volume.shape}")
    spacing = np.ones(3) if spacing_zyx is None else np.asarray(spacing_zyx, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise MicrosegError(f"A-FL patient statistics: spacing_zyx must be 3 positive numbers, got {spacing_zyx!r}")
    axes = [a for a in range(3) if volume.shape[a] > 1]
    total, step = 0.0, _CHUNK_SLICES
    for start in range(0, len(volume), step):  # z chunks with a one-slice halo: the same central differences
        lo, hi = max(0, start - 1), min(len(volume), start + step + 1)
        mask = (volume[lo:hi] != 0).astype(np.float64)
        squared = np.zeros_like(mask)
        for axis in axes:
            squared += np.gradient(mask, spacing[axis], axis=axis) ** 2
        total += float(np.sqrt(squared[start - lo : start - lo + step]).sum())
    return float(np.count_nonzero(volume)) / volume.size, total / volume.size
