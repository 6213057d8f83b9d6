"""The loss interface shared by every loss, the name registry, and the weighted sum of losses.

Every loss is called as `loss(logits, target, non_expert=None, sample_stats=None) -> scalar
tensor` with raw single-channel foreground logits and {0, 1} targets shaped [B, 1, H, W] (or
[B, 1, D, H, W] where `supports_3d`).
The statistics a loss needs from the data, declared by the loss, handed by the trainer (which
names no loss):
- per sample (`sample_stat_keys`, among `SAMPLE_STAT_KEYS`, each a [B] tensor: the statistics of
  the patient each slice comes from, which every batch carries): given as `sample_stats`; losses
  that declare none ignore them;
- of the training set (`dataset_stats_param`, the constructor parameter that takes them): computed
  once before training by the class's `dataset_statistics` from the training slices' expert
  foreground fractions (`microseg.losses.registry.dataset_statistics`), a dataclass with a
  `summary()` line, saved with the run. Inputs are checked
on their shapes only (no host synchronisation) and half-precision logits are upcast to float32
before any arithmetic, so bf16/fp16 autocast gives finite values. Every option has a rule
(`option_rules`, see `microseg.core.rules`) checked at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from microseg.core.errors import MicrosegError
from microseg.core.patient_stats import PATIENT_STAT_KEYS
from microseg.core.rules import POSITIVE, Rule, check_option

LOSSES: dict[str, type[SegLoss]] = {}
"""Loss name -> class, filled by `@register`."""

SAMPLE_STAT_KEYS = PATIENT_STAT_KEYS
"""Per-sample statistics a batch may carry, each a [B] tensor: the statistics of the patient's expert volume
(`microseg.core.patient_stats`)."""

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
    """Base class: option and input checks, float32 upcast in `forward`; subclasses implement `compute`."""

    name: str = ""  # class attributes, which a WeightedSum sets per instance from its terms
    needs_non_expert: bool = False
    supports_3d: bool = False
    sample_stat_keys: tuple[str, ...] = ()
    """The per-sample statistics this loss reads: its `compute` then takes `sample_stats` (a dict of [B] tensors,
    or None)."""
    dataset_stats_param: ClassVar[str | None] = None
    """The constructor parameter that takes statistics of the training set (CALF's `stats`), not a spec option;
    `dataset_statistics` computes them."""
    aliases: ClassVar[dict[str, str]] = {}
    """Short spec option names -> constructor parameter names (e.g. ag_bce `w` -> `hard_weight`)."""
    option_rules: ClassVar[dict[str, Rule]] = {}
    """Every constructor option -> its valid range (`microseg.core.rules`)."""

    @classmethod
    def dataset_statistics(cls, options: Mapping[str, Any], foreground_fractions: np.ndarray) -> Any:
        """The training-set statistics for `dataset_stats_param`, from a spec term's options and the expert
        foreground fraction of every training slice."""
        raise NotImplementedError(f"loss {cls.name!r} takes no training-set statistics")

    if TYPE_CHECKING:  # the options are attributes that `set_options` sets (nn.Module types them Tensor | Module)

        def __getattr__(self, name: str) -> Any: ...

    def check_options(self, **values: Any) -> dict[str, Any]:
        """Each option checked against its rule and converted (MicrosegError naming the first bad one)."""
        label = self.name or type(self).__name__
        return {key: check_option(label, key, value, self.option_rules[key]) for key, value in values.items()}

    def set_options(self, **values: Any) -> None:
        """Check each option against its rule and store it as an attribute of the same name."""
        for key, value in self.check_options(**values).items():
            setattr(self, key, value)

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        non_expert: Tensor | None = None,
        sample_stats: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        check_inputs(self, logits, target, non_expert)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        stats = check_sample_stats(self, sample_stats, logits, dtype)
        non_expert = None if non_expert is None else non_expert.to(dtype)
        return compute(self, logits.to(dtype), target.to(dtype), non_expert, stats)

    def compute(self, logits: Tensor, target: Tensor, non_expert: Tensor | None) -> Tensor:
        raise NotImplementedError


def compute(
    loss: SegLoss, logits: Tensor, target: Tensor, non_expert: Tensor | None, sample_stats: dict[str, Tensor] | None
) -> Tensor:
    """`loss.compute(...)`, with `sample_stats` for the losses that read them."""
    if loss.sample_stat_keys:
        return loss.compute(logits, target, non_expert, sample_stats=sample_stats)  # type: ignore[call-arg]
    return loss.compute(logits, target, non_expert)


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


def check_sample_stats(
    loss: SegLoss, sample_stats: Mapping[str, Tensor] | None, logits: Tensor, dtype: torch.dtype
) -> dict[str, Tensor] | None:
    """Known keys only, each a [B] tensor on the logits' device; returned cast to `dtype` (shapes only, no sync)."""
    if sample_stats is None:
        return None
    name = loss.name or type(loss).__name__
    unknown = sorted(set(sample_stats) - set(SAMPLE_STAT_KEYS))
    if unknown:
        raise MicrosegError(f"loss '{name}': unknown sample statistics {unknown}; known: {', '.join(SAMPLE_STAT_KEYS)}")
    checked = {}
    for key, value in sample_stats.items():
        if not isinstance(value, Tensor) or value.shape != logits.shape[:1] or value.device != logits.device:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise MicrosegError(
                f"loss '{name}': sample statistic {key!r} must be a [B] = [{logits.shape[0]}] tensor on "
                f"{logits.device}, got {got}"
            )
        checked[key] = value.to(dtype)
    return checked


class WeightedSum(SegLoss):
    """sum_i w_i * L_i(logits, target, non_expert): composite specs and the compound losses (weights > 0)."""

    def __init__(self, terms: Sequence[tuple[float, SegLoss]], name: str = "") -> None:
        super().__init__()
        if name:
            self.name = name
        label = self.name or type(self).__name__
        self.weights = [check_option(label, "weight", w, POSITIVE) for w, _ in terms]
        losses = [loss for _, loss in terms]
        self.terms = nn.ModuleList(losses)
        self.needs_non_expert = any(t.needs_non_expert for t in losses)
        self.supports_3d = all(t.supports_3d for t in losses)
        self.sample_stat_keys = tuple(dict.fromkeys(k for t in losses for k in t.sample_stat_keys))

    def compute(
        self, logits: Tensor, target: Tensor, non_expert: Tensor | None, sample_stats: dict[str, Tensor] | None = None
    ) -> Tensor:
        terms = cast(list[SegLoss], list(self.terms))
        return cast(
            Tensor,
            sum(
                w * compute(t, logits, target, non_expert, sample_stats)
                for w, t in zip(self.weights, terms, strict=True)
            ),
        )
