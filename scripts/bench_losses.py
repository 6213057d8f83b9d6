"""Benchmark the losses: forward + backward time of each, and their share of a paper-config train step.

Every registered loss at batch 8 x 1 x 224 x 224 (median of --repeats calls, forward + backward, the
ways compared called in turn so that they share the machine's noise);
AG-BCE and the adaptive focal loss also the reference way, in the same run: the hard region computed
as MicroSegNet does it, per sample on the host (`.cpu().numpy()`, `cv2.dilate(xor, np.ones((k, k)))`,
`torch.from_numpy(...).to(device)`) on every call, the loss math otherwise identical (the same module
with its `hard_region` swapped). Then the four-scale deep-supervised adaptive focal loss (28, 56, 112,
224; kernels 1-4) both ways, and its share of one train step of the paper model (R50-ViT-B/16
TransUNet, batch 8, SGD; median of --train-repeats steps after one warm-up).

    python scripts/bench_losses.py                 # on CUDA when present, else on the CPU
    python scripts/bench_losses.py --no-model      # losses only
    python scripts/bench_losses.py --threads 1     # one torch thread: steadier on a busy CPU
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import microseg.losses.adaptive_focal as adaptive_focal_module  # noqa: E402
import microseg.losses.ag_bce as ag_bce_module  # noqa: E402
from microseg.core.preprocess import REFERENCE_KERNEL_SIZES, Preprocess  # noqa: E402
from microseg.losses import LOSSES, SAMPLE_STAT_KEYS, DeepSupervision, build_loss, calf_stats, hard_region  # noqa: E402

HARD_REGION_LOSSES = ("ag_bce", "adaptive_focal")


def host_hard_region(expert: torch.Tensor, non_expert: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The reference way: masks to the host, XOR and cv2.dilate per sample, back to the device."""
    to_host = lambda mask: mask.detach().cpu().numpy().astype(np.uint8)  # noqa: E731
    xor = cv2.bitwise_xor(to_host(expert), to_host(non_expert))
    kernel = np.ones((kernel_size, kernel_size), np.uint8)
    for i in range(xor.shape[0]):
        xor[i, 0] = cv2.dilate(xor[i, 0], kernel)
    return torch.from_numpy(xor.astype(np.float32)).to(expert.device)


@contextlib.contextmanager
def reference_hard_region() -> Iterator[None]:
    """Swap the on-device hard region of AG-BCE and the adaptive focal loss for the host-OpenCV one."""
    modules = (ag_bce_module, adaptive_focal_module)
    saved = [m.hard_region for m in modules]
    for m in modules:
        m.hard_region = host_hard_region
    try:
        yield
    finally:
        for m, original in zip(modules, saved, strict=True):
            m.hard_region = original


def as_reference(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with reference_hard_region():
            return fn()

    return run


def median_ms(fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time of each function, called in turn within each repeat (so they share the machine's noise)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) * 1e3 for samples in times]


def ellipses(batch: int, size: int, device: torch.device, grow: float, generator: torch.Generator) -> torch.Tensor:
    """[B,1,size,size] filled ellipses (a gland-sized blob per sample); `grow` scales the radii."""
    centre = 0.5 + 0.1 * (torch.rand(batch, 2, generator=generator) - 0.5)
    radii = (0.2 + 0.15 * torch.rand(batch, 2, generator=generator)) * grow
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    dy = (yy - centre[:, :1, None]) / radii[:, :1, None]
    dx = (xx - centre[:, 1:, None]) / radii[:, 1:, None]
    inside = dy**2 + dx**2
    return (inside <= 1).float()[:, None].to(device)


def loss_step(outputs: list[torch.Tensor], call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """Forward + backward of `call()`, clearing the gradients of `outputs` first."""

    def step() -> None:
        for t in outputs:
            t.grad = None
        call().backward()

    return step


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    name = f"CPU {cpu}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return f"{name}; torch {torch.__version__}, OpenCV {cv2.__version__}"


def bench(device: torch.device, args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    b, size = args.batch, args.size
    expert = ellipses(b, size, device, 1.0, g)
    non_expert = ellipses(b, size, device, 1.04, torch.Generator().manual_seed(0)).roll(3, dims=-1)
    logits = (torch.randn(b, 1, size, size, generator=g).to(device) + 4 * (2 * expert - 1)).requires_grad_()
    stats = calf_stats(np.random.default_rng(0).gamma(4.0, 5000.0, size=2750))
    patient = {key: torch.full((b,), 0.1, device=device) for key in SAMPLE_STAT_KEYS}  # A-FL's per-patient stats
    k = REFERENCE_KERNEL_SIZES[-1]

    hard = [lambda: hard_region(expert, non_expert, k), lambda: host_hard_region(expert, non_expert, k)]
    hard_ours, hard_ref = median_ms(hard, device, args.repeats)
    speedup = f"x{hard_ref / hard_ours:.2f}"
    rows = [[f"hard region alone (k = {k}, forward)", f"{hard_ours:.2f}", f"{hard_ref:.2f}", speedup]]
    for name in sorted(LOSSES):
        loss = build_loss(name, dataset_stats=stats) if name == "calf" else build_loss(name)
        label = f"calf ({loss.branch})" if name == "calf" else name
        value = lambda loss=loss: loss(logits, expert, non_expert, patient)  # noqa: E731
        step = loss_step([logits], value)
        if name in HARD_REGION_LOSSES:
            ours, ref = median_ms([step, as_reference(step)], device, args.repeats)
            note = "" if torch.allclose(as_reference(value)(), value(), rtol=1e-6, atol=0) else " (values differ!)"
            rows.append([label, f"{ours:.2f}", f"{ref:.2f}", f"x{ref / ours:.2f}{note}"])
        else:
            rows.append([label, f"{median_ms([step], device, args.repeats)[0]:.2f}", "", ""])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)

    aux_sizes = Preprocess(size=size).scale_sizes[:-1]
    aux = [torch.randn(b, 1, s, s, generator=g).to(device).requires_grad_() for s in aux_sizes]
    ds = DeepSupervision("adaptive_focal")
    ds_step = loss_step([logits, *aux], lambda: ds(logits, aux, expert, non_expert).total)
    ds_ours, ds_ref = median_ms([ds_step, as_reference(ds_step)], device, args.repeats)
    rows.append(
        ["deep-supervised adaptive_focal (4 scales)", f"{ds_ours:.2f}", f"{ds_ref:.2f}", f"x{ds_ref / ds_ours:.2f}"]
    )

    print(
        f"\n{hardware(device)}; batch {b} x 1 x {size} x {size}, float32, forward + backward, "
        f"median of {args.repeats}\n"
    )
    print("| loss | on-device (ms) | host-OpenCV hard region, the reference way (ms) | speed-up |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

    speedups = ", ".join(f"{r[0]} {r[3]}" for r in rows if r[0] in HARD_REGION_LOSSES)
    print(f"\nTarget: AG-BCE and adaptive focal at least x10 faster than the reference way; measured: {speedups}.")
    if not args.no_model:
        train_step_share(device, args, ds, expert, non_expert, ds_ours, ds_ref)


def train_step_share(
    device: torch.device,
    args: argparse.Namespace,
    ds: DeepSupervision,
    expert: torch.Tensor,
    non_expert: torch.Tensor,
    ds_ours: float,
    ds_ref: float,
) -> None:
    """One paper-config train step's time, and the deep-supervised loss's share of it both ways."""
    from microseg.models import build_model

    b, size = args.batch, args.size
    torch.manual_seed(0)
    model = build_model("R50-ViT-B_16", img_size=size).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(b, 1, size, size, device=device)

    def train_step() -> None:
        out = model(x)
        loss = ds(out.logits, out.aux, expert, non_expert).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_ms = median_ms([train_step], device, args.train_repeats, warmup=1)[0]
    print(
        f"\nPaper-config train step (R50-ViT-B/16 TransUNet, batch {b}, SGD, deep-supervised adaptive_focal), "
        f"median of {args.train_repeats}: {step_ms:.0f} ms. Deep-supervised adaptive_focal: "
        f"{100 * ds_ours / step_ms:.2f}% of it on the device, {100 * ds_ref / step_ms:.2f}% the reference way "
        "(target: under 5%)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--no-model", action="store_true", help="skip the train step of the paper model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    bench(torch.device(auto if args.device == "auto" else args.device), args)


if __name__ == "__main__":
    main()
