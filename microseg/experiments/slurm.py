"""Submit an experiment's cells to SLURM as one job array, and read which are queued or running.

`submit` writes `EXP/slurm/array-<n>.sh` (task i runs `microseg experiment cell EXP <cell i>` with
this process's Python, sys.executable, and its PYTHONPATH, from this working folder), submits it
with `sbatch --parsable --array=0-<n-1>` plus --partition, --time, --gpus-per-task and every
pass-through option, records {cell: "<job>_<task>"} in `EXP/slurm/jobs.json` and returns. Each
task's output goes to its cell's log. Which cells are queued or running comes from `squeue`
(without accounting SLURM has no `sacct` history): a cell not in the queue is judged by its
run folder, so a failed or timed-out cell is resubmitted by running the plan again (SIGTERM at
the time limit saves the position inside the epoch in `last.pt` first).

The scheduler's answers are parsed strictly, never guessed: sbatch's output must be one line
`<job>` or `<job>;<cluster>` (digits), else nothing is recorded; squeue is asked for the recorded
jobs only, in an explicit format, and every line must read `<job>_<task>|<STATE>` (or a pending
range `<job>_[0-3,5%2]`); when squeue fails, times out or prints anything else, the cells'
states are unknown (`QueueState.reason`), never "not queued"; jobs.json must map cells of the
experiment to `<digits>_<digits>`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from microseg.core.atomic import write_text
from microseg.core.errors import MicrosegError
from microseg.experiments.experiment import Cell, Experiment

ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")
SQUEUE_TIMEOUT = 120
"""Seconds squeue may take (it retries an unreachable controller) before the queue is unknown."""
_SBATCH_LINE = re.compile(r"(\d+)(;[^;\s]+)?")
_TASK = re.compile(r"\d+_\d+")
_QUEUE_LINE = re.compile(r"(\d+)_(\d+|\[[\d,%-]+\])\|([A-Z_]+)")


def check_slurm() -> None:
    """MicrosegError unless sbatch and squeue are on the PATH (before anything is created)."""
    missing = [tool for tool in ("sbatch", "squeue") if shutil.which(tool) is None]
    if missing:
        raise MicrosegError(f"--executor slurm: {' and '.join(missing)} not found on the PATH (no SLURM client here)")


def _jobs_file(experiment: Experiment) -> Path:
    return experiment.path / "slurm" / "jobs.json"


def submitted(experiment: Experiment) -> dict[str, str]:
    """{cell id: SLURM task id ('<job>_<index>')} of the latest submission of each cell; MicrosegError
    naming the file (and the entry) unless it maps cells of this experiment to '<digits>_<digits>'."""
    path = _jobs_file(experiment)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise MicrosegError(f"{path} is not a SLURM job record (a JSON mapping of cell id -> <job>_<task>)")
    cells = {cell.id for cell in experiment.cells}
    for cell_id, task in record.items():
        if cell_id not in cells:
            raise MicrosegError(f"{path}: entry {cell_id!r} is not a cell of {experiment.plan_file}")
        if not isinstance(task, str) or not _TASK.fullmatch(task):
            raise MicrosegError(f"{path}: entry {cell_id!r}: {task!r} is not a SLURM task id (<job>_<task>)")
    return record


@dataclass(frozen=True)
class QueueState:
    """What squeue says of the submitted cells: `active` {cell id: state, lower case} of those still
    queued or running; when squeue could not be read, `reason` ("squeue failed: ...") and every
    submitted cell in `unknown`."""

    active: dict[str, str] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()
    reason: str = ""


def queue_state(experiment: Experiment) -> QueueState:
    """The `QueueState` of the experiment's submitted cells (none submitted: nothing queued)."""
    tasks = submitted(experiment)
    if not tasks:
        return QueueState()
    try:
        queue = _squeue(sorted({task.split("_")[0] for task in tasks.values()}, key=int))
    except _Unreadable as err:
        return QueueState(unknown=tuple(tasks), reason=f"squeue failed: {err}")
    active = {}
    for cell_id, task in tasks.items():
        job, index = map(int, task.split("_"))
        state = next((s for j, spec, s in queue if j == job and _in_range(index, spec)), None)
        if state in ACTIVE_STATES:
            active[cell_id] = state.lower()
    return QueueState(active)


class _Unreadable(Exception):
    """squeue could not be run or its answer could not be read."""


def _squeue(jobs: list[str]) -> list[tuple[int, str, str]]:
    """(job, task or '[range]', STATE) of every task of `jobs` squeue lists; _Unreadable otherwise.

    A lone job id is given twice: squeue exits 1 ("Invalid job id specified") when its only job
    has left the controller's memory, and lists nothing for it among others."""
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T"]
    command.append(f"--jobs={','.join(jobs * 2 if len(jobs) == 1 else jobs)}")
    if shutil.which("squeue") is None:
        raise _Unreadable("not found on the PATH")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise _Unreadable(f"no answer in {SQUEUE_TIMEOUT} s") from None
    except OSError as err:
        raise _Unreadable(str(err)) from None
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip() or "no message").splitlines()[-1]
        raise _Unreadable(f"exit status {result.returncode}: {message}")
    rows = []
    for line in filter(None, (line.strip() for line in result.stdout.splitlines())):
        match = _QUEUE_LINE.fullmatch(line)
        if match is None:
            raise _Unreadable(f"it printed {line[:120]!r}, not <job>_<task>|<STATE>")
        rows.append((int(match[1]), match[2], match[3]))
    return rows


def _in_range(index: int, spec: str) -> bool:
    """Whether `index` is squeue's task `spec`: '3', or a pending range '[0-3,5%2]'."""
    if spec.isdigit():
        return int(spec) == index
    for part in spec.strip("[]").split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and int(low) <= index <= int(high or low):
            return True
    return False


def parse_sbatch(output: str) -> str:
    """The job id of `sbatch --parsable`'s output: exactly one non-empty line `<job>` or
    `<job>;<cluster>`, the job all digits; MicrosegError naming what it printed otherwise."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    match = _SBATCH_LINE.fullmatch(lines[0]) if len(lines) == 1 else None
    if match is None:
        raise MicrosegError(
            f"sbatch --parsable printed {output[:200]!r}, not a job id (<digits> or <digits>;<cluster>): "
            "nothing recorded; if it queued a job array, cancel it (squeue --me) before running the plan again"
        )
    return match[1]


def submit(
    experiment: Experiment,
    cells: list[Cell],
    partition: str | None = None,
    time: str | None = None,
    gpus: int | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> str:
    """Submit `cells` as one job array; returns the job id. Refused by sbatch, or answered with
    anything but a job id, its script is removed and jobs.json is left as it was."""
    check_slurm()
    earlier = submitted(experiment)
    folder = experiment.path / "slurm"
    numbers = [int(p.stem[6:]) for p in folder.glob("array-*.sh") if p.stem[6:].isdigit()]
    script = folder / f"array-{max(numbers, default=0) + 1}.sh"
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
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            raise MicrosegError(f"sbatch refused the job array: {message[-1] if message else 'no message'}")
        job = parse_sbatch(result.stdout)
    except BaseException:
        script.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()
        raise
    tasks = earlier | {cell.id: f"{job}_{i}" for i, cell in enumerate(cells)}
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
