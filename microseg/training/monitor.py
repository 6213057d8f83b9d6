"""The NaN / Inf guard of training: each step's losses summed on the device, read every `sync_every` steps.

No host synchronisation in a step: `LossMonitor.add` keeps the epoch's running sums and the
window's totals on the device; `read`, every `--sync-every` steps and at the epoch's end, is the one
device -> host copy. A non-finite total found there stops training (`NonFiniteLoss`, raised by the
trainer with the step where it appeared).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from microseg.core.errors import MicrosegError


class NonFiniteLoss(MicrosegError):
    """The loss became NaN or Inf; training stops and keeps the last good checkpoint."""

    @classmethod
    def found(cls, check: LossCheck, epoch: int, window: range, sync_every: int, last: Path) -> NonFiniteLoss:
        """The refusal of a check of the steps `window` of (0-based) `epoch` that found a non-finite loss
        (`check`'s, or another process's); `last` keeps the epochs before it."""
        where = (
            f"became {check.bad_value} at epoch {epoch + 1}, step {check.first_bad_step}"
            if check.first_bad_step is not None
            else f"became non-finite on another rank in epoch {epoch + 1}"
        )
        kept = f"{last} keeps epoch {epoch}" if epoch else "no epoch had finished"
        return cls(
            f"loss {where} (found at the check of steps {window[0]}-{window[-1]}, every "
            f"--sync-every {sync_every}); stopped ({kept})"
        )


@dataclass(frozen=True)
class LossCheck:
    """What one read of the monitor found: the first non-finite total in the window, the window's
    mean total, the epoch's running mean and the running sums (on the host)."""

    first_bad_step: int | None
    bad_value: float
    window_mean: float
    epoch_mean: float
    sums: torch.Tensor


class LossMonitor:
    """The epoch's running loss sums and each step's total since the last check, on the device.

    `add` costs no host read; `read` is the one read, every `sync_every` steps and at the epoch's
    end. Each step's values are weighted by this process's share of the batch (1 but in a last,
    smaller batch); `counted` sums the weights, so sums / counted summed over processes is the
    epoch's mean. `offset` / `counted_offset` are what the other processes had added by the last
    check (set by `read_shared`), so a position saved without a collective still holds them.
    """

    def __init__(self, n_values: int, window: int, device: torch.device):
        self.sums = torch.zeros(n_values, dtype=torch.float64, device=device)  # per scale, total, BCE
        self.totals = torch.zeros(window, dtype=torch.float64, device=device)
        self.start, self.count = 0, 0  # epoch step before the window's first step; steps in the window
        self.counted, self.offset, self.counted_offset = 0.0, torch.zeros(n_values, dtype=torch.float64), 0.0

    def restart(self, sums: torch.Tensor | None, step: int, counted: float = 0.0) -> None:
        """A new epoch (sums None: zero), or a resumed one at `step` with its saved sums and weight."""
        self.sums.copy_(sums if sums is not None else torch.zeros_like(self.sums))
        self.start, self.count, self.counted = step, 0, counted
        self.offset.zero_()
        self.counted_offset = 0.0

    @property
    def full(self) -> bool:
        return self.count == len(self.totals)

    def add(self, values: torch.Tensor, weight: float = 1.0) -> None:
        self.sums += values if weight == 1.0 else values * weight
        self.totals[self.count] = values[-2]
        self.count += 1
        self.counted += weight

    def read(self) -> LossCheck:
        """One device -> host copy of the window and the sums; then the window restarts after it."""
        host = torch.cat([self.totals[: self.count], self.sums]).cpu()
        window, steps = host[: self.count].numpy(), self.start + self.count
        bad = np.flatnonzero(~np.isfinite(window))
        first = int(bad[0]) if bad.size else None
        check = LossCheck(
            None if first is None else self.start + first + 1,
            math.nan if first is None else float(window[first]),
            float(window.mean()) if window.size else math.nan,
            float(host[-2]) / self.counted if self.counted > 0 else math.nan,
            host[self.count :],
        )
        self.start, self.count = steps, 0
        return check

    def read_shared(self, total: Callable[[torch.Tensor], torch.Tensor]) -> tuple[LossCheck, bool]:
        """`read`, then the processes' sums shared by `total` (a sum over processes): sets `offset` and
        `counted_offset`; True when a process (this one or another) found a non-finite loss."""
        found = self.read()
        flag = float(found.first_bad_step is not None)
        shared = total(torch.cat([torch.tensor([flag, self.counted], dtype=torch.float64), found.sums]))
        self.offset = shared[2:] - found.sums
        self.counted_offset = float(shared[1]) - self.counted
        return found, bool(shared[0] > 0)

    def epoch_means(self, total: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The epoch's mean losses [per scale..., total, bce] over its steps and processes (`total`: a sum
        over processes)."""
        counted = torch.tensor([self.counted], dtype=torch.float64)
        shared = total(torch.cat([self.sums.cpu(), counted]))
        return shared[:-1] / shared[-1]

    def position_sums(self) -> tuple[torch.Tensor, float]:
        """(sums, counted) for a checkpoint: this process's, plus the others' up to the last check."""
        return self.sums.cpu() + self.offset, self.counted + self.counted_offset
