"""Benchmark evaluate on one real-size volume: seconds to predict and score it, against medpy scoring.

One synthetic volume of `--slices` slices at 962 x 1372 (default 250, the real data's size; uint8
speckle) goes through `microseg.evaluate.predict_volume` (resize to the model's size, forward in
batches, probabilities back to native size, threshold) with a model of `--model` (random weights:
the time does not depend on them), then the prediction is scored against the expert the way
evaluate does it (`microseg.metrics.score_case`, protocol "microsegnet": DSC and HD95 per slice
where both masks are non-empty) and the way MicroSegNet's evaluation does it (medpy `dc` and
`hd95` per slice). The masks scored are prostate-like outlines of bench_metrics (a random model
predicts nothing useful to score): the prediction a perturbed copy of the expert. Both scorings
must agree to 1e-6.

    python scripts/bench_evaluate.py --device cuda                      # the real-size figure
    python scripts/bench_evaluate.py --slices 4 --model tiny --device cpu  # a quick check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from medpy.metric import binary as medpy_binary

SCRIPTS = Path(__file__).resolve().parent
sys.path[:0] = [str(SCRIPTS), str(SCRIPTS.parent)]
from bench_losses import hardware  # noqa: E402
from bench_metrics import H, PIXEL_MM, W, pair  # noqa: E402

from microseg.evaluate import predict_volume  # noqa: E402
from microseg.metrics import score_case  # noqa: E402
from microseg.models import build_model  # noqa: E402
from microseg.preprocess import Preprocess  # noqa: E402
from microseg.runtime import autocast_context, resolve_device  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def medpy_scores(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float]:
    """MicroSegNet's way: medpy DSC and HD95 per slice where both masks are non-empty, then the means."""
    both = [z for z in range(len(ref)) if pred[z].any() and ref[z].any()]
    dsc = [medpy_binary.dc(pred[z], ref[z]) for z in both]
    hd = [medpy_binary.hd95(pred[z], ref[z], voxelspacing=spacing) for z in both]
    return float(np.mean(dsc)), float(np.mean(hd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=250)
    parser.add_argument("--model", default="R50-ViT-B_16")
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument("--batch", type=int, default=16, help="slices per forward (evaluate's default)")
    parser.add_argument("--amp", default="none", help="autocast for the forward: none (what evaluate does), bf16, auto")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, (args.slices, H, W), dtype=np.uint8)
    pairs = [pair(z, (z + 0.5) / args.slices) for z in range(args.slices)]
    pred, ref = np.stack([p for p, _ in pairs]), np.stack([r for _, r in pairs])
    model = build_model(args.model, img_size=args.size).to(device).eval()
    preprocess = Preprocess(size=args.size, kernel_sizes=(1,))

    with torch.no_grad(), autocast_context(device, args.amp):
        predict_volume(model, volume[:args.batch], device, preprocess, args.batch)  # warm-up
        sync(device)
        start = time.perf_counter()
        predict_volume(model, volume, device, preprocess, args.batch)
        sync(device)
    t_predict = time.perf_counter() - start
    spacing = (1.0, PIXEL_MM, PIXEL_MM)
    start = time.perf_counter()
    ours = score_case(pred, ref, spacing, "microsegnet")
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    dsc, hd = medpy_scores(pred, ref, spacing[1:])
    t_medpy = time.perf_counter() - start
    assert abs(ours.dsc - dsc) < 1e-6 and abs(ours.hd95_mm - hd) < 1e-6, (ours, dsc, hd)

    print(f"\n{hardware(device)}; {args.model} at {args.size} px, batch {args.batch}, amp {args.amp}; "
          f"one volume of {args.slices} x {H} x {W}\n")
    print("| stage | seconds per volume |")
    print("| --- | ---: |")
    print(f"| predict (predict_volume) | {t_predict:.2f} |")
    print(f"| score, microseg (score_case) | {t_ours:.2f} |")
    print(f"| score, medpy per slice (MicroSegNet's way) | {t_medpy:.2f} |")
    print(f"| evaluate: predict + microseg scoring | {t_predict + t_ours:.2f} |")
    print(f"| reference: predict + medpy scoring | {t_predict + t_medpy:.2f} ({(t_predict + t_medpy) / (t_predict + t_ours):.2f}x) |")


if __name__ == "__main__":
    main()
