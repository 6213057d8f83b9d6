"""Benchmark the TransUNet configs: parameters, forward FLOPs, forward and train-step times.

For each config: parameters, FLOPs of one eval forward at 224 x 224, batch 1 (torch's
FlopCounterMode: matmuls and convolutions, 2 FLOPs per multiply-add), and the best time of an
eval forward and of a train step (forward with the deep-supervision heads, BCE on every head,
backward, SGD with momentum and weight decay) on each device (CPU, and CUDA when present).
The reference row is timm's own `vit_base_r50_s16_224` encoder (all tokens, no decoder) timed the
same way in the same run; the repeats of all rows are interleaved so that load from other
processes hits every row alike, and the whole model's cost is printed as a ratio to it.
`--compile` adds torch.compile (inductor) timings after checking that it matches eager.

    python scripts/bench_model.py                    # tiny, small, R50-ViT-B_16 (CPU: about 2-3 min)
    python scripts/bench_model.py --large --amp      # + R50-ViT-L_16, autocast (bf16 CPU / fp16 CUDA)
    python scripts/bench_model.py --configs tiny --compile
    python scripts/bench_model.py --threads 1        # steadier when other jobs share the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microseg.models import CONFIGS, build_model  # noqa: E402

REFERENCE = "timm vit_base_r50_s16_224 encoder (reference)"


class ThreeChannel(nn.Module):
    """timm's encoder fed like ours: 1 channel repeated to 3; returns all tokens (no pooling)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x.expand(-1, 3, -1, -1))


@dataclass
class Job:
    label: str
    make: Callable[[], nn.Module]
    paper_sized: bool
    gflops: float = 0.0
    cells: list[str] = field(default_factory=list)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"CPU: {cpu}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, timm {timm.__version__}"
    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name()}"
    return text


def forward_gflops(make: Callable[[], nn.Module], size: int) -> float:
    with torch.device("meta"):
        model = make().eval()
        x = torch.zeros(1, 1, size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 1e9


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """All logits of a TransUNet, or the tokens of the reference encoder."""
    out = model(x)
    return [out.logits, *out.aux] if hasattr(out, "logits") else [out]


def step_fns(model: nn.Module, batch: int, size: int, device: torch.device, amp: bool):
    """(eval forward, train step) closures on fixed random data."""
    x = torch.rand(batch, 1, size, size, device=device)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

    def forward() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            outputs(model, x)

    def train() -> None:
        model.train()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = sum(
                F.binary_cross_entropy_with_logits(o.float(), F.interpolate(target, size=o.shape[-2:]))
                if o.ndim == 4
                else o.float().square().mean()  # reference encoder: tokens
                for o in outputs(model, x)
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return forward, train


def interleaved_best(fns: list[Callable[[], None]], device: torch.device, repeats: int) -> list[float]:
    """Best (least) seconds of each fn: one warm-up round, then `repeats` rounds over all fns in turn.

    The minimum, as timeit advises: on a shared machine the other processes only ever add time.
    """
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, spent in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                spent.append(time.perf_counter() - start)
    return [min(t) for t in times]


def check_compiled(model: nn.Module, batch: int, size: int, device: torch.device) -> tuple[nn.Module, str]:
    """torch.compile (inductor, one graph); the first eval call's time and its max difference to eager."""
    compiled = torch.compile(model, fullgraph=True)
    x = torch.rand(batch, 1, size, size, device=device)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        got = compiled(x).logits
        seconds = time.perf_counter() - start
        error = (got - model(x).logits).abs().max().item()
    return compiled, f"first call {seconds:.0f} s, max diff {error:.1e}"


def bench_device(jobs: list[Job], device: torch.device, args: argparse.Namespace) -> None:
    fns, notes, batches = [], [], []
    for job in jobs:
        torch.manual_seed(0)
        model = job.make().to(device)
        batch = 2 if job.paper_sized and device.type == "cpu" else 8
        pair = list(step_fns(model, batch, args.size, device, args.amp))
        note = ""
        if args.compile and job.label != REFERENCE:
            compiled, note = check_compiled(model, batch, args.size, device)
            pair += step_fns(compiled, batch, args.size, device, args.amp)
        fns.append(pair)
        notes.append(note)
        batches.append(batch)
        job.cells = [
            job.label,
            device.type,
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f} M",
            f"{job.gflops:.2f}",
            str(batch),
        ]
    best = iter(interleaved_best([fn for pair in fns for fn in pair], device, args.repeats))
    for job, pair, note in zip(jobs, fns, notes, strict=True):
        ms = [f"{next(best) * 1e3:.0f}" for _ in pair]
        job.cells += ms[:2]
        if args.compile:
            job.cells.append(f"{ms[2]} / {ms[3]} ({note})" if len(ms) == 4 else "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small", "R50-ViT-B_16"], choices=list(CONFIGS))
    parser.add_argument("--large", action="store_true", help="also R50-ViT-L_16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (CPU, and CUDA when present), cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="autocast: bf16 on CPU, fp16 (+GradScaler) on CUDA")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile on CPU)")
    parser.add_argument("--no-reference", action="store_true", help="skip timm's encoder alone")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: its default); 1 is far steadier on a CPU shared with other jobs",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.configs + (["R50-ViT-L_16"] if args.large and "R50-ViT-L_16" not in args.configs else [])
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]

    jobs = []
    for name in names:
        jobs.append(Job(name, lambda n=name: build_model(n, img_size=args.size), name.startswith("R50")))
        if name == "R50-ViT-B_16" and not args.no_reference:
            jobs.append(
                Job(
                    REFERENCE,
                    lambda: ThreeChannel(
                        timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0, img_size=args.size)
                    ),
                    True,
                )
            )
    for job in jobs:
        job.gflops = forward_gflops(job.make, args.size)

    header = ["model", "device", "params", f"GFLOPs fwd {args.size}px b1", "batch", "forward ms", "train step ms"]
    header += ["compiled fwd / train ms"] if args.compile else []
    precision = "autocast bf16 (CPU) / fp16 (CUDA)" if args.amp else "fp32"
    print(
        f"{hardware()}; {precision}; best of {args.repeats} interleaved rounds after 1 warm-up round; "
        "train step = forward + BCE on every head + backward + SGD step"
    )
    for device in devices:
        bench_device(jobs, device, args)
        print("\n| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for job in jobs:
            print("| " + " | ".join(job.cells) + " |", flush=True)
        cells = {job.label: job.cells for job in jobs}
        if "R50-ViT-B_16" in cells and REFERENCE in cells:
            ours, ref = cells["R50-ViT-B_16"], cells[REFERENCE]
            forward, step, flops = (float(ours[i]) / float(ref[i]) for i in (5, 6, 3))
            print(
                f"\n{device.type}: whole R50-ViT-B_16 TransUNet / timm encoder alone: forward x{forward:.2f}, "
                f"train step x{step:.2f}, FLOPs x{flops:.2f}"
            )


if __name__ == "__main__":
    main()
