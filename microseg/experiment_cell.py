"""One cell of an experiment: its state read from its run folder, and running it (train, evaluate).

A cell trains (or resumes from `last.pt`), then, with folds, evaluates its held-out patients
into `heldout/`, then the test split into `metrics/` (exactly `microseg evaluate --split test`).
Its output goes to `EXP/logs/<id>.log`, whose last line records how a cell that did not finish
ended (`microseg: error: ...` or `microseg: interrupted`). SIGTERM (a SLURM time limit) stops
training as Ctrl-C does: `last.pt` keeps the position inside the epoch.

States, from the run folder itself: done (the evaluations are written), running (its run lock is
held by a live process), trained (not yet evaluated), partial (epoch N of M in `last.pt`),
failed / interrupted (the log's last line; a fresh run that stops before its first checkpoint
leaves no folder), pending (never started), deleted (the log records a saved epoch, `== saved
epoch N of M`, but the run folder is gone).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from microseg.errors import MicrosegError
from microseg.experiment import Cell, Experiment
from microseg.config import load_config
from microseg.run import RunFolder, RunLock
from microseg.tables import SUMMARY_ROWS, read_csv, write_csv

HELDOUT = "heldout"
FAILED, INTERRUPTED, SAVED = "microseg: error: ", "microseg: interrupted", "== saved epoch"
RESUME_MAY_CHANGE = (
    "run",
    "amp",
    "device",
    "num_workers",
    "sync_every",
    "tensorboard",
)  # a copied or moved EXP keeps its cells


@dataclass(frozen=True)
class CellState:
    name: str  # done, running, trained, partial, failed, interrupted, pending, deleted
    epochs_done: int = 0
    epochs: int = 0
    detail: str = ""

    def describe(self) -> str:
        text = self.name
        if self.name in ("partial", "interrupted", "running") and self.epochs:
            text += f", epoch {self.epochs_done} of {self.epochs}"
        return text + (f": {self.detail}" if self.detail else "")


def lock_holder(folder: Path) -> str | None:
    """The pid holding `folder`'s run lock (a live process), or None; creates nothing."""
    path = folder / RunLock.NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def cell_state(experiment: Experiment, cell: Cell) -> CellState:
    """What the cell's run folder (and its log) say about it."""
    folder = RunFolder(cell.run)
    lines = _log_lines(experiment.log(cell))
    last_line = lines[-1] if lines else ""
    holder = lock_holder(folder.path) if folder.path.is_dir() else None
    if holder is not None:
        return CellState("running", *_epochs(folder), detail=f"pid {holder}")
    if not folder.path.is_dir():
        if any(line.startswith(SAVED) for line in lines):
            return CellState("deleted", detail=f"{experiment.log(cell)} shows a saved epoch")
        if last_line == INTERRUPTED:
            return CellState("interrupted")
        if lines:  # stopped before its first checkpoint
            return CellState("failed", detail=last_line.removeprefix(FAILED))
        return CellState("pending")
    done, epochs = _epochs(folder)
    evaluations = [folder.evaluation] + ([cell.run / HELDOUT / "evaluation.json"] if cell.fold is not None else [])
    if epochs and done >= epochs and all(p.is_file() for p in evaluations):
        return CellState("done", done, epochs)
    if last_line.startswith(FAILED):
        return CellState("failed", done, epochs, last_line[len(FAILED) :])
    if epochs and done >= epochs:
        return CellState("trained", done, epochs)
    return CellState("interrupted" if last_line == INTERRUPTED else "partial", done, epochs)


def _epochs(folder: RunFolder) -> tuple[int, int]:
    """(epochs in history.csv, epochs of the config); (0, 0) before the config is written."""
    if not folder.config.is_file():
        return 0, 0
    epochs = load_config(folder.config).epochs
    return (len(read_csv(folder.history)) if folder.history.is_file() else 0), epochs


def _log_lines(log: Path) -> list[str]:
    try:
        return log.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return []


def check_cell_folder(experiment: Experiment, cell: Cell) -> None:
    """Refuse a cell whose run folder was deleted, is locked by a live process, or holds another config."""
    state = cell_state(experiment, cell)
    if state.name == "deleted":
        raise MicrosegError(
            f"cell {cell.id}: its run folder {cell.run} was deleted ({state.detail}); remove "
            f"{experiment.log(cell)} to train it again"
        )
    if state.name == "running":
        raise MicrosegError(
            f"cell {cell.id}: run {cell.run} is locked by a live process ({state.detail}); wait for it to end"
        )
    folder = RunFolder(cell.run)
    if folder.config.is_file():
        saved, wanted = load_config(folder.config).to_dict(), experiment.cell_config(cell).to_dict()
        for key in wanted:
            if key not in RESUME_MAY_CHANGE and saved.get(key) != wanted[key]:
                raise MicrosegError(
                    f"cell {cell.id}: {folder.config} has {key} {saved.get(key)!r}, the plan "
                    f"{wanted[key]!r}: the folder holds another run"
                )


def run_cell(experiment: Experiment, cell: Cell, event: Callable[[str], None], device: str = "auto") -> str:
    """Train (or resume) and evaluate one cell, its output appended to its log; returns its result line.

    `event` gets one line per cell event (started, epoch N of M). MicrosegError and Ctrl-C / SIGTERM
    are recorded as the log's last line and raised again.
    """
    log = experiment.log(cell)
    log.parent.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a time limit saves like Ctrl-C
    try:
        with open(log, "a", buffering=1) as stream, redirect_stdout(stream), redirect_stderr(stream):
            try:
                return _run(experiment, cell, event, device)
            except MicrosegError as err:
                print(f"{FAILED}{err}")
                raise
            except KeyboardInterrupt:
                print(INTERRUPTED)
                raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(experiment: Experiment, cell: Cell, event: Callable[[str], None], device: str) -> str:
    import dataclasses

    from microseg.evaluate import evaluate
    from microseg.train import train

    started = time.perf_counter()
    experiment.check_cache()  # trained on the cache the experiment recorded, or not at all
    config = dataclasses.replace(experiment.cell_config(cell), device=device)
    folder = RunFolder(cell.run)
    done, epochs = _epochs(folder)
    print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} cell {cell.id} (pid {os.getpid()})", flush=True)
    if not (epochs and done >= epochs):
        resume = folder.last.is_file()
        event(f"{cell.id}: {'resumed at epoch ' + str(done + 1) if resume else 'started'} ({config.epochs} epochs)")

        def saved(row: dict) -> None:
            print(f"{SAVED} {row['epoch']} of {config.epochs}", flush=True)  # the log: the folder exists now
            event(f"{cell.id}: epoch {row['epoch']} of {config.epochs}")

        train(config, resume=resume, force=not resume, on_epoch=saved)
    plan = experiment.plan
    if cell.fold is not None:
        _, held_out = experiment.splits().training(cell.fold)
        evaluate(cell.run, Path(plan.data), "train", plan.protocol, device=device, cases=held_out, into=HELDOUT)
    evaluate(cell.run, Path(plan.data), "test", plan.protocol, device=device)
    mean = {row["case_id"]: row for row in read_csv(folder.per_patient)}["mean"]
    return (
        f"test DSC {float(mean['dsc']):.4f}, HD95 {float(mean['hd95_mm']):.2f} mm "
        f"({time.perf_counter() - started:.0f} s)"
    )


def write_oof(experiment: Experiment) -> Path | None:
    """EXP/oof/per_patient.csv: for each (loss, seed) whose folds are all evaluated, every training
    patient once, from its fold's held-out evaluation (columns loss, seed + per_patient.csv's).
    Serialised by a lock, so cells finishing together cannot drop each other's rows. None without folds."""
    if not experiment.plan.folds:
        return None
    groups: dict[tuple[str, int], list] = {}
    for cell in experiment.cells:
        groups.setdefault((cell.loss, cell.seed), []).append(cell)
    out = experiment.oof_file
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        header: list[str] = []
        rows = []
        for (loss, seed), cells in groups.items():
            files = [c.run / HELDOUT / "per_patient.csv" for c in sorted(cells, key=lambda c: c.fold)]
            if not all(f.is_file() and (f.parent / "evaluation.json").is_file() for f in files):
                continue
            for file in files:
                for row in read_csv(file):
                    if row["case_id"] in SUMMARY_ROWS:
                        continue
                    header = header or ["loss", "seed", *row]
                    rows.append([loss, seed, *(row.get(k, "") for k in header[2:])])
        if rows:
            write_csv(out, header, rows)
    return out if rows else None
