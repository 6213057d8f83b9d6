"""The training order: epoch e's seeded permutation, resumed from a step, carried to persistent workers.

Epoch e visits this rank's share of the training slices in `DistributedSampler`'s order
(`torch.randperm` seeded by seed + e; one rank: a permutation of all of them). A run resumed at
step s of epoch e starts at item s x batch of that order. `EpochSampler` yields (epoch, index)
pairs: a DataLoader's persistent workers each keep the copy of the dataset made when they
started, so an epoch set on the main process's dataset never reaches them; the pair carries it
with each item and `EpochItems` sets it on the worker's copy before reading the item, so each
item's augmentation stays seeded by (seed, epoch, index) whichever worker loads it.
"""

from __future__ import annotations

import itertools
from typing import Iterator

from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


class EpochSampler(Sampler):
    """(epoch, index) pairs of the current epoch from the current step on (`set_position` before each epoch)."""

    def __init__(self, dataset: Dataset, world: int, rank: int, seed: int, batch_size: int):
        self.order = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.epoch, self.start = batch_size, 0, 0

    def set_position(self, epoch: int, step: int) -> None:
        self.epoch, self.start = epoch, step * self.batch_size
        self.order.set_epoch(epoch)

    @property
    def epoch_items(self) -> int:
        """Items this rank visits in a whole epoch."""
        return len(self.order)

    def __len__(self) -> int:
        return max(0, len(self.order) - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in itertools.islice(iter(self.order), self.start, None))


class EpochItems(Dataset):
    """A dataset with `set_epoch`, indexed by (epoch, index) pairs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        self.dataset.set_epoch(epoch)
        return self.dataset[index]
