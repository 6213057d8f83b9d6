"""Submit an experiment's cells to SLURM as one job array, and read which are queued or running.

`submit` writes `EXP/slurm/array-<n>.sh` (task i runs `microseg experiment cell EXP <cell i>` with
this process's Python, sys.executable, and its PYTHONPATH, from this working folder), submits it
with `sbatch --parsable --array=0-<n-1>` plus --partition, --time, --gpus-per-task and every
pass-through option, records {cell: "<job>_<task>"} in `EXP/slurm/jobs.json` and returns. Each
task's output goes to its cell's log. Which cells are queued or running comes from `squeue`
(without accounting SLURM has no `sacct` history): a cell not in the queue is judged by its
run folder, so a failed or timed-out cell is resubmitted by running the plan again (SIGTERM at
the time limit saves the position inside the epoch in `last.pt` first).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from microseg.atomic import write_text
from microseg.errors import MicrosegError
from microseg.experiment import Cell, Experiment

ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def check_slurm() -> None:
    """MicrosegError unless sbatch and squeue are on the PATH (before anything is created)."""
    missing = [tool for tool in ("sbatch", "squeue") if shutil.which(tool) is None]
    if missing:
        raise MicrosegError(f"--executor slurm: {' and '.join(missing)} not found on the PATH (no SLURM client here)")


def _jobs_file(experiment: Experiment) -> Path:
    return experiment.path / "slurm" / "jobs.json"


def submitted(experiment: Experiment) -> dict[str, str]:
    """{cell id: SLURM task id ('<job>_<index>')} of the latest submission of each cell."""
    path = _jobs_file(experiment)
    if not path.is_file():
        return {}
    try:
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError):
        raise MicrosegError(f"{path} is not a readable SLURM job record") from None


def active_jobs(experiment: Experiment, required: bool = True) -> dict[str, str]:
    """{cell id: state} of the cells whose latest task is still in SLURM's queue (pending, running...).

    `required` False (status): without a reachable squeue, no cell is reported as queued.
    """
    tasks = submitted(experiment)
    if not tasks:
        return {}
    if shutil.which("squeue") is None:
        if required:
            check_slurm()
        return {}
    result = subprocess.run(["squeue", "--noheader", "--array", "--format=%i|%T"], capture_output=True, text=True)
    if result.returncode != 0:
        if not required:
            return {}
        raise MicrosegError(f"squeue failed: {(result.stderr or result.stdout).strip().splitlines()[0]}")
    queue = dict(line.strip().split("|", 1) for line in result.stdout.splitlines() if "|" in line)
    array_jobs = {task.split("_")[0] for task in tasks.values()}
    pending = {job: state for job, state in queue.items() if "_[" in job and job.split("_")[0] in array_jobs}
    active = {}
    for cell_id, task in tasks.items():
        job, index = task.split("_")
        state = queue.get(task) or next(
            (s for j, s in pending.items() if j.split("_")[0] == job and _in_range(int(index), j.split("_", 1)[1])),
            None,
        )
        if state in ACTIVE_STATES:
            active[cell_id] = state.lower()
    return active


def _in_range(index: int, spec: str) -> bool:
    """Whether `index` is in squeue's pending-array spec ('[0-3,5%2]')."""
    for part in spec.strip("[]").split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and int(low) <= index <= int(high or low):
            return True
    return False


def submit(
    experiment: Experiment,
    cells: list[Cell],
    partition: str | None = None,
    time: str | None = None,
    gpus: int | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> str:
    """Submit `cells` as one job array; returns the job id."""
    check_slurm()
    folder = experiment.path / "slurm"
    number = len(list(folder.glob("array-*.sh"))) + 1 if folder.is_dir() else 1
    script = folder / f"array-{number}.sh"
    options = [
        f"--job-name=microseg-{experiment.path.resolve().name}",
        f"--array=0-{len(cells) - 1}",
        f"--output={(experiment.path / 'logs').resolve()}/slurm-%A_%a.out",
    ]
    options += [f"--partition={partition}"] if partition else []
    options += [f"--time={time}"] if time else []
    options += [f"--gpus-per-task={gpus}"] if gpus else []
    options += list(extra)
    write_text(script, _script(experiment, cells, options))
    (experiment.path / "logs").mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        script.unlink(missing_ok=True)
        message = (result.stderr or result.stdout).strip().splitlines()
        raise MicrosegError(f"sbatch refused the job array: {message[-1] if message else 'no message'}")
    job = result.stdout.strip().split(";")[0]
    tasks = submitted(experiment) | {cell.id: f"{job}_{i}" for i, cell in enumerate(cells)}
    write_text(_jobs_file(experiment), json.dumps(tasks, indent=1) + "\n")
    print(
        f"submitted {len(cells)} cell(s) as SLURM job array {job} ({script}); follow them with "
        f"`microseg experiment status {experiment.path}`; run the plan again to resubmit failed or "
        "timed-out cells",
        flush=True,
    )
    return job


def _script(experiment: Experiment, cells: list[Cell], options: list[str]) -> str:
    """The array's batch script: task i runs cell i with this Python and PYTHONPATH, from this folder."""
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(
        dict.fromkeys([package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    )
    ids = " ".join(shlex.quote(cell.id) for cell in cells)
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        f"cd {shlex.quote(os.getcwd())}",
        f"export PYTHONPATH={shlex.quote(path)}",
        f"cells=({ids})",
        'cell="${cells[$SLURM_ARRAY_TASK_ID]}"',
        f"exec {shlex.quote(sys.executable)} -m microseg experiment cell "
        f'{shlex.quote(str(experiment.path.resolve()))} "$cell" >> '
        f'{shlex.quote(str((experiment.path / "logs").resolve()))}/"$cell".log 2>&1',
    ]
    return "\n".join(lines) + "\n"
