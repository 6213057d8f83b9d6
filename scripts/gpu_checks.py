"""CUDA checks of training and evaluation on a machine with a GPU (the first part of bench_gpu.sh).

Every check runs even when an earlier one fails; the failures are listed at the end (exit status 1).
On a small phantom set (24 training slices, the `tiny` model at 64 px, global batch 5: batches of
5, 5, 5, 5 and 4):
1. `--amp auto` resolves to bf16 on a GPU of compute capability 8.0 or later, fp16 below;
2. bf16: 2 epochs uninterrupted; the same run with Ctrl-C (a real SIGINT) in the 3rd step of epoch
   2, then `--resume`: Ctrl-C exits 130 with the position saved at the end of that step, the
   resumed run's learning rates equal the uninterrupted run's, its losses are finite, and the
   largest weight difference to the uninterrupted run is printed (cuDNN's autotuner and atomics
   make GPU runs differ in the last bits);
3. fp16 with the grad scaler: 2 epochs, finite losses, the scaler's state in the checkpoint;
4. `--compile` (inductor) for an epoch: one graph, no graph break, no recompile at the last batch;
5. `evaluate` of the bf16 run on the GPU (in its training's precision).

    python scripts/gpu_checks.py
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microseg.cli import main as microseg  # noqa: E402
from microseg.core.runtime import resolve_amp  # noqa: E402
from microseg.core.tables import read_csv  # noqa: E402
from microseg.training.trainer import Trainer  # noqa: E402

TINY = [
    "--model",
    "tiny",
    "--epochs",
    "2",
    "--batch-size",
    "5",
    "--optimizer",
    "adam",
    "--lr",
    "3e-3",
    "--val-fraction",
    "0.25",
    "--num-workers",
    "2",
    "--seed",
    "7",
    "--device",
    "cuda",
]


def sigint_at(call: int):
    """Patch the trainer so that its `call`-th step sends this process a SIGINT (as a terminal's Ctrl-C)."""
    real, calls = Trainer.train_step, {"n": 0}

    def step(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch)

    Trainer.train_step = step
    return lambda: setattr(Trainer, "train_step", real)


def train(cache: Path, run: Path, *options: str) -> None:
    code = microseg(["train", "--cache", str(cache), "--run", str(run), *TINY, *options])
    assert code == 0, f"train exited {code}"


def history(run: Path) -> list[dict]:
    return read_csv(run / "history.csv")


def finite(run: Path) -> None:
    bad = [row for row in history(run) if not math.isfinite(float(row["loss"]))]
    assert not bad, f"non-finite epoch loss in {run}: {bad}"


def check_amp_auto(_: Path, __: Path) -> None:
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    expected = "bf16" if capability >= (8, 0) else "fp16"
    got = resolve_amp("auto", device)
    print(f"   {torch.cuda.get_device_name(device)}, capability {capability}: --amp auto -> {got}")
    assert got == expected, f"--amp auto gave {got}, expected {expected}"


def check_bf16_resume(cache: Path, tmp: Path) -> None:
    full, cut = tmp / "bf16_full", tmp / "bf16_cut"
    train(cache, full, "--amp", "bf16")
    restore = sigint_at(5 + 3)  # 5 steps an epoch: the 3rd step of epoch 2
    try:
        code = microseg(["train", "--cache", str(cache), "--run", str(cut), *TINY, "--amp", "bf16"])
    finally:
        restore()
    assert code == 130, f"Ctrl-C: exit {code}, expected 130"
    state = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 3), (
        f"saved position {(state['epoch'], state['step'])}, expected (1, 3)"
    )
    assert microseg(["train", "--run", str(cut), "--resume"]) == 0, "--resume failed"
    lrs = [[float(row["lr"]) for row in history(run)] for run in (full, cut)]
    assert lrs[0] == lrs[1], f"learning rates differ: {lrs}"
    finite(cut)
    a = torch.load(full / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)["model"]
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    print(f"   resumed vs uninterrupted: largest weight difference {diff:.3g}")


def check_fp16(cache: Path, tmp: Path) -> None:
    run = tmp / "fp16"
    train(cache, run, "--amp", "fp16")
    finite(run)
    scaler = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["scaler"]
    print(f"   grad scaler: scale {scaler.get('scale')}, growth tracker {scaler.get('_growth_tracker')}")
    assert scaler.get("scale"), "fp16 checkpoint holds no grad scaler state"


def check_compile(cache: Path, tmp: Path) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    started = time.perf_counter()
    train(cache, tmp / "compiled", "--amp", "bf16", "--compile", "--epochs", "1")
    graphs, breaks, recompiles = (
        counters["stats"]["unique_graphs"],
        sum(counters["graph_break"].values()),
        sum(counters["recompiles"].values()),
    )
    print(
        f"   {graphs} graph(s), {breaks} graph break(s), {recompiles} recompile(s), "
        f"{time.perf_counter() - started:.1f} s with compilation"
    )
    assert graphs == 1 and not breaks and not recompiles


def check_evaluate(cache: Path, tmp: Path) -> None:
    run = tmp / "bf16_full"
    code = microseg(["evaluate", "--run", str(run), "--data", str(tmp / "data"), "--device", "cuda"])
    assert code == 0 and (run / "metrics" / "per_patient.csv").is_file(), f"evaluate exited {code}"


CHECKS = [
    ("--amp auto", check_amp_auto),
    ("bf16 training, Ctrl-C, resume", check_bf16_resume),
    ("fp16 training with the grad scaler", check_fp16),
    ("--compile", check_compile),
    ("evaluate on the GPU", check_evaluate),
]


def main() -> int:
    from microseg.data.phantom import simulate_dataset
    from microseg.data.prepare import prepare_cache

    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device")
        return 1
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, under any launcher
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = simulate_dataset(tmp / "data", n_train=4, n_test=2, n_slices=8, size=(96, 128), seed=3)
        cache = prepare_cache(data, tmp / "cache.h5", size=64)
        for name, check in CHECKS:
            print(f"-- {name}", flush=True)
            started = time.perf_counter()
            try:
                check(cache, tmp)
                print(f"   ok ({time.perf_counter() - started:.1f} s)", flush=True)
            except Exception as err:  # noqa: BLE001 -- every check runs; the failures are listed at the end
                traceback.print_exc()
                failures.append(f"{name}: {type(err).__name__}: {err}")
    if failures:
        print(f"gpu_checks: {len(failures)} of {len(CHECKS)} check(s) failed:")
        print("\n".join(f"  {line}" for line in failures))
        return 1
    print(f"gpu_checks: all {len(CHECKS)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
