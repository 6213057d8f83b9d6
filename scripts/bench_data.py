"""Benchmark the training input pipeline: HDF5 slice cache vs the reference's PNG-per-slice files.

Both are built in this run from the same native-size (962 x 1372) phantom set and served by the
same DataLoader (batch 8, shuffled, 2 workers) with the same augmentation and tensor conversion:
- cache: ``SliceDataset`` over ``microseg prepare``'s HDF5 file (224 x 224 uint8, lzf), read one
  chunk per item (the default) or whole into RAM per worker;
- reference: one PNG per slice for the image and each mask, decoded with OpenCV on every item
  (``cv2.imread(path)[:, :, 0]`` as MicroSegNet's loader does) and resized to 224 with
  ``cv2.resize`` (bilinear; masks thresholded back to {0, 1}); PNGs at the native size, and at the
  half size (481 x 686) that MicroSegNet's own preprocessing writes.
Prints a markdown table of slices/s and the ratio to the native-PNG path.

    python scripts/bench_data.py [--train 3] [--slices 16] [--epochs 3] [--items 480] [--workers 2]   (PYTHONPATH=. or installed)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from microseg.data.augment import build_augmentation
from microseg.data.dataset import SliceDataset, slice_tensors
from microseg.data.layout import find_cases
from microseg.data.phantom import simulate_dataset
from microseg.data.prepare import prepare_cache
from microseg.data.volumes import read_volume

SIZE = 224


class PngSlices(Dataset):
    """The reference way: PNG files per slice, decoded and resized on every item."""

    def __init__(self, triples: list[tuple[Path, Path, Path]], seed: int, size: int = SIZE):
        self.triples, self.seed, self.size, self.transform = triples, seed, size, None

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, item: int) -> dict:
        if self.transform is None:
            self.transform = build_augmentation(seed=self.seed + torch.initial_seed() % 1000)
        image, expert, non_expert = (cv2.imread(str(p))[:, :, 0] for p in self.triples[item])
        image = cv2.resize(image, (self.size, self.size))
        masks = [(cv2.resize(m, (self.size, self.size)) > 127).astype(np.uint8) for m in (expert, non_expert)]
        out = self.transform(image=image, masks=masks)
        return slice_tensors(out["image"], *out["masks"])


def write_pngs(data: Path, out: Path, scale: int) -> list[tuple[Path, Path, Path]]:
    """Every training slice as three PNGs (image, expert*255, non-expert*255) at 1/scale size."""
    out.mkdir(parents=True, exist_ok=True)
    triples = []
    for case in find_cases(data, "train"):
        image = read_volume(case.image).array
        masks = [read_volume(p, "mask").array * 255 for p in (case.expert, case.non_expert)]
        for z in range(len(image)):
            paths = tuple(out / f"{case.case_id}_{kind}_{z}.png" for kind in ("img", "gt", "st"))
            for path, array in zip(paths, (image[z], masks[0][z], masks[1][z]), strict=True):
                h, w = array.shape
                cv2.imwrite(str(path), array if scale == 1 else cv2.resize(array, (w // scale, h // scale)))
            triples.append(paths)
    return triples


def throughput(dataset: Dataset, epochs: int, items: int, workers: int, batch: int) -> float:
    """Slices per second over `epochs` epochs of `items` slices drawn at random (worker start-up
    included once per epoch, as in training; a real epoch holds ~2750 slices)."""
    torch.manual_seed(0)
    n = 0
    start = time.perf_counter()
    for _ in range(epochs):
        sampler = RandomSampler(dataset, replacement=True, num_samples=items)
        for batch_ in DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers):
            n += len(batch_["image"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3, help="phantom training patients (default 3)")
    parser.add_argument("--slices", type=int, default=16, help="slices per patient (default 16)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per pipeline (default 3)")
    parser.add_argument("--items", type=int, default=480, help="slices drawn per epoch (default 480)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        data = simulate_dataset(tmp / "data", n_train=args.train, n_test=0, n_slices=args.slices)
        t_sim = time.perf_counter() - started
        started = time.perf_counter()
        cache = prepare_cache(data, tmp / "cache.h5", SIZE)
        t_prep = time.perf_counter() - started
        started = time.perf_counter()
        pngs = {scale: write_pngs(data, tmp / f"png{scale}", scale) for scale in (1, 2)}
        t_png = time.perf_counter() - started

        pipelines = {
            "reference: PNG per slice, 962 x 1372": PngSlices(pngs[1], seed=0),
            "reference: PNG per slice, 481 x 686 (MicroSegNet preprocessing)": PngSlices(pngs[2], seed=0),
            "ours: HDF5 cache, chunk read per item (default)": SliceDataset(cache, augment=True, seed=0),
            "ours: HDF5 cache, in RAM per worker": SliceDataset(cache, augment=True, seed=0, in_memory=True),
        }
        rates = {
            name: throughput(ds, args.epochs, args.items, args.workers, args.batch) for name, ds in pipelines.items()
        }

    n = args.train * args.slices
    base = next(iter(rates.values()))
    cpu = platform.processor() or platform.machine()
    print(
        f"\n{n} native-size phantom slices ({args.train} patients x {args.slices}); batch {args.batch}, "
        f"{args.workers} workers, {args.epochs} epochs of {args.items} slices, augmentation on; {cpu}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}"
    )
    print(
        f"one-off costs: simulate {t_sim:.1f} s, prepare cache {t_prep:.1f} s, write PNGs (both sizes) {t_png:.1f} s\n"
    )
    print("| pipeline | slices/s | vs native PNG |")
    print("| --- | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
