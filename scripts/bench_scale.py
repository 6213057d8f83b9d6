"""Benchmark the host stages at the real dataset's scale: check, prepare and evaluate with --jobs.

A phantom at 962 x 1372 (`--data`: a folder with train/ and test/ patients, else `--train` +
`--test` patients of `--slices` slices are simulated, with `--jobs 1` and `--jobs N`, and timed)
goes through `microseg check`, `microseg prepare` and `microseg evaluate` (the tiny model
trained 2 epochs on the training patients, on the CPU; see bench_evaluate.py) as separate
commands, with `--jobs 1` and `--jobs N` (default: the number of cores). Each command runs under `/usr/bin/time`: its wall seconds and the peak resident
memory of its largest process (the command or one of its workers). Per-patient seconds divide
the wall time by the patients the stage reads (simulate and check: train + test; prepare: train,
plus the test split's check; evaluate: test); the extrapolation multiplies them by the real
dataset's 55 training and 20 test patients.

    python scripts/bench_scale.py --data /tmp/native              # an existing native-size phantom
    python scripts/bench_scale.py --train 2 --test 2 --slices 250   # simulate first (minutes per patient)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

REAL = {"train": 55, "test": 20}


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MB of its largest process) of a microseg command."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", report.name, sys.executable, "-m", "microseg", *command],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if done.returncode:
            raise SystemExit(f"microseg {' '.join(command)} failed:\n{done.stderr}")
        wall, kb = report.read().split()[-2:]
    return float(wall), float(kb) / 1024


def row(stage: str, jobs: int, n: int, wall: float, peak: float, real: int) -> str:
    """A table row: `n` patients in `wall` seconds, extrapolated to `real` patients."""
    return f"| {stage} | {jobs} | {n} | {wall:.1f} | {wall / n:.1f} | {peak:.0f} | {real * wall / n / 60:.1f} |"


def main() -> None:
    from bench_evaluate import tiny_run

    from microseg.core.parallel import cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="phantom folder with train/ and test/ (default: simulate)")
    parser.add_argument("--train", type=int, default=2, help="training patients to simulate (default 2)")
    parser.add_argument("--test", type=int, default=2, help="test patients to simulate (default 2)")
    parser.add_argument("--slices", type=int, default=250, help="slices per simulated patient (default 250)")
    parser.add_argument("--jobs", type=int, default=cores(), help="the parallel run's --jobs (default: cores)")
    args = parser.parse_args()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            for jobs in dict.fromkeys((1, args.jobs)):
                data = Path(tmp) / f"phantom{jobs}"
                split = ["--train", str(args.train), "--test", str(args.test), "--slices", str(args.slices)]
                wall, peak = timed(["simulate", "--out", str(data), *split, "--jobs", str(jobs)])
                rows.append(row("simulate", jobs, args.train + args.test, wall, peak, sum(REAL.values())))
                notes.append(
                    f"simulate --jobs {jobs}: {wall / ((args.train + args.test) * args.slices):.3f} s per slice"
                )
        patients = {split: len(list((data / split / "micro_ultrasound_scans").glob("*.nii*"))) for split in REAL}
        run = Path(tmp) / "run"
        tiny_run(data, run, 224)
        stages = {
            "check": (["check", "--data", str(data), "--json", str(Path(tmp) / "check.json")], ("train", "test")),
            "prepare": (["prepare", "--data", str(data), "--out", str(Path(tmp) / "cache.h5")], ("train",)),
            "evaluate": (["evaluate", "--run", str(run), "--data", str(data), "--device", "cpu"], ("test",)),
        }
        for jobs in dict.fromkeys((1, args.jobs)):
            for stage, (command, splits) in stages.items():
                (Path(tmp) / "cache.h5").unlink(missing_ok=True)
                (Path(tmp) / "cache.check.json").unlink(missing_ok=True)
                wall, peak = timed([*command, "--jobs", str(jobs)])
                n = sum(patients[s] for s in splits)
                rows.append(row(stage, jobs, n, wall, peak, sum(REAL[s] for s in splits)))
    print(f"\n{patients['train']} + {patients['test']} patients of {data}; {cores()} cores\n")
    print("| stage | --jobs | patients | wall s | s per patient | peak MB (largest process) | real dataset, min |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
