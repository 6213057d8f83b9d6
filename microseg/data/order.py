"""The training order: epoch e's seeded permutation in global batches, split over the processes,
resumed from a step, carried to persistent workers.

`--batch-size` is the global batch B: step s of epoch e trains on items s*B .. s*B + B - 1 of the
permutation of all training slices seeded by seed + e (`torch.randperm`, as torch's
`DistributedSampler` draws it), whatever the number of processes W; process r takes every W-th
item of that batch from the r-th. So an epoch has ceil(N / B) steps on any W, a position is
(epoch, step), and a run resumed on another number of processes continues at the same slice and
the same point of the schedule. When W does not divide a batch of L items (B, or the smaller
last one) the processes' shares differ by one: each process's loss is weighted by its share,
n_r * W / L, so that DDP's mean over processes is the mean over the batch's slices; a process
left without a slice (L < W) takes a repeat of the epoch's first slice with weight 0.

`EpochSampler` yields each step's (epoch, index) pairs as one batch: a DataLoader's persistent workers each keep the copy
of the dataset made when they started, so an epoch set on the main process's dataset never
reaches them; the pair carries it with each item and `EpochItems` sets it on the worker's copy
before reading the item, so each item's augmentation stays seeded by (seed, epoch, index)
whichever worker loads it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Protocol

import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler):
    """A batch sampler: this process's (epoch, index) pairs of each step of the current epoch, from
    the current step on (`set_position` before each epoch)."""

    def __init__(self, dataset: Sized, world: int, rank: int, seed: int, batch_size: int):
        self.size, self.world, self.rank, self.seed = len(dataset), world, rank, seed
        self.batch_size = batch_size
        self.epoch, self.step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def set_position(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s permutation of all the slices (DistributedSampler's draw)."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def share(self, order: list[int], step: int) -> list[int]:
        """This process's items of global batch `step`."""
        batch = order[step * self.batch_size : (step + 1) * self.batch_size]
        batch += order[: max(0, self.world - len(batch))]  # L < W: a repeat for a process left without a slice
        return batch[self.rank :: self.world]

    def weight(self, step: int) -> float:
        """This process's loss weight at `step`: n_r * W / L, 1 when its share is L / W."""
        items = min(self.batch_size, self.size - step * self.batch_size)
        share = len(range(self.rank, items, self.world))
        return 1.0 if share * self.world == items else share * self.world / items

    def __len__(self) -> int:
        return self.steps_per_epoch - self.step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        for step in range(self.step, self.steps_per_epoch):
            yield [(self.epoch, index) for index in self.share(order, step)]


class EpochDataset(Protocol):
    """A map-style dataset whose items depend on the epoch set before reading them."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...

    def set_epoch(self, epoch: int) -> None: ...


class EpochItems(Dataset):
    """A dataset with `set_epoch`, indexed by (epoch, index) pairs."""

    def __init__(self, dataset: EpochDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        self.dataset.set_epoch(epoch)
        return self.dataset[index]
