"""A-FL's per-patient statistics in 2D training: prepare stores them, the dataset hands them with
each slice, the trainer gives them to the loss.

Hand-worked values (voxel units, numpy.gradient: central differences inside, one-sided at the
borders; the cache size equals the native 16 x 16, so the cached stack is the mask itself):

Patient 01, Z = 3, a 4 x 4 square at rows 4..7, columns 4..7 of slice 1 only (slices 0, 2 empty):
  fg fraction = 16 / (3 * 256) = 1/48.
  z: slice 0 (forward) and slice 2 (backward) differ by 1 on the square, slice 1 (central) by 0:
     32 voxels of |g| = 1.
  slice 1, in plane: gy = +-1/2 on rows 3, 4, 7, 8 of columns 4..7, gx likewise on columns
     3, 4, 7, 8 of rows 4..7; both at the 4 corners (4, 4), (4, 7), (7, 4), (7, 7): |g| = sqrt(1/2);
     one of them at 24 more pixels: |g| = 1/2.
  gamma_mSa = (32 + 24 / 2 + 4 sqrt(1/2)) / 768 = (44 + 2 sqrt 2) / 768 = 0.0609744...
Patient 02, Z = 2, columns 0..7 of both slices: fg fraction 1/2; gz = 0; gx = -1/2 at columns 7
  and 8 of every row (columns 0 and 15 one-sided: 0): gamma_mSa = 64 * 1/2 / 512 = 1/16.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_helpers import nifti_path, write_zyx
from microseg.data.cache import read_cache_info
from microseg.data.dataset import SliceDataset
from microseg.data.prepare import prepare_cache
from microseg.losses import SAMPLE_STAT_KEYS, DeepSupervision
from train_helpers import train_tiny

FG, GMSA = SAMPLE_STAT_KEYS
HAND = {"01": (1 / 48, (44 + 2 * math.sqrt(2)) / 768), "02": (1 / 2, 1 / 16)}


def _volumes() -> dict[str, np.ndarray]:
    square = np.zeros((3, 16, 16), np.uint8)
    square[1, 4:8, 4:8] = 1
    half = np.zeros((2, 16, 16), np.uint8)
    half[:, :, :8] = 1
    return {"01": square, "02": half}


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("afl")
    for case_id, mask in _volumes().items():
        write_zyx(nifti_path(root / "data", "train", "image", case_id), np.where(mask > 0, 200, 20).astype(np.uint8))
        write_zyx(nifti_path(root / "data", "train", "expert", case_id), mask)
        write_zyx(nifti_path(root / "data", "train", "non_expert", case_id), mask)
    return prepare_cache(root / "data", root / "c.h5", size=16)


def test_prepare_stores_each_patients_hand_worked_statistics(small_cache):
    stats = read_cache_info(small_cache).patient_stats
    assert set(stats) == set(HAND)
    for case_id, (fg, gmsa) in HAND.items():
        assert stats[case_id][FG] == pytest.approx(fg, rel=1e-12)
        assert stats[case_id][GMSA] == pytest.approx(gmsa, rel=1e-12)


def test_every_slice_gets_its_patients_statistics_empty_ones_too(small_cache):
    ds = SliceDataset(small_cache)
    for i in range(len(ds)):
        item = ds[i]
        fg, gmsa = HAND[item["case_id"]]
        assert item[FG].shape == () and item[FG].dtype == torch.float32
        assert item[FG].item() == pytest.approx(fg, rel=1e-6) and item[GMSA].item() == pytest.approx(gmsa, rel=1e-6)
    batch = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert batch[FG].shape == (len(ds),)  # [B] after collate, as the loss takes them
    assert batch[GMSA].tolist() == pytest.approx([HAND[c][1] for c in batch["case_id"]], rel=1e-6)


def test_an_empty_slice_is_penalised_with_its_patients_parameters(small_cache):
    """Slice 0 of patient 01 has no foreground: per slice A-FL gives it zero weight, per patient not."""
    item = SliceDataset(small_cache)[0]
    assert item["case_id"] == "01" and item["expert"].sum() == 0
    logits = torch.full((1, 1, 16, 16), 2.0)  # a false positive everywhere
    expert = item["expert"][None]
    stats = {key: item[key][None] for key in SAMPLE_STAT_KEYS}
    fg, gmsa = HAND["01"]
    p = 1 / (1 + math.exp(-2.0))
    # background weight 1 - alpha_va = fg, gamma = gamma_va + gamma_mSa, -log(1 - p) = softplus(2)
    expected = fg * p ** (fg + gmsa) * math.log1p(math.exp(2.0))
    patient = DeepSupervision("afl", kernel_sizes=[4], weights=[1.0])(logits, [], expert, sample_stats=stats)
    per_slice = DeepSupervision("afl:stats=slice", kernel_sizes=[4], weights=[1.0])(logits, [], expert)
    assert patient.total.item() == pytest.approx(expected, rel=1e-5)
    assert per_slice.total.item() == 0.0


def test_train_with_afl_end_to_end(cache, tmp_path):
    run = train_tiny(cache, tmp_path / "afl", loss="afl", epochs=1)
    with open(run / "history.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert math.isfinite(float(row["loss"])) and float(row["loss"]) > 0
