"""The loss interface shared by every loss, the name registry, and the weighted sum of losses.

Every loss is called as `loss(logits, target, non_expert=None) -> scalar tensor` with raw
single-channel foreground logits and {0, 1} targets shaped [B, 1, H, W] (or [B, 1, D, H, W]
where `supports_3d`). Inputs are checked on their shapes only (no host synchronisation) and
half-precision logits are upcast to float32 before any arithmetic, so bf16/fp16 autocast
gives finite values.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Sequence, TypeVar

import torch
from torch import Tensor, nn

from microseg.errors import MicrosegError

LOSSES: dict[str, type["SegLoss"]] = {}
"""Loss name -> class, filled by `@register`."""

_L = TypeVar("_L", bound=type["SegLoss"])


def register(name: str) -> Callable[[_L], _L]:
    """Class decorator: make a loss buildable by `name` (see `microseg.losses.build_loss`)."""

    def add(cls: _L) -> _L:
        cls.name = name
        LOSSES[name] = cls
        return cls

    return add


def signed_logits(logits: Tensor, target: Tensor) -> Tensor:
    """z = (2y - 1) x for binary y: then p_t = sigmoid(z), 1 - p_t = sigmoid(-z), log p_t = logsigmoid(z).

    The standard cancellation-free form of the focal-loss family (no `1 - p` near p = 1).
    """
    return logits * (2.0 * target - 1.0)


class SegLoss(nn.Module):
    """Base class: input checks and float32 upcast in `forward`; subclasses implement `compute`."""

    name: ClassVar[str] = ""
    needs_non_expert: ClassVar[bool] = False
    supports_3d: ClassVar[bool] = False
    aliases: ClassVar[dict[str, str]] = {}
    """Short spec option names -> constructor parameter names (e.g. ag_bce `w` -> `hard_weight`)."""

    def forward(self, logits: Tensor, target: Tensor, non_expert: Tensor | None = None) -> Tensor:
        check_inputs(self, logits, target, non_expert)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        non_expert = None if non_expert is None else non_expert.to(dtype)
        return self.compute(logits.to(dtype), target.to(dtype), non_expert)

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        raise NotImplementedError


def check_inputs(loss: SegLoss, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> None:
    """Raise MicrosegError for shapes this loss cannot take, or a missing non-expert mask."""
    name = loss.name or type(loss).__name__
    dims = (4, 5) if loss.supports_3d else (4,)
    layout = "[B,1,H,W] or [B,1,D,H,W]" if loss.supports_3d else "[B,1,H,W]"
    if logits.ndim not in dims or logits.shape[1] != 1:
        raise MicrosegError(f"loss '{name}' takes {layout} single-channel logits, got shape {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise MicrosegError(
            f"loss '{name}': target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    if non_expert is None:
        if loss.needs_non_expert:
            raise MicrosegError(f"loss '{name}' needs the non-expert mask (non_expert=...), got none")
    elif non_expert.shape != logits.shape:
        raise MicrosegError(
            f"loss '{name}': non-expert shape {tuple(non_expert.shape)} does not match logits shape "
            f"{tuple(logits.shape)}"
        )


class WeightedSum(SegLoss):
    """sum_i w_i * L_i(logits, target, non_expert): composite specs and the compound losses."""

    def __init__(self, terms: Sequence[tuple[float, SegLoss]], name: str = "") -> None:
        super().__init__()
        self.weights = [float(w) for w, _ in terms]
        self.terms = nn.ModuleList(loss for _, loss in terms)
        if name:
            self.name = name
        self.needs_non_expert = any(t.needs_non_expert for t in self.terms)
        self.supports_3d = all(t.supports_3d for t in self.terms)

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        return sum(w * t.compute(logits, target, non_expert) for w, t in zip(self.weights, self.terms))
