"""A training run's checkpoints, beyond each epoch's `last.pt` / `best.pt` (`Trainer.save`): written on
Ctrl-C, restored by `train --resume`.

On Ctrl-C rank 0 keeps its position inside the epoch in `last.pt`, with no collective (the other
processes may have stopped anywhere), unless its losses since the last check hold a non-finite one
(then `last.pt` stays as it was).

A run continues from its `last.pt` on any number of processes. The checkpoint must have been
trained at the cache's slice size and hold the optimizer's, the grad scaler's and the epoch's
loss sums (a weights-only or damaged one is refused). Its weights, optimizer, scaler and
schedule are loaded; a first-release checkpoint holds no scheduler state and no last learning
rate: both come from the poly schedule's closed form at its iteration, lr_i = lr (1 - i /
max_iter)^power.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.lr_scheduler import PolynomialLR

from microseg.core.errors import MicrosegError
from microseg.runs.checkpoint import Checkpoint, save_checkpoint
from microseg.runs.config import TrainConfig
from microseg.training.monitor import LossMonitor

if TYPE_CHECKING:
    from microseg.data.cache import CacheInfo


def save_interrupted(
    checkpoint: Callable[[], Checkpoint], monitor: LossMonitor, last: Path, epoch: int, step: int
) -> None:
    """Ctrl-C at (0-based) `epoch`, `step`: `checkpoint()` written to `last`, unless the losses since the
    last check hold a non-finite one."""
    found = monitor.read() if monitor.count else None
    if found is not None and found.first_bad_step is not None:
        print(
            f"interrupted: loss became {found.bad_value} at epoch {epoch + 1}, step "
            f"{found.first_bad_step}; {last} not updated"
        )
        return
    save_checkpoint(checkpoint(), last)
    print(f"interrupted at epoch {epoch + 1}, step {step}: saved {last}; continue with --resume", flush=True)


def check_cache_size(loaded: Checkpoint, cache: CacheInfo, config: TrainConfig) -> None:
    """Refuse a cache of another slice size than the one the checkpoint's run was trained at."""
    if loaded.preprocess.size != cache.size:
        size = loaded.preprocess.size
        raise MicrosegError(
            f"cache {config.cache} holds {cache.size} px slices but run {config.run} was "
            f"trained at {size} px; prepare a cache with --size {size}"
        )


def restore_optimisation(
    loaded: Checkpoint,
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: PolynomialLR,
    steps_per_epoch: int,
) -> float:
    """Load the checkpoint read from `path` into the model, optimizer, scaler and schedule; returns the
    learning rate of its last step (NaN before the first), which its epoch's history row needs."""
    if loaded.optimizer is None or loaded.scaler is None or loaded.accum is None:  # as `resumed_config`
        raise MicrosegError(f"cannot resume from {path}: a weights-only or damaged checkpoint")
    model.load_state_dict(loaded.model)
    optimizer.load_state_dict(loaded.optimizer)
    scaler.load_state_dict(loaded.scaler)
    iteration = loaded.epoch * steps_per_epoch + loaded.step
    if loaded.scheduler is not None:
        scheduler.load_state_dict(loaded.scheduler)
    else:  # a first-release checkpoint: the closed form at its iteration
        scheduler.last_epoch = iteration
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(scheduler, iteration, group["initial_lr"])
    if loaded.last_lr is not None:
        return loaded.last_lr
    return poly_lr(scheduler, iteration - 1, optimizer.param_groups[0]["initial_lr"])


def poly_lr(scheduler: PolynomialLR, iteration: int, initial: float) -> float:
    """The poly schedule's closed form at 0-based `iteration`: initial (1 - i / max_iter)^power (NaN before
    the first step)."""
    if iteration < 0:
        return math.nan
    return initial * (1 - iteration / scheduler.total_iters) ** scheduler.power


def restore_sums(loaded: Checkpoint, monitor: LossMonitor, main: bool) -> None:
    """The epoch's loss sums at the checkpoint's step: rank 0 holds every process's (up to the last
    check, `accum`), the others start at zero."""
    counted = loaded.accum_count if loaded.accum_count is not None else float(loaded.step)  # earlier: 1 process
    if main and loaded.accum is not None:
        monitor.restart(loaded.accum.to(monitor.sums.device), loaded.step, counted)
    else:
        monitor.restart(None, loaded.step)
