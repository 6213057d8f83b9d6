"""Live training curves in TensorBoard (`train --tensorboard [DIR]`, the optional `tensorboard` extra).

Written by rank 0 (torch's `SummaryWriter`): each epoch's history row as scalars `epoch/<column>`
at step = the epoch number (the same values as `history.csv`), the mean loss of the steps since
the last check as `train/loss` (and `train/lr`) at the global step of each check (the checks read
the loss back anyway: no extra host synchronisation), and `val/overlay`: the validation slice with
the largest expert area, grey, with the expert contour in green and the prediction's in red.
Watch a run with `tensorboard --logdir runs/NAME/tensorboard`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from microseg.core.errors import OptionError

EXTRA = "pip install -e '.[tensorboard]'"
EXPERT_RGB = (0, 255, 0)
PREDICTION_RGB = (255, 0, 0)


def contour(mask: np.ndarray) -> np.ndarray:
    """The mask's inner boundary: its pixels with a 4-neighbour outside it (mask AND NOT eroded mask)."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay(image: np.ndarray, expert: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: the image in [0, 1] as grey, the expert contour and then the prediction's drawn over it."""
    grey = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[contour(expert)] = EXPERT_RGB
    rgb[contour(prediction)] = PREDICTION_RGB
    return rgb


class TrainingBoard:
    """One run's TensorBoard writer; `purge_step` (a resumed run's position) hides what a crashed run
    logged after its last checkpoint."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it; say which extra provides it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise OptionError(f"`tensorboard` needs the tensorboard package: {EXTRA}") from None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def running(self, loss: float, lr: float, step: int) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        if math.isfinite(lr):
            self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, row: dict[str, Any], slice_overlay: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        """The history row's numbers at step = its epoch, and the validation overlay when there is one."""
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        if slice_overlay is not None:
            self.writer.add_image("val/overlay", overlay(*slice_overlay), epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
