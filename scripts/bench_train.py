"""Benchmark training: images/s of the reference-style loop against microseg's, FLOPs and MFU.

All loops run in this run, on the same native-size (962 x 1372) phantom set, the same model
(built once, copied), SGD with poly decay, the same batch size, workers and deep-supervised loss
(4 scales; the adaptive focal loss by default), through the same step function
(`microseg.training.trainer.train_step`):
(a) reference (MicroSegNet's way): one PNG per slice decoded with OpenCV and resized on every
    item (`bench_data.PngSlices`), a fresh DataLoader each epoch, fp32, the hard region on the
    host with OpenCV and device <-> host copies (`bench_losses.reference_hard_region`), torch's
    default SGD and a `.item()` of the loss after every step;
(b) microseg fp32: `SliceDataset` over the HDF5 slice cache (augmented, seeded per item) through
    the trainer's loader (persistent workers, pinned on CUDA), the hard region on the device, the
    trainer's optimizer (fused) and `LossMonitor` (losses summed on the device, read every
    `--sync-every` steps and at each round's end);
(c) (b) with bf16 autocast; (d) (c) + channels_last (its effect alone); (e) (c) + torch.compile of
the model and the loss together (the trainer's `--compile`).
(c) to (e) run on CUDA by default (`--fast yes` adds them on the CPU, where (e) compiles for over ten
minutes on 2 cores: `--no-compile` skips it).
A round is `steps` batches (drawn from the phantom slices, repeating them as needed), timed from
the round's first batch request to the last step (CUDA synchronised); each loop first takes one
untimed warm-up round of 2 steps (compilation for (e)), and the loops take their rounds in turn,
in alternating order, so that they share the machine's noise; a loop's figure is the median of its
rounds' images/s. Training FLOPs per image = 3 x the forward's (torch's FlopCounterMode on the meta
device; backward = 2 x forward); MFU = images/s x FLOPs per image / `--peak-tflops` (default: the
detected GPU's dense bf16 peak, looked up by its exact name in `BF16_PEAK_TFLOPS`, e.g. 989.4 TFLOP/s
for an H100 SXM, 756.5 for an H100 PCIe).

    python scripts/bench_train.py --device cuda --configs R50-ViT-B_16          # the GPU figures
    python scripts/bench_train.py --configs small --steps 6 --rounds 2 --threads 1  # CPU: a few minutes
    python scripts/bench_train.py --configs small --steps 2 --rounds 1 --profile 3   # + torch.profiler table
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
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

SCRIPTS = Path(__file__).resolve().parent
sys.path[:0] = [str(SCRIPTS), str(SCRIPTS.parent)]
from bench_data import PngSlices, write_pngs  # noqa: E402
from bench_losses import HARD_REGION_LOSSES, hardware, reference_hard_region  # noqa: E402
from bench_model import forward_gflops  # noqa: E402

from microseg.core.runtime import resolve_device  # noqa: E402
from microseg.data.dataset import SliceDataset  # noqa: E402
from microseg.data.order import EpochItems  # noqa: E402
from microseg.data.phantom import NATIVE_SIZE, simulate_dataset  # noqa: E402
from microseg.data.prepare import prepare_cache  # noqa: E402
from microseg.losses import DeepSupervision  # noqa: E402
from microseg.models import build_model  # noqa: E402
from microseg.runs.config import TrainConfig  # noqa: E402
from microseg.training.loaders import build_loader  # noqa: E402
from microseg.training.monitor import LossMonitor  # noqa: E402
from microseg.training.step import ModelWithLoss, compile_step, train_step  # noqa: E402
from microseg.training.trainer import build_optimizer  # noqa: E402

SIZES = {"small": 128, "tiny": 128}  # input size per config; the others at the paper's 224
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity, FP32 accumulate) from the vendors' data sheets,
# keyed by torch.cuda.get_device_name exactly: an H100 PCIe is not an H100 SXM, an L40 not an L4.
# Another GPU: --peak-tflops N.
BF16_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,  # H200 SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.1,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "NVIDIA GeForce RTX 4090": 165.2,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def detected_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return BF16_PEAK_TFLOPS.get(torch.cuda.get_device_name(device))


class RoundSampler(Sampler):
    """(round, index) pairs: `n` indices drawn with replacement, seeded by the round."""

    def __init__(self, size: int, n: int):
        self.size, self.n, self.round = size, n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.round)
        return ((self.round, i) for i in torch.randint(self.size, (self.n,), generator=generator).tolist())


class Loop:
    """One training loop under test: its data pipeline, its own copy of the model and optimizer, its step."""

    def __init__(
        self,
        label: str,
        dataset: Dataset,
        model: nn.Module,
        config: TrainConfig,
        reference: bool,
        device: torch.device,
        max_iter: int,
        steps: int,
    ):
        self.label, self.config, self.reference, self.device = label, config, reference, device
        self.model = copy.deepcopy(model).to(device).train()
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        criterion = DeepSupervision(config.loss, config.ds_kernel_sizes, config.ds_weights).to(device)
        step, self.stat_keys = ModelWithLoss(self.model, criterion), criterion.sample_stat_keys
        self.step = compile_step(step) if config.compile else step
        params = list(self.model.parameters())
        self.optimizer = (
            torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
            if reference
            else build_optimizer(config, params)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.scheduler = torch.optim.lr_scheduler.PolynomialLR(
            self.optimizer, total_iters=max_iter, power=config.poly_power
        )
        self.dataset, self.steps = dataset, steps
        if not reference:  # the trainer's loader: built once, workers persist across rounds
            self.sampler = RoundSampler(len(dataset), steps * config.batch_size)
            self.loader = build_loader(EpochItems(dataset), config, device, self.sampler)
        self.rates: list[float] = []  # images/s of each timed round

    def _reference_loader(self, epoch: int, steps: int) -> DataLoader:
        generator = torch.Generator().manual_seed(epoch)
        sampler = RandomSampler(self.dataset, num_samples=steps * self.config.batch_size, generator=generator)
        return DataLoader(
            self.dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def epoch(self, epoch: int, steps: int) -> tuple[int, float]:
        """`steps` training steps; returns (images, seconds)."""
        images, monitor = 0, LossMonitor(len(self.config.ds_kernel_sizes) + 2, self.config.sync_every, self.device)
        sync(self.device)
        start = time.perf_counter()
        if self.reference:
            loader = self._reference_loader(epoch, steps)
        else:
            self.sampler.round, self.sampler.n, loader = epoch, steps * self.config.batch_size, self.loader
        with reference_hard_region() if self.reference else contextlib.nullcontext():
            for batch in loader:
                losses = train_step(
                    self.step, self.optimizer, self.scaler, batch, self.device, self.config, self.stat_keys
                )
                self.scheduler.step()
                if self.reference:
                    float(losses.total.item())  # the reference's per-step host read
                else:
                    monitor.add(losses.as_tensor(self.device))
                    if monitor.full:
                        monitor.read()
                images += len(batch["image"])
        if monitor.count:
            monitor.read()
        sync(self.device)
        return images, time.perf_counter() - start


def plan(name: str, device: torch.device, args: argparse.Namespace) -> tuple[int, int]:
    """(rounds, steps per round): the flags, else CPU small 3 x 12, CPU paper config 1 x 3, CUDA 3 x 30."""
    paper_on_cpu = device.type == "cpu" and name not in SIZES
    rounds = args.rounds or (1 if paper_on_cpu else 3)
    steps = args.steps or (3 if paper_on_cpu else 12 if device.type == "cpu" else 30)
    return rounds, steps


def variants(base: TrainConfig, device: torch.device, args: argparse.Namespace) -> list[tuple[str, TrainConfig, bool]]:
    """(label, config, reference?) of each loop, (a) to (e)."""
    fp32 = dataclasses.replace(base, amp="none")
    loops = [
        ("(a) reference: PNG per item, host-OpenCV hard region, fp32, .item() per step", fp32, True),
        ("(b) microseg fp32", fp32, False),
    ]
    if args.fast == "yes" or (args.fast == "auto" and device.type == "cuda"):
        bf16 = dataclasses.replace(base, amp="bf16")
        loops += [
            ("(c) microseg bf16", bf16, False),
            ("(d) microseg bf16 + channels_last", dataclasses.replace(bf16, channels_last=True), False),
        ]
        if not args.no_compile:
            loops.append(
                ("(e) microseg bf16 + torch.compile (model and loss)", dataclasses.replace(bf16, compile=True), False)
            )
    return loops


def profile_steps(loop: Loop, device: torch.device, steps: int) -> None:
    """torch.profiler over `steps` steps of `loop` (the last, fastest variant): the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        loop.epoch(10_000, steps)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {loop.label}, {steps} steps, by {key}:", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=20), file=sys.stderr, flush=True)


def bench_config(
    name: str, size: int, cache: Path, pngs: list, device: torch.device, args: argparse.Namespace
) -> list[list[str]]:
    rounds, steps = plan(name, device, args)
    base = TrainConfig(
        loss=args.loss, model=name, batch_size=args.batch, num_workers=args.workers, sync_every=args.sync_every
    )
    torch.manual_seed(0)
    model = build_model(name, img_size=size)
    train_gflops = 3 * forward_gflops(lambda: build_model(name, img_size=size), size)
    max_iter = 2 + rounds * steps + 1
    loops = []
    for label, config, reference in variants(base, device, args):
        dataset = (
            PngSlices(pngs, seed=0, size=size) if reference else SliceDataset(cache, augment=True, seed=config.seed)
        )
        loops.append(Loop(label, dataset, model, config, reference, device, max_iter, steps))
    del model
    for loop in loops:
        loop.epoch(0, 2)  # warm-up (and compilation)
    for r in range(1, rounds + 1):
        for loop in loops if r % 2 else loops[::-1]:
            images, seconds = loop.epoch(r, steps)
            loop.rates.append(images / seconds)
            print(f"{name} round {r}: {loop.label}: {loop.rates[-1]:.2f} images/s", file=sys.stderr, flush=True)
    rates = [statistics.median(loop.rates) for loop in loops]
    if args.profile:
        profile_steps(loops[-1], device, args.profile)
    peak = args.peak_tflops or detected_peak(device)
    rows = []
    for loop, rate in zip(loops, rates, strict=True):
        mfu = f"{100 * rate * train_gflops / (peak * 1e3):.1f}%" if peak else "-"
        rows.append(
            [
                f"{name} ({size} px)",
                loop.label,
                f"{rounds} x {steps}",
                f"{rate:.2f}",
                f"{rate / rates[0]:.2f}x",
                f"{train_gflops:.1f}",
                mfu,
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["small", "R50-ViT-B_16"],
        help="model configs (small/tiny at 128 px, the others at 224 px)",
    )
    parser.add_argument("--steps", type=int, default=0, help="timed steps per round (default: see plan())")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per loop (default: see plan())")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader workers of every loop (default: the reference's 8, at most the core count)",
    )
    parser.add_argument("--loss", choices=HARD_REGION_LOSSES, default="adaptive_focal")
    parser.add_argument(
        "--fast",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also time (c) bf16, (d) bf16 + channels_last and (e) bf16 + torch.compile; auto: on CUDA",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip (e) (torch.compile takes minutes on a CPU)")
    parser.add_argument(
        "--sync-every", type=int, default=TrainConfig.sync_every, help="microseg's loss read-back interval"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="bf16 peak for the MFU (default: the GPU's by its exact name in BF16_PEAK_TFLOPS)",
    )
    parser.add_argument("--train", type=int, default=3, help="phantom training patients (default 3)")
    parser.add_argument("--slices", type=int, default=16, help="slices per patient (default 16)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after the rounds, torch.profiler over STEPS steps of the last loop (to stderr)",
    )
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

    peak = args.peak_tflops or detected_peak(device)
    print(
        f"\n{hardware(device)}; {os.cpu_count()} cores; training on {device.type}; bf16 peak "
        f"{f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}; load average "
        f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print(
        f"{args.train * args.slices} phantom slices ({args.train} patients x {args.slices}) at "
        f"{NATIVE_SIZE[0]} x {NATIVE_SIZE[1]}; batch {args.batch}, {args.workers} workers, deep-supervised "
        f"{args.loss} (4 scales), SGD; microseg reads the loss every {args.sync_every} steps; each loop: "
        "1 warm-up round of 2 steps, then rounds x steps timed, loops alternating\n"
    )
    print("| config | loop | rounds x steps | images/s (median) | vs (a) | train GFLOP/image | MFU (bf16 peak) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
