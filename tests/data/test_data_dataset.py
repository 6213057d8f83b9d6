"""SliceDataset (tensors, lazy HDF5, augmentation alignment) and the patient-level split."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_helpers import nifti_path, write_zyx
from microseg.core.errors import MicrosegError
from microseg.data.augment import build_augmentation
from microseg.data.dataset import SliceDataset, split_by_patient
from microseg.data.prepare import prepare_cache


@pytest.fixture(scope="module")
def cache_64(tmp_path_factory):
    """Five patients; the image is bright exactly where the (asymmetric) mask is."""
    root = tmp_path_factory.mktemp("ds")
    data = root / "data"
    yy, xx = np.mgrid[:64, :64]
    mask = ((yy > 10) & (yy < 40) & (xx > 8) & (xx < 30)) | ((yy - 45) ** 2 + (xx - 45) ** 2 < 100)
    masks = np.repeat(mask[None], 3, 0).astype(np.uint8)
    for case_id in ("01", "02", "03", "04", "05"):
        write_zyx(nifti_path(data, "train", "image", case_id), np.where(masks > 0, 200, 20).astype(np.uint8))
        write_zyx(nifti_path(data, "train", "expert", case_id), masks)
        write_zyx(nifti_path(data, "train", "non_expert", case_id), masks)
    return prepare_cache(data, root / "c.h5", size=64)


def test_items_shapes_dtypes_ranges(cache_64):
    ds = SliceDataset(cache_64, indices=[4, 0])
    assert len(ds) == 2
    item = ds[0]
    assert item["case_id"] == "02" and item["slice_index"] == 1
    for key in ("image", "expert", "non_expert"):
        assert item[key].shape == (1, 64, 64) and item[key].dtype == torch.float32
    assert set(item["expert"].unique().tolist()) == {0.0, 1.0}
    assert item["image"].max() == pytest.approx(200 / 254) and item["image"].min() == pytest.approx(20 / 254)
    with pytest.raises(MicrosegError, match="slice indices"):
        SliceDataset(cache_64, indices=[15])
    scaled = SliceDataset(cache_64, indices=[4], intensity_max=100)[0]["image"]  # a run's own intensity scale
    assert scaled.max() == 1.0 and scaled.min() == pytest.approx(20 / 100)


def test_augmentation_keeps_masks_binary_and_aligned(cache_64):
    ds = SliceDataset(cache_64, augment=True, seed=0)
    plain = SliceDataset(cache_64)[0]["expert"]
    moved = 0
    for i in range(len(ds)):
        item = ds[i]
        expert, non_expert = item["expert"], item["non_expert"]
        assert set(expert.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(expert, non_expert)  # one geometry for both masks
        bright = item["image"] > 96 / 254  # between the darkest bright and brightest dark pixel after jitter
        assert (bright == (expert > 0)).float().mean() > 0.97
        moved += not torch.equal(expert, plain)
    assert moved >= len(ds) // 3


def test_lazy_handle_pickles_and_workers_read(cache_64):
    for in_memory in (False, True):
        ds = SliceDataset(cache_64, in_memory=in_memory)
        first = ds[0]
        clone = pickle.loads(pickle.dumps(ds))  # an open h5py handle would not pickle
        assert clone._arrays is None and torch.equal(clone[0]["image"], first["image"])
    loader = DataLoader(SliceDataset(cache_64, in_memory=False), batch_size=4, num_workers=2)
    seen = [(c, int(z)) for batch in loader for c, z in zip(batch["case_id"], batch["slice_index"], strict=True)]
    assert seen == [(f"0{p}", z) for p in range(1, 6) for z in range(3)]


def test_augmentation_is_seeded_per_epoch_and_item(cache_64):
    def draw(seed, epoch, order=range(6)):
        ds = SliceDataset(cache_64, augment=True, seed=seed)
        ds.set_epoch(epoch)
        return torch.stack([ds[i]["image"] for i in order])

    assert torch.equal(draw(3, 0), draw(3, 0))
    # an item's augmentation does not depend on what was drawn before it (mid-epoch resume)
    assert torch.equal(draw(3, 0), draw(3, 0, order=range(5, -1, -1)).flip(0))
    assert not torch.equal(draw(3, 0), draw(3, 1))
    assert not torch.equal(draw(3, 0), draw(4, 0))
    aug = build_augmentation(seed=1)
    out = aug(image=np.zeros((64, 64), np.uint8), masks=[np.ones((64, 64), np.uint8)] * 2)
    assert out["image"].shape == (64, 64) and len(out["masks"]) == 2


def test_patient_split(cache_64):
    train, val = split_by_patient(cache_64, 0.4, seed=7)
    ds = SliceDataset(cache_64)
    patients = lambda idx: {ds.case_ids[i] for i in idx}  # noqa: E731
    assert len(patients(val)) == 2 and len(patients(train)) == 3 and not patients(train) & patients(val)
    assert sorted(train + val) == list(range(15))
    assert split_by_patient(cache_64, 0.4, seed=7) == (train, val)
    assert len({tuple(split_by_patient(cache_64, 0.4, seed=s)[1]) for s in range(10)}) > 1
    assert split_by_patient(cache_64, 0.0, seed=7) == (list(range(15)), [])
    assert len(patients(split_by_patient(cache_64, 0.01, seed=7)[1])) == 1
    with pytest.raises(MicrosegError, match="fraction"):
        split_by_patient(cache_64, 1.0, seed=0)
