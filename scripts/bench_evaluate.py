"""Benchmark `microseg evaluate` on one native-size volume against medpy scoring, in one run.

One test patient of a phantom at 962 x 1372 (`--data`, else one of `--slices` slices, default
250, is simulated first with one training patient: a few minutes) is evaluated end to end by
`microseg.evaluation.evaluate.evaluate` in a child process: the six NIfTI files read, the tiny model's
forward (trained 2 epochs on the training patient, or `--random-weights`: ragged masks, HD95's
worst case), the probabilities back to native size, the prediction written, the model and the
four other annotators scored, the hard region and the expert's descriptors; everything
evaluate computes. The reference, in another child process, is MicroSegNet's test-script
scoring of one annotation of the same volume: medpy `dc` and `hd95` per slice where both masks
are non-empty (the non-expert against the expert, arrays already in memory). Each child's peak
resident memory is its VmHWM (/proc/self/status); evaluate's seconds are timed inside its
child (imports excluded; the whole command's wall time is printed beside).

    python scripts/bench_evaluate.py                          # simulate, then measure
    python scripts/bench_evaluate.py --data /tmp/native       # reuse a phantom with one test/ patient
    python scripts/bench_evaluate.py --slices 8 --size 240 343  # a quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

EVALUATE = """
import json, sys, time
start = time.perf_counter()
from microseg.evaluation.evaluate import evaluate
imported = time.perf_counter()
evaluate(sys.argv[1], sys.argv[2], device=sys.argv[3])
print(json.dumps({"imports": imported - start, "evaluate": time.perf_counter() - imported, "peak_mb": peak_mb()}))
"""

REFERENCE = """
import json, sys, time
import nibabel as nib
import numpy as np
from medpy.metric import binary
start = time.perf_counter()
pred, ref = (np.asarray(nib.load(p).dataobj).transpose(2, 1, 0) > 0 for p in sys.argv[1:3])
sx, sy, _ = nib.load(sys.argv[1]).header.get_zooms()
read = time.perf_counter()
both = [z for z in range(len(ref)) if pred[z].any() and ref[z].any()]
dsc = [binary.dc(pred[z], ref[z]) for z in both]
hd = [binary.hd95(pred[z], ref[z], voxelspacing=(sy, sx)) for z in both]
print(json.dumps({"read": read - start, "score": time.perf_counter() - read, "slices": len(both),
                  "dsc": float(np.mean(dsc)), "hd95": float(np.mean(hd)), "peak_mb": peak_mb()}))
"""
PEAK = """
def peak_mb():
    \"\"\"This process's peak resident memory (VmHWM: since its exec, unlike ru_maxrss).\"\"\"
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
"""


def child(code: str, *args: str) -> tuple[dict, float]:
    """Run `code` in a fresh interpreter: (its JSON line, with its peak resident MB; wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK + code, *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def tiny_run(data: Path, run: Path, size: int, trained: bool = True, device: str = "cpu") -> None:
    """A run folder holding the tiny model at `size` px: trained 2 epochs on the phantom's train
    split (a prediction shaped like a segmentation, ~2k border pixels per slice), or with random
    weights and its output bias at the 70th percentile of its logits on the test volume (about
    30 % foreground in ragged blobs, ~60k border pixels per slice: HD95's worst case)."""
    import numpy as np
    import torch

    from microseg.core.preprocess import Preprocess, resize_image
    from microseg.data.prepare import prepare_cache
    from microseg.data.volumes import read_volume
    from microseg.models import build_model
    from microseg.runs.checkpoint import Checkpoint, save_checkpoint
    from microseg.runs.config import TrainConfig
    from microseg.training.trainer import train

    if trained:
        cache = prepare_cache(data, run.parent / "bench_cache.h5", size=size)
        config = dict(cache=str(cache), run=str(run), model="tiny", epochs=2, batch_size=8, lr=3e-3)
        train(TrainConfig(**config, optimizer="adam", augment=False, device=device, seed=0))
        return
    torch.manual_seed(0)
    model = build_model("tiny", img_size=size).eval()
    image = read_volume(sorted((data / "test" / "micro_ultrasound_scans").glob("*.nii*"))[0]).array
    x = torch.from_numpy(np.stack([resize_image(s, size) for s in image[:: max(1, len(image) // 16)]]))
    with torch.no_grad():
        logits = model(x.float()[:, None] / 254).logits
    state = model.state_dict()
    state["seg_head.bias"] -= torch.quantile(logits.flatten(), 0.7)
    save_checkpoint(Checkpoint(state, asdict(model.config), Preprocess(size=size)), run / "last.pt")


def main() -> None:
    import nibabel as nib
    import torch
    from bench_losses import hardware

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="phantom folder whose test/ holds one patient (default: simulate)")
    parser.add_argument("--slices", type=int, default=250, help="slices of the simulated patient (default 250)")
    parser.add_argument("--size", type=int, nargs=2, default=[962, 1372], metavar=("H", "W"))
    parser.add_argument("--model-size", type=int, default=224, help="the tiny model's input size (default 224)")
    parser.add_argument("--device", default="cpu", help="evaluate's device (cpu, cuda)")
    parser.add_argument(
        "--random-weights", action="store_true", help="the untrained tiny model (ragged masks) instead of 2 epochs"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from microseg.data.phantom import simulate_dataset

            data = simulate_dataset(
                Path(tmp) / "phantom", n_train=1, n_test=1, n_slices=args.slices, size=tuple(args.size)
            )
        cases = sorted((data / "test" / "micro_ultrasound_scans").glob("*.nii*"))
        if len(cases) != 1:
            raise SystemExit(f"{data}/test must hold exactly one patient (found {len(cases)})")
        run = Path(tmp) / "run"
        tiny_run(data, run, args.model_size, trained=not args.random_weights, device=args.device)
        case_id = cases[0].name.split("_")[-1].split(".")[0]
        masks = [
            data / "test" / f"{kind}_annotations" / f"{name}_annotation_test_{case_id}.nii.gz"
            for kind, name in (("non_expert", "nonexpert"), ("expert", "expert"))
        ]
        reference, _ = child(REFERENCE, *map(str, masks))
        ours, ours_wall = child(EVALUATE, str(run), str(data), args.device)
        shape = nib.load(cases[0]).shape[::-1]
    ratio = ours["evaluate"] / reference["score"]
    print(
        f"\n{hardware(torch.device(args.device))}; one volume of {' x '.join(map(str, shape))}, tiny model at "
        f"{args.model_size} px ({'random weights' if args.random_weights else 'trained 2 epochs'}), evaluate on {args.device}\n"
    )
    print("| stage | seconds per volume | peak memory (MB) |")
    print("| --- | ---: | ---: |")
    print(
        f"| evaluate: read 6 files, predict, write, score model + 4 raters, hard region, descriptors "
        f"| {ours['evaluate']:.2f} | {ours['peak_mb']:.0f} |"
    )
    print(
        f"| reference: medpy dc + hd95 per slice, one annotation ({reference['slices']} slices) "
        f"| {reference['score']:.2f} | {reference['peak_mb']:.0f} |"
    )
    print(f"| ratio evaluate / reference | {ratio:.2f} | |")
    print(
        f"\nevaluate command wall {ours_wall:.1f} s (imports {ours['imports']:.1f} s, model loading included); "
        f"reference read its two files in {reference['read']:.1f} s (not counted)"
    )


if __name__ == "__main__":
    main()
