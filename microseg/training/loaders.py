"""The training run's data loaders: its training slices in (epoch, index) order, its validation slices.

Every loader's workers persist across epochs (the epoch travels with each index:
`microseg.data.order`), its batches are pinned on CUDA, and it draws its worker seeds from its
own generator, seeded by the run's seed: without one, a loader draws them from the global RNG,
which would shift the dropout stream of a run resumed mid-epoch. The validation loader (rank 0
only) reads its slices in order, without augmentation; the slice with the largest expert area is
TensorBoard's overlay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from microseg.core.runtime import Distributed
from microseg.runs.config import TrainConfig

if TYPE_CHECKING:
    from microseg.data.order import EpochSampler


@dataclass
class TrainingData:
    """The training slices' order (`sampler`: this process's (epoch, index) batches) and `loader`; the
    validation `val_loader` (None without a validation split, and on ranks other than 0) and the
    index among its slices of the one TensorBoard shows."""

    sampler: EpochSampler
    loader: DataLoader
    val_loader: DataLoader | None
    overlay_index: int


def build_training_data(
    config: TrainConfig, train_idx: list[int], val_idx: list[int], intensity_max: int, env: Distributed
) -> TrainingData:
    """The loaders of the cache's `train_idx` and (rank 0) `val_idx` slices, images scaled by `intensity_max`."""
    from microseg.data.cache import foreground_areas
    from microseg.data.dataset import SliceDataset
    from microseg.data.order import EpochItems, EpochSampler

    cache = Path(config.cache)
    dataset = SliceDataset(cache, train_idx, augment=config.augment, seed=config.seed, intensity_max=intensity_max)
    sampler = EpochSampler(dataset, env.world, env.rank, config.seed, config.batch_size)
    loader = build_loader(EpochItems(dataset), config, env.device, batch_sampler=sampler)
    val_loader, overlay_index = None, 0
    if val_idx and env.main:
        val = SliceDataset(cache, val_idx, augment=False, intensity_max=intensity_max)
        val_loader = build_loader(val, config, env.device, seed_offset=-1)
        overlay_index = int(np.argmax(foreground_areas(cache)[np.asarray(val_idx)]))
    return TrainingData(sampler, loader, val_loader, overlay_index)


def build_loader(
    dataset: Dataset,
    config: TrainConfig,
    device: torch.device,
    sampler: Sampler | None = None,
    seed_offset: int = 0,
    batch_sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader (batches of the config's size, or `batch_sampler`'s) whose workers persist across
    epochs, pinned on CUDA, with its own generator seeded by (seed, `seed_offset`)."""
    batches = (
        {"batch_sampler": batch_sampler}
        if batch_sampler is not None
        else {"batch_size": config.batch_size, "sampler": sampler}
    )
    return DataLoader(
        dataset,
        **batches,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed * 1_000_003 + seed_offset),
    )
