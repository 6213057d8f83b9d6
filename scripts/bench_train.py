"""Benchmark a training epoch: images/s of our loop against the reference loop, per model config.

Both loops run in this run, on the same native-size (962 x 1372) phantom set, the same model
(built once, copied), SGD with poly decay, the same batch size, workers and deep-supervised loss
(4 scales; AG-BCE by default), through the same step function (`microseg.train.train_step`).
They differ only in what the issue names:
- ours: `SliceDataset` over the HDF5 slice cache (augmented, seeded per item), the hard region on
  the device; on CUDA also with bf16 autocast, and bf16 + channels_last (`--bf16`);
- reference (MicroSegNet's way): one PNG per slice decoded with OpenCV and resized on every item
  (`bench_data.PngSlices`), fp32, the hard region on the host with OpenCV and device <-> host copies
  (`bench_losses.reference_hard_region`).
A round is one epoch of `steps` batches from a fresh DataLoader (drawn from the phantom slices,
repeating them as needed), timed from the loader's creation to the last step (worker start-up
included, as every training epoch pays it; CUDA synchronised); each loop first takes one untimed
warm-up step, and the loops take their rounds in turn, in alternating order, so that they share the
machine's noise; a loop's figure is the median of its rounds' images/s. Defaults: on the CPU,
`small` (128 px) 3 rounds of 12 steps and the paper config `R50-ViT-B_16` (224 px) 1 round of 3
steps (5-25 s a step on 2 cores); on CUDA 3 rounds of 24 steps.

    python scripts/bench_train.py                                  # CPU: about 3-4 min on 2 cores
    python scripts/bench_train.py --configs small --steps 6 --rounds 2
    python scripts/bench_train.py --threads 1                      # steadier on a busy CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

SCRIPTS = Path(__file__).resolve().parent
sys.path[:0] = [str(SCRIPTS), str(SCRIPTS.parent)]
from bench_data import PngSlices, write_pngs  # noqa: E402
from bench_losses import HARD_REGION_LOSSES, hardware, reference_hard_region  # noqa: E402

from microseg.config import TrainConfig  # noqa: E402
from microseg.data.cache import prepare_cache  # noqa: E402
from microseg.data.dataset import SliceDataset  # noqa: E402
from microseg.data.phantom import NATIVE_SIZE, simulate_dataset  # noqa: E402
from microseg.losses import DeepSupervision  # noqa: E402
from microseg.models import build_model  # noqa: E402
from microseg.runtime import resolve_device  # noqa: E402
from microseg.train import train_step  # noqa: E402

SIZES = {"small": 128, "tiny": 128}  # input size per config; the others at the paper's 224


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Loop:
    """One training loop under test: its data pipeline, its own copy of the model and optimizer, its step."""

    def __init__(self, label: str, dataset: Dataset, model: nn.Module, config: TrainConfig, reference: bool,
                 device: torch.device, max_iter: int):
        self.label, self.dataset, self.config, self.reference = label, dataset, config, reference
        self.device = device
        self.model = copy.deepcopy(model).to(device).train()
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.criterion = DeepSupervision(config.loss, config.ds_kernel_sizes, config.ds_weights).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.scheduler = torch.optim.lr_scheduler.PolynomialLR(self.optimizer, total_iters=max_iter,
                                                               power=config.poly_power)
        self.rates: list[float] = []  # images/s of each timed round

    def epoch(self, epoch: int, steps: int) -> tuple[int, float]:
        """`steps` training steps from a fresh DataLoader; returns (images, seconds)."""
        if isinstance(self.dataset, SliceDataset):
            self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(epoch)
        sampler = RandomSampler(self.dataset, num_samples=steps * self.config.batch_size, generator=generator)
        images = 0
        sync(self.device)
        start = time.perf_counter()
        loader = DataLoader(self.dataset, batch_size=self.config.batch_size, sampler=sampler, generator=generator,
                            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda")
        with reference_hard_region() if self.reference else contextlib.nullcontext():
            for batch in loader:
                train_step(self.model, self.criterion, self.optimizer, self.scaler, batch, self.device, self.config)
                self.scheduler.step()
                images += len(batch["image"])
        sync(self.device)
        return images, time.perf_counter() - start


def plan(name: str, device: torch.device, args: argparse.Namespace) -> tuple[int, int]:
    """(rounds, steps per round) for a config: the flags, else the defaults of the module docstring."""
    paper_on_cpu = device.type == "cpu" and name not in SIZES
    rounds = args.rounds or (1 if paper_on_cpu else 3)
    steps = args.steps or (3 if paper_on_cpu else 12 if device.type == "cpu" else 24)
    return rounds, steps


def bench_config(name: str, size: int, cache: Path, pngs: list, device: torch.device,
                 args: argparse.Namespace) -> list[list[str]]:
    rounds, steps = plan(name, device, args)
    base = TrainConfig(loss=args.loss, model=name, batch_size=args.batch, num_workers=args.workers)
    variants = [("ours: HDF5 cache, on-device hard region, fp32", base)]
    if args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cuda"):
        variants += [("ours, bf16 autocast", dataclasses.replace(base, amp="bf16")),
                     ("ours, bf16 autocast + channels_last", dataclasses.replace(base, amp="bf16", channels_last=True))]
    torch.manual_seed(0)
    model = build_model(name, img_size=size)
    max_iter = 1 + rounds * steps + 1
    loops = [Loop(label, SliceDataset(cache, augment=True, seed=config.seed), model, config, False, device, max_iter)
             for label, config in variants]
    loops.append(Loop("reference: PNG per slice, host-OpenCV hard region, fp32", PngSlices(pngs, seed=0, size=size), model,
                      base, True, device, max_iter))
    del model
    for loop in loops:
        loop.epoch(0, 1)  # warm-up
    for r in range(1, rounds + 1):
        for loop in loops if r % 2 else loops[::-1]:
            images, seconds = loop.epoch(r, steps)
            loop.rates.append(images / seconds)
            print(f"{name} round {r}: {loop.label}: {loop.rates[-1]:.2f} images/s", file=sys.stderr, flush=True)
    rates = [statistics.median(loop.rates) for loop in loops]
    return [[f"{name} ({size} px)", loop.label, f"{rounds} x {steps}", f"{rate:.2f}", f"{rate / rates[-1]:.2f}x"]
            for loop, rate in zip(loops, rates)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "R50-ViT-B_16"],
                        help="model configs (small/tiny at 128 px, the others at 224 px)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per round (default: see above)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per loop (default: see above)")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of both loops (default: the reference's 8, at most the core count)")
    parser.add_argument("--loss", choices=HARD_REGION_LOSSES, default="ag_bce")
    parser.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                        help="also time ours with bf16 autocast (+ channels_last); auto: on CUDA")
    parser.add_argument("--train", type=int, default=3, help="phantom training patients (default 3)")
    parser.add_argument("--slices", type=int, default=16, help="slices per patient (default 16)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_start = os.getloadavg()[0]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = simulate_dataset(tmp / "data", n_train=args.train, n_test=0, n_slices=args.slices)
        pngs = write_pngs(data, tmp / "png", 1)
        for name in args.configs:
            size = SIZES.get(name, 224)
            cache = tmp / f"cache{size}.h5"
            if not cache.exists():
                prepare_cache(data, cache, size)
            rows += bench_config(name, size, cache, pngs, device, args)

    cpu = hardware(torch.device("cpu"))
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"\n{cpu}, {os.cpu_count()} cores{gpu}; training on {device.type}; load average "
          f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"{args.train * args.slices} phantom slices ({args.train} patients x {args.slices}) at "
          f"{NATIVE_SIZE[0]} x {NATIVE_SIZE[1]}; batch {args.batch}, {args.workers} workers, deep-supervised "
          f"{args.loss} (4 scales), SGD; each loop: 1 warm-up step, then rounds x steps timed, each round a fresh "
          "DataLoader (worker start-up included), loops alternating\n")
    print("| config | loop | rounds x steps | images/s (median of rounds) | vs reference |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
