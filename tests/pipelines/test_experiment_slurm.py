"""The SLURM executor against a real SLURM (CI starts a single-node cluster: .ci/slurm.sh): a job
array per submission, nothing resubmitted while queued, failed cells resubmitted by a rerun, and
a finished experiment submits nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from cli_helpers import run_cli
from microseg.experiment import load_experiment
from test_experiment import experiment_args, patients_of


def _no_slurm() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return "no SLURM client (sbatch, squeue) on the PATH; .ci/slurm.sh starts a single-node cluster"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol ping failed: {err}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"no SLURM controller reachable: {(ping.stdout + ping.stderr).strip()}"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_no_slurm() is not None, reason=str(_no_slurm()))]


def wait_for(job: str, timeout: float = 900) -> None:
    """Until no task of `job` is in SLURM's queue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i", f"--jobs={job}"], capture_output=True, text=True
        )
        if not queue.stdout.strip():
            return
        time.sleep(2)
    raise AssertionError(f"SLURM job {job} still queued after {timeout} s")


def test_cells_run_as_a_job_array_and_failed_ones_are_resubmitted(cache, phantom, tmp_path, capsys):
    own_cache = tmp_path / "cache.h5"
    shutil.copy(cache, own_cache)
    out = tmp_path / "exp"
    args = experiment_args(own_cache, phantom, out, seeds=(1,)) + ["--executor", "slurm", "--time", "20"]
    code, printed, err = run_cli(args + ["--sbatch=--hold"], capsys)
    assert code == 0, err
    assert "submitted 2 cell(s) as SLURM job array" in printed
    script = (out / "slurm" / "array-1.sh").read_text()
    assert f"exec {sys.executable} -m microseg experiment cell" in script and "#SBATCH --time=20" in script
    assert "#SBATCH --hold" in script and "#SBATCH --array=0-1" in script
    tasks = json.loads((out / "slurm" / "jobs.json").read_text())
    job = next(iter(tasks.values())).split("_")[0]
    assert sorted(tasks.values()) == [f"{job}_0", f"{job}_1"]

    code, printed, err = run_cli(args, capsys)  # held in the queue: nothing is submitted again
    assert code == 0 and "2 queued or running in SLURM, 0 to run" in printed, printed + err
    assert not (out / "slurm" / "array-2.sh").exists()
    code, status, _ = run_cli(["experiment", "status", out], capsys)
    assert "2 queued" in status and "pending in SLURM" in status

    own_cache.rename(tmp_path / "moved.h5")  # the held cells will fail: their cache is gone
    subprocess.run(["scontrol", "release", job], check=True)
    wait_for(job)
    code, status, _ = run_cli(["experiment", "status", out], capsys)
    assert "2 failed" in status and "cache not found" in status, status

    (tmp_path / "moved.h5").rename(own_cache)
    code, printed, err = run_cli(args, capsys)
    assert code == 0 and "0 done, 2 to run" in printed, printed + err
    resubmitted = json.loads((out / "slurm" / "jobs.json").read_text())
    second = next(iter(resubmitted.values())).split("_")[0]
    assert second != job
    wait_for(second)
    code, status, _ = run_cli(["experiment", "status", out], capsys)
    assert "2 done" in status, status + "".join(p.read_text() for p in (out / "logs").glob("*"))
    for cell in load_experiment(out).cells:
        assert patients_of(cell.run / "metrics" / "per_patient.csv") == ["01", "02"]
    code, printed, _ = run_cli(args, capsys)
    assert code == 0 and "2 done, 0 to run" in printed and not (out / "slurm" / "array-3.sh").exists()
