"""Multi-scale deep supervision (MicroSegNet): one loss per output head, against targets resized to it.

total = sum_s weights[s] * L_s(logits_s, resize(expert), resize(non_expert)), over the aux heads
(coarsest first: 28, 56, 112 for a 224 input) and then the main output. L_s is the same spec
built with that scale's dilation kernel (1, 2, 3, 4 by default, as the reference); the default
weights make the plain sum of the reference. Targets come at the main output's size and are
resized on their device, staying binary:
- "bilinear_floor" (default): MicroSegNet's dataset code, `cv2.resize` (bilinear, half-pixel
  centres) and then `.long()`, which truncates: a pixel stays foreground only where every input
  pixel under the bilinear support is foreground (1e-6 tolerance for float rounding).
- "nearest": the input pixel under each output pixel's centre (`nearest-exact`).
- "area": the mean over each output pixel's footprint, thresholded at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from microseg.errors import MicrosegError
from microseg.losses.registry import build_loss

TARGET_RESIZES = ("bilinear_floor", "nearest", "area")


@dataclass(frozen=True)
class DeepSupervisedLoss:
    total: Tensor
    per_scale: Tensor
    """[n_scales] loss of each head, coarsest first (a tensor: no host synchronisation)."""
    scales: tuple[int, ...]
    """Each head's output height, coarsest first (28, 56, 112, 224)."""


def resize_mask(mask: Tensor, size: Sequence[int], mode: str = "bilinear_floor") -> Tensor:
    """A {0,1} [B, C, *spatial] mask resized to `size` (spatial), still {0,1}; unchanged if already that size."""
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    mask = mask.to(torch.promote_types(mask.dtype, torch.float32))
    if mode == "nearest":
        return F.interpolate(mask, size=tuple(size), mode="nearest-exact")
    if mode == "area":
        return (F.interpolate(mask, size=tuple(size), mode="area") >= 0.5).to(mask.dtype)
    linear = "bilinear" if mask.ndim == 4 else "trilinear"
    resized = F.interpolate(mask, size=tuple(size), mode=linear, align_corners=False)
    return (resized >= 1.0 - 1e-6).to(mask.dtype)


class DeepSupervision(nn.Module):
    """`forward(logits, aux, expert, non_expert=None) -> DeepSupervisedLoss`, aux coarsest first.

    With no aux heads it is the main output's loss alone (the last kernel size and weight).
    """

    def __init__(
        self,
        spec: str,
        kernel_sizes: Sequence[int] = (1, 2, 3, 4),
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        calf_stats: Any = None,
        target_resize: str = "bilinear_floor",
    ) -> None:
        super().__init__()
        if len(kernel_sizes) != len(weights) or not kernel_sizes:
            raise MicrosegError(
                f"deep supervision needs one weight per kernel size, got {len(kernel_sizes)} kernel sizes "
                f"and {len(weights)} weights"
            )
        if target_resize not in TARGET_RESIZES:
            raise MicrosegError(f"unknown target_resize {target_resize!r}; valid: {', '.join(TARGET_RESIZES)}")
        self.spec, self.target_resize = spec, target_resize
        self.weights = tuple(float(w) for w in weights)
        self.losses = nn.ModuleList(build_loss(spec, calf_stats=calf_stats, kernel_size=k) for k in kernel_sizes)
        self.needs_non_expert = self.losses[0].needs_non_expert

    def forward(
        self, logits: Tensor, aux: Sequence[Tensor], expert: Tensor, non_expert: Tensor | None = None
    ) -> DeepSupervisedLoss:
        outputs = [*aux, logits]
        losses, weights = (self.losses, self.weights) if aux else (self.losses[-1:], self.weights[-1:])
        if len(outputs) != len(losses):
            raise MicrosegError(
                f"deep supervision of {self.spec!r} has {len(losses)} kernel sizes/weights for "
                f"{len(outputs)} outputs ({len(aux)} aux heads + main)"
            )
        for which, mask in (("expert", expert), ("non-expert", non_expert)):
            if mask is not None and mask.shape != logits.shape:
                raise MicrosegError(
                    f"{which} mask shape {tuple(mask.shape)} does not match main logits shape {tuple(logits.shape)}"
                )
        values = []
        for output, loss in zip(outputs, losses):
            size = output.shape[2:]
            ne = None if non_expert is None else resize_mask(non_expert, size, self.target_resize)
            values.append(loss(output, resize_mask(expert, size, self.target_resize), ne))
        total = sum(w * v for w, v in zip(weights, values))
        return DeepSupervisedLoss(total, torch.stack(values), tuple(int(o.shape[2]) for o in outputs))
