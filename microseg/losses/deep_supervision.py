"""Multi-scale deep supervision (MicroSegNet): one loss per output head, against targets resized to it.

total = sum_s weights[s] * L_s(logits_s, resize(expert), resize(non_expert)), over the aux heads
(coarsest first: 28, 56, 112 for a 224 input) and then the main output. L_s is the same spec
built with that scale's dilation kernel (`REFERENCE_KERNEL_SIZES`, 1, 2, 3, 4, by default, as the
reference), given only to the terms with a kernel (a spec that sets its own kernel is refused);
the default weights make the plain sum of the reference. Kernel sizes are integers >= 1, weights
finite and >= 0 with a positive sum. Aux outputs must come coarsest first, each spatial size
strictly below the next and the last below the main output's. Per-sample statistics
(`sample_stats`, e.g. A-FL's per-patient ones) go unchanged to every scale's loss. Targets come
at the main output's size and are resized on their device, staying binary
(`microseg.core.preprocess.resize_target`: MicroSegNet's bilinear-then-truncate by default).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from microseg.core.errors import MicrosegError
from microseg.core.preprocess import REFERENCE_KERNEL_SIZES, TARGET_RESIZES, resize_target
from microseg.core.rules import KERNEL, NON_NEGATIVE, check_option
from microseg.losses.registry import LossSpec, as_loss_spec, build_loss


@dataclass(frozen=True)
class DeepSupervisedLoss:
    total: Tensor
    per_scale: Tensor
    """[n_scales] loss of each head, coarsest first (a tensor: no host synchronisation)."""
    scales: tuple[int, ...]
    """Each head's output height, coarsest first (28, 56, 112, 224)."""


def check_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Deep-supervision weights as floats: each finite and >= 0, their sum > 0; else MicrosegError."""
    checked = tuple(check_option("deep supervision", f"weights[{i}]", w, NON_NEGATIVE) for i, w in enumerate(weights))
    if not sum(checked) > 0:
        raise MicrosegError(f"deep supervision: weights {list(checked)} are all 0; at least one must be > 0")
    return checked


def check_output_sizes(outputs: Sequence[Tensor]) -> None:
    """Aux heads coarsest first: every spatial size strictly increasing up to the main output's."""
    sizes = [tuple(o.shape[2:]) for o in outputs]
    for coarse, fine in itertools.pairwise(sizes):
        if len(coarse) != len(fine) or not all(c < f for c, f in zip(coarse, fine, strict=True)):
            raise MicrosegError(
                f"deep supervision takes aux outputs coarsest first, each smaller than the next and the main "
                f"output; got sizes {sizes} (aux..., main)"
            )


class DeepSupervision(nn.Module):
    """`forward(logits, aux, expert, non_expert=None, sample_stats=None) -> DeepSupervisedLoss`, aux coarsest first.

    `spec`: a LossSpec (or its text, parsed once here), built once per scale. With no aux heads it is
    the main output's loss alone (the last kernel size and weight).
    """

    def __init__(
        self,
        spec: str | LossSpec,
        kernel_sizes: Sequence[int] = REFERENCE_KERNEL_SIZES,
        weights: Sequence[float] | None = None,
        dataset_stats: Any = None,
        target_resize: str = TARGET_RESIZES[0],
    ) -> None:
        super().__init__()
        weights = (1.0,) * len(kernel_sizes) if weights is None else weights
        if len(kernel_sizes) != len(weights) or not kernel_sizes:
            raise MicrosegError(
                f"deep supervision needs one weight per kernel size, got {len(kernel_sizes)} kernel sizes "
                f"and {len(weights)} weights"
            )
        if target_resize not in TARGET_RESIZES:
            raise MicrosegError(f"unknown target_resize {target_resize!r}; valid: {', '.join(TARGET_RESIZES)}")
        kernels = [
            check_option("deep supervision", f"kernel_sizes[{i}]", k, KERNEL) for i, k in enumerate(kernel_sizes)
        ]
        self.spec, self.target_resize, self.weights = as_loss_spec(spec), target_resize, check_weights(weights)
        losses = [build_loss(self.spec, dataset_stats=dataset_stats, scale_kernel_size=k) for k in kernels]
        self.losses = nn.ModuleList(losses)
        self.needs_non_expert = losses[0].needs_non_expert
        self.sample_stat_keys = losses[0].sample_stat_keys

    def forward(
        self,
        logits: Tensor,
        aux: Sequence[Tensor],
        expert: Tensor,
        non_expert: Tensor | None = None,
        sample_stats: Mapping[str, Tensor] | None = None,
    ) -> DeepSupervisedLoss:
        outputs = [*aux, logits]
        losses, weights = (self.losses, self.weights) if aux else (self.losses[-1:], self.weights[-1:])
        if len(outputs) != len(losses):
            raise MicrosegError(
                f"deep supervision of {self.spec.text!r} has {len(losses)} kernel sizes/weights for "
                f"{len(outputs)} outputs ({len(aux)} aux heads + main)"
            )
        check_output_sizes(outputs)
        for which, mask in (("expert", expert), ("non-expert", non_expert)):
            if mask is not None and mask.shape != logits.shape:
                raise MicrosegError(
                    f"{which} mask shape {tuple(mask.shape)} does not match main logits shape {tuple(logits.shape)}"
                )
        values = []
        for output, loss in zip(outputs, losses, strict=True):
            size = output.shape[2:]
            ne = None if non_expert is None else resize_target(non_expert, size, self.target_resize)
            values.append(loss(output, resize_target(expert, size, self.target_resize), ne, sample_stats))
        total = sum(w * v for w, v in zip(weights, values, strict=True))
        return DeepSupervisedLoss(total, torch.stack(values), tuple(int(o.shape[2]) for o in outputs))
