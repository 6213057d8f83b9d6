"""Validation during training: the mean over the validation patients of per-slice DSC / HD95.

Scored at the cache's size, in the training's precision (autocast as `--amp`), with protocol
"all-slices" (`microseg.metrics.protocols`): every slice where the expert or the prediction is
non-empty counts, a one-sided slice with DSC 0 (so an untrained model that predicts nothing scores
0, not NaN). The slice TensorBoard shows (image, expert, prediction) is kept on the way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from microseg.core.runtime import autocast_context

Overlay = tuple[np.ndarray, np.ndarray, np.ndarray]
"""TensorBoard's validation slice: (image, expert, prediction)."""


@dataclass(frozen=True)
class Validation:
    """Mean DSC and HD95 (mm) over the validation patients (NaN when no slice counts), and the overlay slice."""

    dsc: float
    hd95_mm: float
    overlay: Overlay | None


@torch.inference_mode()
def score_validation(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: str | None,
    spacing: Callable[[str], tuple[float, float, float]],
    overlay_index: int,
) -> Validation:
    """`model` scored on `loader`'s slices (`spacing`: a patient's (sz, sy, sx) at the cache's size);
    the overlay is the `overlay_index`-th slice. The model is left in training mode."""
    from microseg.metrics import score_case

    model.eval()
    preds: dict[str, list[np.ndarray]] = {}
    refs: dict[str, list[np.ndarray]] = {}
    seen, overlay = 0, None
    for batch in loader:
        with autocast_context(device, amp):
            logits = model(batch["image"].to(device, non_blocking=True)).logits
        pred = (logits.float() > 0).cpu().numpy()[:, 0]
        expert = batch["expert"].numpy()[:, 0] > 0.5
        for case, p, r in zip(batch["case_id"], pred, expert, strict=True):
            preds.setdefault(case, []).append(p)
            refs.setdefault(case, []).append(r)
        if seen <= overlay_index < seen + len(pred):
            i = overlay_index - seen
            overlay = (batch["image"][i, 0].numpy(), expert[i], pred[i])
        seen += len(pred)
    scores = [score_case(np.stack(preds[c]), np.stack(refs[c]), spacing(c), "all-slices") for c in preds]
    model.train()
    dsc = [s.dsc for s in scores if s.n_slices]
    hd = [s.hd95_mm for s in scores if s.n_slices]
    return Validation(float(np.mean(dsc)) if dsc else math.nan, float(np.mean(hd)) if hd else math.nan, overlay)
