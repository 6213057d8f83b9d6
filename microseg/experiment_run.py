"""`microseg experiment run` and `status`: open the plan, skip finished cells, run or submit the others.

A rerun of the same plan trains nothing for a finished cell (its files are not touched), resumes
an interrupted one from `last.pt`, evaluates a trained one, and retries a failed one. Before any
cell runs, every cell's run folder is checked (`experiment_cell.check_cell_folder`): one deleted,
locked by a live process or holding another config stops the command with one line.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from microseg.errors import MicrosegError
from microseg.experiment import Experiment, load_experiment, open_experiment
from microseg.experiment_cell import cell_state, check_cell_folder, write_oof
from microseg.runtime import device_name, resolve_device

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

    Local: the cells run here, in `jobs` workers, and the command ends when they have; a failed
    cell is one line at the end (exit status 2), the others still run. SLURM: the unfinished cells
    not queued or running are submitted as one job array and the command returns.
    """
    if executor not in EXECUTORS:
        raise MicrosegError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise MicrosegError(f"--jobs must be >= 1, got {jobs}")
    (resolve_device if executor == "local" else device_name)(device)  # train's rule; SLURM's nodes are not this one
    if executor == "slurm":
        from microseg.experiment_slurm import check_slurm

        check_slurm()
    experiment = open_experiment(out, plan_values, add)
    active: dict[str, str] = {}
    if executor == "slurm":
        from microseg.experiment_slurm import queue_state

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
        from microseg.experiment_slurm import submit

        if todo:
            submit(experiment, todo, **(slurm or {}))
        return experiment
    from microseg.experiment_local import run_local

    failed = run_local(experiment, todo, jobs, device) if todo else []
    oof = write_oof(experiment) if todo or not experiment.oof_file.is_file() else experiment.oof_file
    if oof is not None and oof.is_file():
        print(f"out-of-fold per-patient scores: {oof}")
    if failed:
        raise MicrosegError(
            f"{len(failed)} of {len(experiment.cells)} cells failed (first: {failed[0]}); their "
            f"logs are in {experiment.path / 'logs'}; run the plan again to retry them"
        )
    return experiment


def experiment_status(path: str) -> str:
    """Every cell's state, read from its run folder (and SLURM's queue when cells were submitted)."""
    experiment = load_experiment(path)
    from microseg.experiment_slurm import QueueState, queue_state

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
