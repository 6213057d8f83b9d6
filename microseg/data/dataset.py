"""Torch dataset over the slice cache, and the patient-level train/validation split.

Each item is ``{"image": float32 [1,S,S] = uint8 / intensity_max clipped to 1 (the run's
``Preprocess.intensity_max``, INTENSITY_MAX by default: MicroSegNet's scaling),
"expert"/"non_expert": float32 [1,S,S] in {0,1}, "case_id": str, "slice_index": int, and the
slice's patient's A-FL statistics under ``PATIENT_STAT_KEYS`` (0-d float32 tensors, [B] once
collated: ``microseg.data.cache``)}``.
The HDF5 file is opened lazily, once per process (DataLoader workers each open their own; the
dataset pickles without a handle). Items are read one HDF5 chunk (one slice) at a time: that
costs well under a millisecond, below the augmentation's cost, and keeps worker start-up and
memory flat for any dataset size; ``in_memory=True`` reads the whole cache into RAM per process
instead (see scripts/bench_data.py for both).

Augmentation randomness: with a ``seed``, each item's augmentation is seeded by
``SeedSequence([seed, epoch, index])`` (``set_epoch`` before each epoch's loader): epochs differ,
and an item is augmented the same whichever worker or rank loads it and whatever came before,
so a run resumed mid-epoch repeats the uninterrupted one exactly. With ``seed=None`` each
process draws one stream seeded from ``torch.initial_seed()`` (the DataLoader's per-worker seed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from microseg.core.errors import MicrosegError, OptionError
from microseg.core.preprocess import INTENSITY_MAX, scale_intensity
from microseg.data.augment import Compose, build_augmentation
from microseg.data.cache import SLICE_KEYS, read_cache_info


class SliceDataset(Dataset):
    """Slices of a cache (all, or the given cache indices), optionally augmented."""

    def __init__(
        self,
        cache_path: str | Path,
        indices: Sequence[int] | None = None,
        augment: bool = False,
        seed: int | None = None,
        in_memory: bool = False,
        intensity_max: int = INTENSITY_MAX,
    ):
        info = read_cache_info(cache_path)
        self.path, self.size, self.augment, self.seed, self.epoch = info.path, info.size, augment, seed, 0
        self.intensity_max = intensity_max
        with h5py.File(self.path, "r") as f:
            self.case_ids = [i.decode() for i in f["case_id"][()]]
            self.slice_index = f["slice_index"][()]
        self.patient_stats = {
            case_id: {key: np.float32(value) for key, value in stats.items()}
            for case_id, stats in info.patient_stats.items()
        }
        n = info.n_slices
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise MicrosegError(f"{self.path}: slice indices must lie in 0..{n - 1}")
        self.in_memory = in_memory
        self._pid: int | None = None
        self._arrays: tuple | None = None
        self._transform: tuple | None = None  # (pid, Compose)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_arrays": None, "_transform": None}

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before creating the epoch's loader)."""
        self.epoch = epoch

    def _open(self) -> tuple:
        if self._pid != os.getpid() or self._arrays is None:
            file = h5py.File(self.path, "r")
            if self.in_memory:
                self._arrays = tuple(file[key][()] for key in SLICE_KEYS)
                file.close()
            else:
                self._arrays = tuple(file[key] for key in SLICE_KEYS)
            self._pid = os.getpid()
        return self._arrays

    def _augmentation(self, index: int) -> Compose:
        if self._transform is None or self._transform[0] != os.getpid():
            self._transform = (os.getpid(), build_augmentation(seed=torch.initial_seed() % 2**32))
        transform = self._transform[1]
        if self.seed is not None:
            transform.set_random_seed(int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]))
        return transform

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slice `index`'s image and masks; a chunk that fails its checksum or decompression, or a
        mask that is not binary, is one MicrosegError naming the cache and the slice (in a loader
        worker too: see MicrosegError)."""
        where = f"cache {self.path}: slice {index} (case {self.case_ids[index]}, z {int(self.slice_index[index])})"
        try:
            image, expert, non_expert = (array[index] for array in self._open())
        except OSError as err:
            raise MicrosegError(
                f"{where} cannot be read ({' '.join(str(err).split())}): the file is damaged; prepare it again"
            ) from None
        if expert.max(initial=0) > 1 or non_expert.max(initial=0) > 1:
            raise MicrosegError(f"{where} holds a mask that is not binary: the file is damaged; prepare it again")
        return image, expert, non_expert

    def __getitem__(self, item: int) -> dict:
        index = int(self.indices[item])
        image, expert, non_expert = self._read(index)
        if self.augment:
            out = self._augmentation(index)(image=image, masks=[expert, non_expert])
            image, (expert, non_expert) = out["image"], out["masks"]
        patient = self.patient_stats[self.case_ids[index]]
        stats = {key: torch.from_numpy(np.asarray(value)) for key, value in patient.items()}
        return {
            **slice_tensors(image, expert, non_expert, self.intensity_max),
            "case_id": self.case_ids[index],
            "slice_index": int(self.slice_index[index]),
            **stats,
        }


def slice_tensors(
    image: np.ndarray, expert: np.ndarray, non_expert: np.ndarray, intensity_max: int = INTENSITY_MAX
) -> dict[str, torch.Tensor]:
    """uint8 [S, S] arrays -> float32 [1, S, S] tensors; the image scaled by ``scale_intensity``.

    Converted in NumPy: a torch op per item would wake torch's intra-op thread pool, which
    costs milliseconds per call on a busy machine when run in the main process.
    """
    return {
        "image": torch.from_numpy(scale_intensity(image, intensity_max)[None]),
        "expert": torch.from_numpy(expert.astype(np.float32)[None]),
        "non_expert": torch.from_numpy(non_expert.astype(np.float32)[None]),
    }


def split_by_patient(
    cache_path: str | Path,
    val_fraction: float,
    seed: int,
    patients: Sequence[str] = (),
    val_patients: Sequence[str] = (),
) -> tuple[list[int], list[int]]:
    """Patient-level split of the cache's slice indices into (train, validation).

    `patients` restricts training to those patient ids (default: every patient of the cache);
    `val_patients` names the validation patients (a cross-validation fold's held-out ones), which
    are then never trained on. Without them, a seeded ``round(val_fraction * n_patients)`` of the
    training patients go to validation, at least one when the fraction is positive and there are
    two or more patients, and never all of them.
    """
    if not 0 <= val_fraction < 1:
        raise MicrosegError(f"validation fraction must be in [0, 1), got {val_fraction}")
    with h5py.File(read_cache_info(cache_path).path, "r") as f:
        ids = np.array([i.decode() for i in f["case_id"][()]])
    cached = sorted(set(ids.tolist()))
    for name, named in (("patients", patients), ("val_patients", val_patients)):
        unknown = sorted(set(named) - set(cached))
        if unknown:
            raise OptionError(
                f"`{name}`: patient(s) {', '.join(unknown)} not in cache {cache_path} (it holds {', '.join(cached)})"
            )
    both = sorted(set(patients) & set(val_patients))
    if both:
        raise OptionError(f"patient(s) {', '.join(both)} are in both `patients` and `val_patients`")
    if val_patients:
        chosen = sorted(set(patients)) if patients else sorted(set(cached) - set(val_patients))
        return np.flatnonzero(np.isin(ids, chosen)).tolist(), np.flatnonzero(np.isin(ids, list(val_patients))).tolist()
    chosen = sorted(set(patients)) if patients else cached
    n_val = 0
    if val_fraction > 0 and len(chosen) >= 2:
        n_val = min(len(chosen) - 1, max(1, round(val_fraction * len(chosen))))
    order = np.random.default_rng(seed).permutation(len(chosen))
    val = np.isin(ids, [chosen[i] for i in order[:n_val]])
    train = np.isin(ids, chosen) & ~val
    return np.flatnonzero(train).tolist(), np.flatnonzero(val).tolist()
