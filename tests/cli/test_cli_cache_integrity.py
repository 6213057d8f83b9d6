"""The slice cache is never used corrupt or stale, through the CLI.

- Every dataset carries HDF5's fletcher32 checksum: bytes inverted anywhere inside a stored chunk
  (several slices, several offsets, images and masks) make that slice's read fail, and training
  stops with one line naming the cache and the slice, with 0 and with 2 loader workers.
- A cache of the previous format is one line asking to prepare it again.
- A source volume changed or removed after `prepare` is refused by train and evaluate naming the
  file; --no-source-check goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from cli_helpers import one_error, run_cli, tree
from microseg.core.errors import MicrosegError
from microseg.data.cache import SLICE_KEYS
from microseg.data.dataset import SliceDataset
from train_helpers import TINY_TRAIN


def train_argv(cache: Path, run: Path, *extra) -> list:
    argv = ["train", "--cache", cache, "--run", run]
    for key, value in {**TINY_TRAIN, "epochs": 1, "val_fraction": 0}.items():
        argv += ["--" + key.replace("_", "-"), value]
    return argv + list(extra)


def chunk_span(cache: Path, key: str, index: int) -> tuple[int, int]:
    """(byte offset, stored size) of slice `index`'s chunk of dataset `key` in the file."""
    with h5py.File(cache, "r") as f:
        info = f[key].id.get_chunk_info_by_coord((index, 0, 0))
    return info.byte_offset, info.size


def invert(path: Path, offset: int, n: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(n)
        handle.seek(offset)
        handle.write(bytes(255 - b for b in data))


def test_every_dataset_is_checksummed(cache):
    with h5py.File(cache, "r") as f:
        datasets = [name for name, item in f.items() if isinstance(item, h5py.Dataset)]
        assert set(SLICE_KEYS) <= set(datasets)
        assert all(f[name].fletcher32 for name in datasets), datasets


@pytest.mark.parametrize("key", SLICE_KEYS)
def test_inverted_bytes_anywhere_in_a_chunk_are_caught_when_the_slice_is_read(key, cache, tmp_path):
    """16 inverted bytes (or the whole chunk, when it is shorter) at its start, middle, end and 9
    other places."""
    copy = tmp_path / "cache.h5"
    n = SliceDataset(cache).indices.size
    for index in (0, n // 2, n - 1):
        offset, size = chunk_span(cache, key, index)
        n_bytes = min(16, size)
        last = size - n_bytes
        for position in sorted({0, last // 2, last, *range(0, last, max(1, last // 9))}):
            shutil.copy(cache, copy)
            invert(copy, offset + position, n_bytes)
            dataset = SliceDataset(copy)
            with pytest.raises(MicrosegError) as caught:
                dataset[index]
            assert f"cache {copy}: slice {index} " in str(caught.value) and "\n" not in str(caught.value)
            others = [i for i in (0, n - 1) if i != index]
            for other in others:  # the other slices still read, unchanged
                assert np.array_equal(dataset[other]["image"].numpy(), SliceDataset(cache)[other]["image"].numpy())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_chunk_stops_training_with_one_line_naming_the_slice(workers, cache, tmp_path, capsys):
    copy = tmp_path / "cache.h5"
    shutil.copy(cache, copy)
    offset, size = chunk_span(copy, "expert", 5)
    invert(copy, offset + max(0, size - 16) // 2, min(16, size))
    before = set(multiprocessing.active_children())
    code, _, err = run_cli(train_argv(copy, tmp_path / "runs" / "r", "--num-workers", workers), capsys)
    one_error(code, err, f"cache {copy}: slice 5 ", "prepare it again")
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert not (tmp_path / "runs").exists()
    assert set(multiprocessing.active_children()) <= before  # the loader's workers stopped with the run


def test_a_cache_of_the_previous_format_is_prepared_again(cache, tmp_path, capsys):
    copy = tmp_path / "old.h5"
    shutil.copy(cache, copy)
    with h5py.File(copy, "r+") as f:
        f.attrs["format_version"] = 3
        del f.attrs["sources"]
    code, _, err = run_cli(train_argv(copy, tmp_path / "runs" / "r"), capsys)
    one_error(code, err, str(copy), "prepare it again")
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def own_data(phantom, tmp_path) -> tuple[Path, Path]:
    """A copy of the phantom set and its own cache."""
    from microseg.data.prepare import prepare_cache

    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    return data, prepare_cache(data, tmp_path / "cache.h5", size=32)


def test_a_source_changed_after_prepare_is_refused_by_train_and_evaluate(own_data, tmp_path, capsys):
    data, cache = own_data
    run = tmp_path / "runs" / "r"
    assert run_cli(train_argv(cache, run), capsys)[0] == 0
    volume = sorted((data / "train" / "micro_ultrasound_scans").glob("*.nii.gz"))[1]
    other = sorted((data / "train" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]
    shutil.copy(other, volume)  # replaced by another patient's scan
    before = tree(run)
    code, _, err = run_cli(train_argv(cache, tmp_path / "runs" / "new"), capsys)
    one_error(code, err, str(volume), "changed since the cache", "--no-source-check")
    assert not (tmp_path / "runs" / "new").exists()
    code, _, err = run_cli(["evaluate", "--run", run, "--data", data, "--device", "cpu"], capsys)
    one_error(code, err, str(volume), "changed since the cache")
    assert tree(run) == before  # no metrics/ nor predictions/
    assert run_cli(["evaluate", "--run", run, "--data", data, "--device", "cpu", "--no-source-check"], capsys)[0] == 0
    assert run_cli(train_argv(cache, tmp_path / "runs" / "new", "--no-source-check"), capsys)[0] == 0


def test_a_same_size_rewrite_and_a_removed_source_are_refused(own_data, tmp_path, capsys):
    data, cache = own_data
    mask = sorted((data / "train" / "expert_annotations").glob("*.nii.gz"))[0]
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same bytes, touched
    code, _, err = run_cli(train_argv(cache, tmp_path / "runs" / "r"), capsys)
    one_error(code, err, str(mask), "changed since the cache")
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    removed = sorted((data / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]
    removed.unlink()
    code, _, err = run_cli(train_argv(cache, tmp_path / "runs" / "r"), capsys)
    one_error(code, err, str(removed), "was removed since")
    shutil.rmtree(data)  # the cache alone, its data elsewhere: nothing to compare, training goes on
    assert run_cli(train_argv(cache, tmp_path / "runs" / "r"), capsys)[0] == 0


def test_a_rewritten_non_binary_mask_is_refused(cache, tmp_path, capsys):
    """A mask value of 255 written with a valid checksum (the cache edited by hand) is still refused."""
    copy = tmp_path / "cache.h5"
    shutil.copy(cache, copy)
    with h5py.File(copy, "r+") as f:
        f["expert"][3, 0, 0] = 255
    code, _, err = run_cli(train_argv(copy, tmp_path / "runs" / "r"), capsys)
    one_error(code, err, f"cache {copy}: slice 3 ", "not binary")
    assert not (tmp_path / "runs").exists()
