"""`microseg experiment run` and `status`: open the plan, skip finished cells, run or submit the others.

A rerun of the same plan trains nothing for a finished cell (its files are not touched), resumes
an interrupted one from `last.pt`, evaluates a trained one, and retries a failed one. Before any
cell runs, every cell's run folder is checked (`microseg.experiments.cell.check_cell_folder`): one deleted,
locked by a live process or holding another config stops the command with one line.

One owner: `experiment run` holds the experiment's lock (`EXP/.lock`, like a run's) from before
its first write to its end, local run or SLURM submission alike; a second runner is refused
naming the first one's pid (cells keep their own run locks). `status` and `compare` only read.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microseg.core.atomic import make_folder
from microseg.core.errors import MicrosegError
from microseg.core.runtime import device_name, resolve_device
from microseg.core.stop import StopSignals
from microseg.experiments.cell import cell_state, check_cell_folder, write_oof
from microseg.experiments.experiment import Experiment, load_experiment, open_experiment
from microseg.runs.folder import RunLock

EXECUTORS = ("local", "slurm")


def run_experiment(
    out: str,
    plan_values: dict[str, Any],
    add: bool = False,
    executor: str = "local",
    jobs: int = 1,
    device: str = "auto",
    slurm: dict[str, Any] | None = None,
) -> Experiment:
    """Open (or create) the experiment at `out` and run its unfinished cells; returns it.

    The experiment's lock is held from before its first write to the end (`owned`). Local: the
    cells run here, in `jobs` workers, and the command ends when they have; a failed cell is one
    line at the end naming each failed cell (exit status 2), the others still run. SLURM: the
    unfinished cells not queued or running are submitted as one job array and the command
    returns. Ctrl-C, SIGTERM and SIGHUP stop it (`microseg.core.stop`): no new cell starts.
    """
    if executor not in EXECUTORS:
        raise MicrosegError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise MicrosegError(f"--jobs must be >= 1, got {jobs}")
    (resolve_device if executor == "local" else device_name)(device)  # train's rule; SLURM's nodes are not this one
    if executor == "slurm":
        from microseg.experiments.slurm import check_slurm

        check_slurm()
    with StopSignals(), owned(Path(out)):
        experiment = open_experiment(out, plan_values, add)
        _run(experiment, executor, jobs, device, slurm)
    return experiment


def _run(experiment: Experiment, executor: str, jobs: int, device: str, slurm: dict[str, Any] | None) -> None:
    active: dict[str, str] = {}
    if executor == "slurm":
        from microseg.experiments.slurm import queue_state

        queue = queue_state(experiment)
        if queue.unknown:
            raise MicrosegError(
                f"cannot tell which cells of {experiment.path} are still queued in SLURM ({queue.reason}): "
                "nothing submitted; run the plan again once squeue answers"
            )
        active = queue.active
    states = {}
    for cell in experiment.cells:
        if cell.id not in active:
            check_cell_folder(experiment, cell)
            states[cell.id] = cell_state(experiment, cell).name
    todo = [cell for cell in experiment.cells if cell.id not in active and states[cell.id] != "done"]
    finished = sum(1 for state in states.values() if state == "done")
    print(
        f"experiment {experiment.path}: {len(experiment.cells)} cell(s), {finished} done"
        + (f", {len(active)} queued or running in SLURM" if active else "")
        + f", {len(todo)} to run",
        flush=True,
    )
    if executor == "slurm":
        from microseg.experiments.slurm import submit

        if todo:
            submit(experiment, todo, **(slurm or {}))
        return
    from microseg.experiments.local import run_local

    failed = run_local(experiment, todo, jobs, device) if todo else []
    oof = write_oof(experiment) if todo or not experiment.oof_file.is_file() else experiment.oof_file
    if oof is not None and oof.is_file():
        print(f"out-of-fold per-patient scores: {oof}")
    if failed:
        names = ", ".join(line.split(": ", 1)[0] for line in failed)
        raise MicrosegError(
            f"{len(failed)} of {len(experiment.cells)} cells failed: {names} (first: {failed[0]}); their logs "
            f"are in {experiment.path / 'logs'}; run the plan again to retry them"
        )


class ExperimentLock(RunLock):
    """`EXP/.lock`, held by the one process running the experiment (an exclusive flock holding its pid)."""

    def refusal(self, holder: str) -> str:
        return (
            f"experiment {self.run} is being run by another microseg process (pid {holder}); "
            "wait for it to end (`microseg experiment status` reads it meanwhile)"
        )


@contextlib.contextmanager
def owned(out: Path) -> Iterator[None]:
    """Hold the experiment's lock while the block writes the experiment: `out` is created (if new) and
    locked before anything is written in it, so a second runner, of any plan, is refused naming
    this one's pid and writes nothing; the lock dies with its process (kill -9 too). The folders
    this call created are removed again if the block leaves them empty (a refused plan)."""
    created = [p for p in (out, *out.parents) if not p.exists()]
    lock = ExperimentLock(out)
    for attempt in range(3):  # a refused runner may remove the new folder just before our lock is in it
        make_folder(out)
        try:
            lock.acquire()
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        yield
    finally:
        lock.release()
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break


def experiment_status(path: str) -> str:
    """Every cell's state, read from its run folder (and SLURM's queue when cells were submitted)."""
    experiment = load_experiment(path)
    from microseg.experiments.slurm import QueueState, queue_state

    queue = queue_state(experiment) if (experiment.path / "slurm").is_dir() else QueueState()
    rows: list[str] = []
    counts: Counter[str] = Counter()
    for cell in experiment.cells:
        state = cell_state(experiment, cell)
        described, counted = state.describe(), state.name
        if state.name not in ("done", "running") and cell.id in queue.active:
            described = f"{queue.active[cell.id]} in SLURM" + (f" ({described})" if state.name != "pending" else "")
            counted = "queued"
        elif state.name not in ("done", "running") and cell.id in queue.unknown:
            described, counted = f"unknown ({queue.reason})", "unknown"
        counts[counted] += 1
        fold = "-" if cell.fold is None else str(cell.fold)
        rows.append(f"  {cell.id:<40} {cell.loss:<24} {cell.seed:>6} {fold:>4}  {described}")
    plan = experiment.plan
    head = (
        f"experiment {experiment.path}: {len(plan.losses)} loss(es) x {len(plan.seeds)} seed(s) x "
        f"{plan.folds or 'no'} fold(s) = {len(experiment.cells)} cell(s): "
        + ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    )
    title = f"  {'cell':<40} {'loss':<24} {'seed':>6} {'fold':>4}  state"
    oof = experiment.oof_file
    tail = [f"out-of-fold scores: {oof}"] if plan.folds and oof.is_file() else []
    return "\n".join([head, title, *rows, *tail])
