"""Benchmark microseg.metrics.hd95 against medpy.metric.binary.hd95 in the same run.

Synthetic prostate-like masks at the native 962 x 1372 slice size and 0.033586 mm pixels:
a smooth star-shaped outline (ellipse with low-order radial harmonics) whose size follows a
sweep (small near both ends, large mid-sweep); the prediction is the reference with its own
small outline perturbation and shift. Checks that both agree to 1e-6 and prints a markdown table.

    python scripts/bench_metrics.py [--slices 30] [--depth 40] [--sz 1.0]   (microseg installed, or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib.metadata import version

import numpy as np
from medpy.metric import binary as medpy_binary

from microseg.metrics import hd95

H, W, PIXEL_MM = 962, 1372, 0.033586


def outline_mask(rng: np.random.Generator, t: float, jitter: np.ndarray | None = None) -> np.ndarray:
    """Star-shaped mask of sweep position t in [0, 1]; `jitter` (4 values) perturbs a copy."""
    size = np.sin(np.pi * (0.08 + 0.84 * t)) ** 0.7
    cy, cx, ry, rx = 0.55 * H, 0.5 * W, 0.33 * H * size, 0.30 * W * size
    amp, phase = rng.uniform(0, 0.06, 4), rng.uniform(0, 2 * np.pi, 4)
    if jitter is not None:
        cy, cx, amp = cy + jitter[0], cx + jitter[1], amp + jitter[2:3] * rng.uniform(-1, 1, 4)
        phase = phase + jitter[3] * rng.uniform(-1, 1, 4)
    y, x = np.ogrid[:H, :W]
    theta = np.arctan2((y - cy) / ry, (x - cx) / rx)
    radius = 1 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(zip(amp, phase, strict=True)))
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= radius**2


def pair(seed: int, t: float) -> tuple[np.ndarray, np.ndarray]:
    ref = outline_mask(np.random.default_rng(seed), t)
    shift = np.random.default_rng(seed + 10_000).normal(0, 6, 2)
    pred = outline_mask(np.random.default_rng(seed), t, np.array([shift[0], shift[1], 0.02, 0.15]))
    return pred, ref


def timed(fn) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def compare(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float, float]:
    """(|difference| mm, medpy seconds, ours seconds), medpy timed first."""
    reference, t_medpy = timed(lambda: medpy_binary.hd95(pred, ref, voxelspacing=spacing))
    ours, t_ours = timed(lambda: hd95(pred, ref, spacing))
    return abs(ours - reference), t_medpy, t_ours


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=30, help="native-size 2D slices")
    parser.add_argument("--depth", type=int, default=40, help="slices in the 3D volume (0 skips it)")
    parser.add_argument("--sz", type=float, default=1.0, help="slice spacing (mm) of the 3D volume")
    args = parser.parse_args()

    rows = []
    slices = [pair(i, t) for i, t in enumerate(np.linspace(0, 1, args.slices))]
    results = np.array([compare(p, r, (PIXEL_MM, PIXEL_MM)) for p, r in slices])
    rows.append((f"2D slice {H}x{W}", args.slices, results[:, 0].max(), *results[:, 1:].mean(0) * 1e3))

    if args.depth:
        pairs = [pair(100 + z, t) for z, t in enumerate(np.linspace(0, 1, args.depth))]
        pred, ref = np.stack([p for p, _ in pairs]), np.stack([r for _, r in pairs])
        diff, t_medpy, t_ours = compare(pred, ref, (args.sz, PIXEL_MM, PIXEL_MM))
        rows.append((f"3D volume {args.depth}x{H}x{W}, sz {args.sz} mm", 1, diff, t_medpy * 1e3, t_ours * 1e3))

    print(
        f"HD95, microseg vs medpy {version('medpy')} (same run, one thread each); CPU: {cpu_model()}, "
        f"{os.cpu_count()} threads; in-plane spacing {PIXEL_MM} mm\n"
    )
    print("| case | n | max abs diff (mm) | medpy ms/case | microseg ms/case | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, diff, ms_medpy, ms_ours in rows:
        print(f"| {name} | {n} | {diff:.1e} | {ms_medpy:.1f} | {ms_ours:.1f} | {ms_medpy / ms_ours:.1f}x |")
    worst = max(row[2] for row in rows)
    if worst > 1e-6:
        raise SystemExit(f"mismatch: max |difference| {worst:.3g} mm > 1e-6")


if __name__ == "__main__":
    main()
