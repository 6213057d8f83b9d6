"""One cell of an experiment: its state read from its run folder, and running it (train, evaluate).

A cell trains (or resumes from `last.pt`), then, with folds, evaluates its held-out patients
into `heldout/`, then the test split into `metrics/` (exactly `microseg evaluate --split test`).
Its output goes to `EXP/logs/<id>.log`, whose last line records how a cell that did not finish
ended (`microseg: error: ...`, after the traceback of an unexpected exception, or `microseg:
interrupted`). SIGTERM (a SLURM time limit) and SIGHUP stop training as Ctrl-C does: `last.pt`
keeps the position inside the epoch, at a step's end.

States, from the run folder itself: done (the evaluations are written), running (its run lock is
held by a live process), trained (not yet evaluated), partial (epoch N of M in `last.pt`),
failed / interrupted (the log's last line; a fresh run that stops before its first checkpoint
leaves no folder), pending (never started), deleted (the log records a saved epoch, `== saved
epoch N of M`, but the run folder is gone).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from microseg.core.errors import MicrosegError, os_error_line
from microseg.core.stop import stop_signals
from microseg.core.tables import SUMMARY_ROWS, read_csv, write_csv
from microseg.experiments.experiment import Cell, Experiment, load_experiment
from microseg.runs.config import load_config
from microseg.runs.folder import RunFolder, RunLock

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
    holder = lock_holder(folder.path) if folder.path.is_dir() else None
    if holder is not None:
        return CellState("running", *_epochs(folder), detail=f"pid {holder}")
    done, epochs = _epochs(folder) if folder.path.is_dir() else (0, 0)
    evaluations = [folder.evaluation] + ([folder.held_out.evaluation] if cell.fold is not None else [])
    if folder.path.is_dir() and epochs and done >= epochs and all(p.is_file() for p in evaluations):
        return CellState("done", done, epochs)
    try:
        lines = _log_lines(experiment.log(cell))
    except OSError as err:  # a folder, or a file it may not read, where the log goes: running it fails too
        return CellState("failed", done, epochs, f"its log cannot be read: {os_error_line(err)}")
    last_line = lines[-1] if lines else ""
    if not folder.path.is_dir():
        if any(line.startswith(SAVED) for line in lines):
            return CellState("deleted", detail=f"{experiment.log(cell)} shows a saved epoch")
        if last_line == INTERRUPTED:
            return CellState("interrupted")
        if lines:  # stopped before its first checkpoint
            return CellState("failed", detail=last_line.removeprefix(FAILED))
        return CellState("pending")
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


class CellFailed(MicrosegError):
    """A cell that ended with an error, whatever it was: its failure line (the details are in its log)."""


def run_cell(experiment: Experiment, cell: Cell, event: Callable[[str], None], device: str = "auto") -> str:
    """Train (or resume) and evaluate one cell, its output appended to its log; returns its result line.

    `event` gets one line per cell event (started, epoch N of M). Any error (MicrosegError, an
    OSError, an unexpected exception, whose traceback goes to the log only) is recorded as the log's
    last line and raised as `CellFailed`; so is a log that cannot be written. A stop (Ctrl-C,
    SIGTERM, SIGHUP: the position saved at a step's end) is recorded and raised again.
    """
    log = experiment.log(cell)
    with stop_signals() as stop:  # a time limit's SIGTERM saves like Ctrl-C
        stop.check()
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            stream = open(log, "a", buffering=1)  # noqa: SIM115  (closed in the finally below, its errors suppressed)
        except OSError as err:
            raise CellFailed(f"cannot write its log: {os_error_line(err)}") from None
        try:
            with redirect_stdout(stream), redirect_stderr(stream):
                return _run(experiment, cell, event, device)
        except KeyboardInterrupt:
            _record(stream, INTERRUPTED)
            raise
        except Exception as err:  # whatever it is, it is this cell's failure
            line = failure_line(err)
            _record(stream, f"{FAILED}{line}", None if isinstance(err, (MicrosegError, OSError)) else err)
            raise CellFailed(line) from None
        finally:
            with contextlib.suppress(OSError):
                stream.close()


def run_cell_job(path: str | Path, cell_id: str, device: str = "auto") -> str:
    """`experiment cell`: one cell of the experiment at `path` run here (what each worker and SLURM job runs),
    its events and then its result line printed, then the out-of-fold scores brought up to date (`write_oof`);
    returns its result line."""
    experiment = load_experiment(path)
    result = run_cell(experiment, experiment.cell(cell_id), print, device)
    print(f"{cell_id}: finished, {result}")
    write_oof(experiment)
    return result


def failure_line(err: BaseException) -> str:
    """A cell's failure in one line: a MicrosegError's message, an OSError's file and reason, else the
    exception's type and message (its traceback is in the log)."""
    if isinstance(err, MicrosegError):
        return str(err)
    if isinstance(err, OSError):
        return os_error_line(err)
    return f"{type(err).__name__}: {' '.join(str(err).split())} (its traceback is in the cell's log)"


def record_failure(log: Path, line: str) -> None:
    """The failure of a cell whose process ended without a word (killed, crashed) as its log's last line."""
    with contextlib.suppress(OSError), open(log, "a") as stream:
        _record(stream, f"{FAILED}{line}")


def _record(stream: IO[str], last_line: str, err: BaseException | None = None) -> None:
    """The log's last line (after `err`'s traceback); a log that no longer takes writes keeps what it has."""
    with contextlib.suppress(OSError, ValueError):
        if err is not None:
            traceback.print_exception(err, file=stream)
        stream.write(last_line + "\n")


def _run(experiment: Experiment, cell: Cell, event: Callable[[str], None], device: str) -> str:
    import dataclasses

    from microseg.evaluation.evaluate import evaluate
    from microseg.training.trainer import train

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
        evaluate(cell.run, Path(plan.data), "train", plan.protocol, device=device, cases=held_out, heldout=True)
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
            folders = [RunFolder(c.run).held_out for c in sorted(cells, key=lambda c: c.fold)]
            if not all(f.per_patient.is_file() and f.evaluation.is_file() for f in folders):
                continue
            for folder in folders:
                for row in read_csv(folder.per_patient):
                    if row["case_id"] in SUMMARY_ROWS:
                        continue
                    header = header or ["loss", "seed", *row]
                    rows.append([loss, seed, *(row.get(k, "") for k in header[2:])])
        if rows:
            write_csv(out, header, rows)
    return out if rows else None
