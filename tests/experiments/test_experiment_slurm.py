"""The SLURM executor. Against a real SLURM (CI starts a single-node cluster: .ci/slurm.sh): a job
array per submission, nothing resubmitted while queued, failed cells resubmitted by a rerun, and
a finished experiment submits nothing. Against fake `sbatch` / `squeue` scripts on the PATH, one
per class of answer: every answer that is not a job id or a readable queue is refused or reported
as unknown, and a jobs record that is not cells -> task ids is refused naming the entry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from cli_helpers import one_error, run_cli, snapshot
from experiment_helpers import experiment_args, patients_of
from microseg.experiments.experiment import load_experiment


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


@pytest.mark.slow
@pytest.mark.skipif(_no_slurm() is not None, reason=str(_no_slurm()))
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


def fake_tool(folder, name: str, stdout: str = "", code: int = 0, stderr: str = "") -> None:
    """`folder/name`: prints `stdout` (and `stderr`), exits `code`, appends its arguments to name.args."""
    folder.mkdir(exist_ok=True)
    for part, text in (("out", stdout), ("err", stderr)):
        (folder / f"{name}.{part}").write_text(text)
    script = folder / name
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{folder}/{name}.args"\ncat "{folder}/{name}.out"\n'
        f'cat "{folder}/{name}.err" >&2\nexit {code}\n'
    )
    script.chmod(0o755)


@pytest.fixture
def slurm_bin(tmp_path, monkeypatch):
    """A folder first on the PATH for fake sbatch / squeue (fake_tool); both answer plainly at first."""
    folder = tmp_path / "bin"
    fake_tool(folder, "sbatch", "4242\n")
    fake_tool(folder, "squeue", "")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def slurm_args(cache, phantom, out) -> list:
    return experiment_args(cache, phantom, out, seeds=(1,)) + ["--executor", "slurm"]


@pytest.mark.parametrize(
    "printed",
    ["", "\n", "Submitted batch job 4242\n", "sbatch: note\n4242\n", "4242\n4243\n", "42a\n", "4242;c;d\n", "-42\n"],
)
def test_an_sbatch_answer_that_is_not_a_job_id_records_nothing(printed, slurm_bin, cache, phantom, tmp_path, capsys):
    out = tmp_path / "exp"
    fake_tool(slurm_bin, "sbatch", printed)
    code, _, err = run_cli(slurm_args(cache, phantom, out), capsys)
    one_error(code, err, f"sbatch --parsable printed {printed!r}", "nothing recorded")
    assert not (out / "slurm").exists()  # no script, no jobs.json

    fake_tool(slurm_bin, "sbatch", "4242\n")
    assert run_cli(slurm_args(cache, phantom, out), capsys)[0] == 0
    assert sorted(p.name for p in (out / "slurm").iterdir()) == ["array-1.sh", "jobs.json"]
    fake_tool(slurm_bin, "sbatch", printed)  # a resubmission refused: the first record stays as it was
    before = snapshot(out / "slurm")
    code, _, err = run_cli(slurm_args(cache, phantom, out), capsys)
    one_error(code, err, f"sbatch --parsable printed {printed!r}")
    assert snapshot(out / "slurm") == before


@pytest.mark.parametrize("printed, job", [("4242\n", "4242"), ("77;cluster-a\n", "77"), ("  9001 \n\n", "9001")])
def test_a_job_id_is_recorded_for_each_task(printed, job, slurm_bin, cache, phantom, tmp_path, capsys):
    out = tmp_path / "exp"
    fake_tool(slurm_bin, "sbatch", printed)
    code, _, err = run_cli(slurm_args(cache, phantom, out), capsys)
    assert code == 0, err
    cells = [cell.id for cell in load_experiment(out).cells]
    assert json.loads((out / "slurm" / "jobs.json").read_text()) == {c: f"{job}_{i}" for i, c in enumerate(cells)}
    assert (slurm_bin / "sbatch.args").read_text().split()[0] == "--parsable"


SQUEUE_FAILURES = {
    "exit 1 with a message": ("", 1, "slurm_load_jobs error: Unable to contact slurm controller\n", "exit status 1"),
    "exit 1, nothing printed": ("", 1, "", "no message"),
    "exit 0, another format": ("4242_0 PENDING\n", 0, "", "'4242_0 PENDING'"),
    "exit 0, a header": ("JOBID|STATE\n4242_0|PENDING\n", 0, "", "'JOBID|STATE'"),
    "exit 0, a task not a number": ("4242_x|PENDING\n", 0, "", "'4242_x|PENDING'"),
    "exit 0, no state": ("4242_0|\n", 0, "", "'4242_0|'"),
}


@pytest.mark.parametrize("failure", SQUEUE_FAILURES)
def test_a_queue_that_cannot_be_read_is_unknown_never_pending(failure, slurm_bin, cache, phantom, tmp_path, capsys):
    out = tmp_path / "exp"
    assert run_cli(slurm_args(cache, phantom, out), capsys)[0] == 0
    printed, code, message, needle = SQUEUE_FAILURES[failure]
    fake_tool(slurm_bin, "squeue", printed, code, message)
    before = snapshot(out / "slurm")
    code, _, err = run_cli(slurm_args(cache, phantom, out), capsys)
    one_error(code, err, "cannot tell which cells", "squeue failed", needle)
    assert snapshot(out / "slurm") == before  # nothing resubmitted
    code, status, err = run_cli(["experiment", "status", out], capsys)
    assert code == 0 and "Traceback" not in err, err
    lines = [line for line in status.splitlines() if "focal" in line or "ag_bce" in line]
    assert len(lines) == 2 and all("unknown (squeue failed: " in line and needle in line for line in lines)
    assert "pending" not in status and "2 unknown" in status


def test_squeue_is_asked_for_the_recorded_jobs_in_an_explicit_format(slurm_bin, cache, phantom, tmp_path, capsys):
    out = tmp_path / "exp"
    assert run_cli(slurm_args(cache, phantom, out), capsys)[0] == 0
    fake_tool(slurm_bin, "squeue", "4242_0|PENDING\n4242_1|RUNNING\n")
    code, printed, err = run_cli(slurm_args(cache, phantom, out), capsys)
    assert code == 0 and "2 queued or running in SLURM, 0 to run" in printed, printed + err
    asked = (slurm_bin / "squeue.args").read_text().splitlines()[-1].split()
    assert {"--noheader", "--array", "--format=%i|%T"} <= set(asked)
    assert "--jobs=4242,4242" in asked  # one job named twice: squeue fails on a lone id it has forgotten
    code, status, _ = run_cli(["experiment", "status", out], capsys)
    assert "pending in SLURM" in status and "running in SLURM" in status and "2 queued" in status


@pytest.mark.parametrize(
    "queue, queued",
    [
        ("4242_[0-1]|PENDING\n", 2),
        ("4242_[1,3%2]|PENDING\n", 1),
        ("4242_0|COMPLETED\n4242_1|FAILED\n", 0),
        ("", 0),
        ("4242_0|RUNNING\n9_1|PENDING\n", 1),
    ],
)
def test_only_tasks_squeue_lists_as_active_are_left_alone(queue, queued, slurm_bin, cache, phantom, tmp_path, capsys):
    out = tmp_path / "exp"
    assert run_cli(slurm_args(cache, phantom, out), capsys)[0] == 0
    fake_tool(slurm_bin, "squeue", queue)
    fake_tool(slurm_bin, "sbatch", "4243\n")
    code, printed, err = run_cli(slurm_args(cache, phantom, out), capsys)
    assert code == 0, err
    assert f"{2 - queued} to run" in printed
    tasks = json.loads((out / "slurm" / "jobs.json").read_text())
    assert sum(task.startswith("4243_") for task in tasks.values()) == 2 - queued


@pytest.mark.parametrize(
    "record, needle",
    [
        ("not json", "is not a SLURM job record"),
        ('["4242_0"]', "is not a SLURM job record"),
        ('{"nobody__s1": "4242_0"}', "entry 'nobody__s1' is not a cell"),
        ('{"CELL": "4242"}', "entry 'CELL': '4242' is not a SLURM task id"),
        ('{"CELL": 4242}', "entry 'CELL': 4242 is not a SLURM task id"),
        ('{"CELL": "4242_0_1"}', "'4242_0_1' is not a SLURM task id"),
        ('{"CELL": ""}', "entry 'CELL': '' is not a SLURM task id"),
        ('{"CELL": "x_0"}', "'x_0' is not a SLURM task id"),
    ],
)
def test_a_damaged_jobs_record_is_refused_naming_the_entry(record, needle, slurm_bin, cache, phantom, tmp_path, capsys):
    out = tmp_path / "exp"
    assert run_cli(slurm_args(cache, phantom, out), capsys)[0] == 0
    cell = load_experiment(out).cells[0].id
    jobs = out / "slurm" / "jobs.json"
    jobs.write_text(record.replace("CELL", cell))
    for args in (slurm_args(cache, phantom, out), ["experiment", "status", out]):
        code, _, err = run_cli(args, capsys)
        one_error(code, err, str(jobs), needle.replace("CELL", cell))
    assert not (out / "slurm" / "array-2.sh").exists()
