"""One optimisation step: the network and its deep-supervised loss as one module (what DDP wraps and
`--compile` compiles), the step itself, the losses it returns, kept on the device, and the seed of
its dropout stream."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microseg.core.runtime import Distributed, autocast_context
from microseg.runs.config import TrainConfig


@dataclass(frozen=True)
class StepLosses:
    """One optimisation step: each head's loss (coarsest first), their weighted total, the main
    output's BCE (the common ruler), and the learning rate the step used. The losses are device
    tensors (reading them would synchronise); floats are accepted too."""

    per_scale: torch.Tensor | tuple[float, ...]
    total: torch.Tensor | float
    bce: torch.Tensor | float
    lr: float = math.nan

    def as_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[per-scale..., total, bce] in float64 on `device`: the layout of the epoch's running sums."""
        if isinstance(self.total, torch.Tensor):
            parts = [
                torch.as_tensor(self.per_scale).reshape(-1),
                self.total.reshape(1),
                torch.as_tensor(self.bce).reshape(1),
            ]
            return torch.cat([p.to(device, torch.float64) for p in parts])
        return torch.tensor([*self.per_scale, self.total, self.bce], dtype=torch.float64, device=device)


class ModelWithLoss(nn.Module):
    """The network and its deep-supervised loss as one module: `forward(image, expert, non_expert,
    sample_stats) -> (total, per_scale, bce)`, bce the main output's binary cross-entropy (the
    common ruler, no gradient). What DDP wraps and `--compile` compiles, as one graph."""

    def __init__(self, net: nn.Module, criterion: nn.Module):
        super().__init__()
        self.net, self.criterion = net, criterion

    def forward(
        self,
        image: torch.Tensor,
        expert: torch.Tensor,
        non_expert: torch.Tensor,
        sample_stats: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(image)
        result = self.criterion(out.logits, out.aux, expert, non_expert, sample_stats=sample_stats)
        bce = F.binary_cross_entropy_with_logits(out.logits.detach().float(), expert)
        return result.total, result.per_scale, bce


StepFunction = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""A training step's forward: (image, expert, non_expert, sample_stats) -> (total, per_scale, bce)."""


def step_function(model: nn.Module, criterion: nn.Module, env: Distributed, config: TrainConfig) -> StepFunction:
    """The model and its loss as the processes' step: BatchNorm synchronised with `--sync-bn` (in place:
    the same module and parameters) and DistributedDataParallel over several processes, compiled with
    `--compile`."""
    if env.world > 1 and config.sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step: nn.Module = ModelWithLoss(model, criterion)
    if env.world > 1:
        ids = [env.device.index] if env.device.type == "cuda" else None
        step = nn.parallel.DistributedDataParallel(step, device_ids=ids)
    return compile_step(step) if config.compile else step


def compile_step(step: nn.Module) -> StepFunction:
    """torch.compile of the model and its loss together, the batch dimension dynamic, so that an
    epoch's smaller last batch runs the same graph (torch specialises sizes 0 and 1: a last batch
    of one slice per process compiles once more)."""
    compiled = torch.compile(step)

    def run(
        image: torch.Tensor,
        expert: torch.Tensor,
        non_expert: torch.Tensor,
        sample_stats: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for tensor in (image, expert, non_expert, *(sample_stats or {}).values()):
            torch._dynamo.mark_dynamic(tensor, 0)
        return compiled(image, expert, non_expert, sample_stats)

    return run


def train_step(
    step: StepFunction,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict[str, Any],
    device: torch.device,
    config: TrainConfig,
    stat_keys: Sequence[str] = (),
    weight: float = 1.0,
) -> StepLosses:
    """One optimisation step on `batch` (`step`: a `ModelWithLoss`, maybe wrapped or compiled, given the
    batch's `stat_keys` statistics its loss reads; backward of the total times `weight`, the
    process's share of the batch; optimizer step); the losses it returns stay on the device."""
    image = batch["image"].to(device, non_blocking=True)
    expert = batch["expert"].to(device, non_blocking=True)
    non_expert = batch["non_expert"].to(device, non_blocking=True)
    stats = {key: batch[key].to(device, non_blocking=True) for key in stat_keys}
    if config.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    lr = optimizer.param_groups[0]["lr"]
    with autocast_context(device, config.amp):
        total, per_scale, bce = step(image, expert, non_expert, stats or None)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total if weight == 1.0 else total * weight).backward()
    scaler.step(optimizer)
    scaler.update()
    return StepLosses(per_scale.detach().float(), total.detach().float(), bce, lr)


def seed_step(seed: int, rank: int, epoch: int, step: int, device: torch.device) -> None:
    """Dropout's random stream for process `rank` at (epoch, step), seeded by (seed, rank, epoch, step):
    each process draws its own masks, and a resumed run the same masks as an uninterrupted one,
    with no generator state to save (CPU and this process's GPU)."""
    state = int(np.random.SeedSequence([seed, rank, epoch, step]).generate_state(1)[0])
    torch.random.default_generator.manual_seed(state)
    if device.type == "cuda":
        torch.cuda.manual_seed(state)
