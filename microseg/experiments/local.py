"""Run an experiment's cells on this machine: in this process (--jobs 1) or in N worker processes.

With GPUs, worker i sees only GPU i mod n (CUDA_VISIBLE_DEVICES, set before torch starts in it);
on the CPU the cores are divided between the workers (torch threads = cores // N, at least 1).
Small models are per-operation overhead bound on the CPU, so several single-threaded trainings
side by side make more optimiser steps per second than one using every core (the demo's
measurement: three side by side on 2 cores, 1.4x). Cell events print as they happen, each
finished or failed cell with the overall count. A cell's failure, whatever its error, is its own:
the others run on.

Stopping: a cell starts only when a worker is free and no stop was asked. After Ctrl-C, SIGTERM
or SIGHUP (the runner's `microseg.core.stop.StopSignals`) no cell starts; in-process, the running cell
saves its position at its step's end; with workers, the runner sends each running worker one
SIGTERM, and each saves at its step's end. The command then ends with one line naming the cells
to resume (exit status 128 + the signal). A worker is one spawned process per cell; it ignores
the terminal's SIGINT and SIGHUP (the runner relays a stop, once) and watches its runner: when
the runner is gone, however it ended (kill -9 too), the worker stops as on SIGTERM and exits, so
no worker outlives its runner.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import TextIO

from microseg.core.parallel import cores, visible_gpus
from microseg.core.stop import Interrupted, StopSignals, signal_name, signal_of, stop_signals
from microseg.experiments.cell import failure_line, record_failure, run_cell
from microseg.experiments.experiment import Cell, Experiment, load_experiment

POLL_S = 0.5
"""How often the runner looks for a stop while its workers run, and a worker for its runner."""
GRACE_S = 120.0
"""A worker whose runner is gone exits by then even if its cell has not stopped (a step that hangs)."""
RELAYED = (signal.SIGINT, signal.SIGHUP)
"""What a worker ignores: a terminal sends them to every process of the command; the runner relays a stop."""


@dataclass
class Progress:
    """The cells' outcomes as they come: one event line each, with the overall count."""

    total: int
    event: Callable[[str], None]
    done: int = 0
    failed: list[str] = field(default_factory=list)  # '<id>: <error>'
    stopped: list[str] = field(default_factory=list)  # ids of the cells a stop interrupted

    def finished(self, cell: Cell, line: str) -> None:
        self.done += 1
        self.event(f"{cell.id}: finished, {line} {self._count()}")

    def fail(self, cell: Cell, line: str) -> None:
        self.failed.append(f"{cell.id}: {line}")
        self.event(f"{cell.id}: failed: {line} {self._count()}")

    def interrupt(self, cell: Cell) -> None:
        self.stopped.append(cell.id)
        self.event(f"{cell.id}: interrupted")

    def interruption(self, signum: int, not_started: int) -> Interrupted:
        """The command's end after a stop: the cells to resume, those not started, the failed ones."""
        parts = [f"{signal_name(signum)}; cell(s) to resume: {', '.join(self.stopped) or 'none'}"]
        if not_started:
            parts.append(f"{not_started} cell(s) not started")
        if self.failed:
            parts.append(f"{len(self.failed)} failed: {', '.join(line.split(':')[0] for line in self.failed)}")
        return Interrupted(signum, "; ".join(parts) + "; run the plan again to continue")

    def _count(self) -> str:
        return f"[{self.done} of {self.total} done" + (f", {len(self.failed)} failed]" if self.failed else "]")


def run_local(experiment: Experiment, cells: list[Cell], jobs: int, device: str = "auto") -> list[str]:
    """Run `cells`, at most `jobs` at a time; returns the failed cells' lines ('<id>: <error>').

    A stop signal ends it with `Interrupted`, whose message names the cells to resume."""
    gpus = visible_gpus(device)
    threads = max(1, cores() // jobs) if not gpus else 0
    where = f"{len(gpus)} GPU(s)" if gpus else f"the CPU, {threads} thread(s) each"
    print(f"running {len(cells)} cell(s) of {experiment.path} in {jobs} worker(s) on {where}", flush=True)
    progress = Progress(len(cells), _printer(sys.stdout))
    with stop_signals() as stop:
        if jobs == 1:
            _in_process(experiment, cells, device, progress)
        else:
            _in_workers(experiment, cells, _Pool(jobs, gpus, threads, device), stop, progress)
    return progress.failed


def _in_process(experiment: Experiment, cells: list[Cell], device: str, progress: Progress) -> None:
    started = 0
    try:
        for cell in cells:
            started += 1
            try:
                line = run_cell(experiment, cell, progress.event, device)
            except KeyboardInterrupt:  # the cell saved its position; nothing else starts
                progress.interrupt(cell)
                raise
            except Exception as err:  # whatever it is, this cell's own: the others run on
                progress.fail(cell, failure_line(err))
            else:
                progress.finished(cell, line)
    except KeyboardInterrupt as err:
        raise progress.interruption(signal_of(err), len(cells) - started) from None


@dataclass
class _Pool:
    """How workers start: how many at once, their GPUs or CPU threads, the device."""

    jobs: int
    gpus: list[str]
    threads: int
    device: str

    def gpu(self, slot: int) -> str | None:
        """The GPU of the worker in `slot`: GPU slot mod n; None on the CPU."""
        return self.gpus[slot % len(self.gpus)] if self.gpus else None


@dataclass
class _Worker:
    cell: Cell
    log: Path
    process: SpawnProcess
    result: Connection  # the receiving end of its Pipe
    signalled: bool = False


def _in_workers(experiment: Experiment, cells: list[Cell], pool: _Pool, stop: StopSignals, progress: Progress) -> None:
    """Start a cell whenever a slot is free and no stop was asked; on a stop, SIGTERM each running worker
    once and wait for them; any worker still running when this ends otherwise is stopped too."""
    context = multiprocessing.get_context("spawn")
    _start_tracker()
    waiting, running = list(cells), dict[int, _Worker]()  # slot -> its worker
    try:
        with stop.deferred(reraise=False):  # a stop is seen here, at the next look, not raised anywhere
            while running or (waiting and stop.signum is None):
                while waiting and len(running) < pool.jobs and stop.signum is None:
                    slot = min(set(range(pool.jobs)) - set(running))
                    running[slot] = _start(context, experiment, waiting.pop(0), slot, pool)
                if stop.signum is not None:
                    _signal(running.values())
                for slot in _ended(running):
                    worker = running.pop(slot)
                    _report(worker, stop.signum is not None, progress)
    finally:
        _signal(running.values())
        for worker in running.values():
            worker.process.join()
    if stop.signum is not None:
        raise progress.interruption(stop.signum, len(waiting))


def _start_tracker() -> None:
    """Start multiprocessing's resource tracker now (starting it unblocks SIGINT, which `_start` keeps
    blocked), its warning about what a killed worker left behind (a semaphore, which it removes)
    silenced: the runner reports that worker's cell as failed, in its own line."""
    previous = os.environ.get("PYTHONWARNINGS")
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    os.environ["PYTHONWARNINGS"] = f"{previous},{quiet}" if previous else quiet
    try:
        resource_tracker.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = previous


def _start(context: SpawnContext, experiment: Experiment, cell: Cell, slot: int, pool: _Pool) -> _Worker:
    """Spawn the worker of `cell` in `slot`, the terminal's SIGINT / SIGHUP blocked while it starts (its
    interpreter inherits the mask; it ignores them, then unblocks)."""
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_work,
        args=(send, str(experiment.path), cell.id, pool.device, pool.gpu(slot), pool.threads, os.getpid()),
        name=f"microseg cell {cell.id}",
    )
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        send.close()
    return _Worker(cell, experiment.log(cell), process, receive)


def _signal(workers: Iterable[_Worker]) -> None:
    """SIGTERM, once, to each running worker: it saves its position at its step's end and reports."""
    for worker in workers:
        if not worker.signalled and worker.process.exitcode is None:
            worker.signalled = True
            worker.process.terminate()  # SIGTERM (none to a process already gone)


def _ended(running: dict[int, _Worker]) -> list[int]:
    """The slots whose worker has ended, waiting up to POLL_S for one."""
    if not running:
        return []
    ready = set(wait([w.process.sentinel for w in running.values()], timeout=POLL_S))
    return [slot for slot, w in running.items() if w.process.sentinel in ready]


def _report(worker: _Worker, stopping: bool, progress: Progress) -> None:
    """A worker's outcome: what it sent, or how its process ended when it sent nothing (killed, crashed)."""
    worker.process.join()
    try:
        outcome, line = worker.result.recv() if worker.result.poll() else ("", "")
    except (EOFError, OSError):
        outcome, line = "", ""
    finally:
        worker.result.close()
    code = worker.process.exitcode
    if outcome == "finished":
        progress.finished(worker.cell, line)
    elif stopping and (outcome == "interrupted" or (not outcome and code == -signal.SIGTERM)):
        progress.interrupt(worker.cell)
    elif outcome == "interrupted":  # its worker alone got a stop signal: the others run on
        progress.fail(worker.cell, "interrupted (its worker was stopped); run the plan again to resume it")
    elif outcome:
        progress.fail(worker.cell, line)
    else:
        line = f"its worker process ended with {_exit_code(code)} and no result"
        record_failure(worker.log, line)
        progress.fail(worker.cell, line)


def _exit_code(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal_name(-code)}"
    return f"exit status {code}"


def _work(result: Connection, path: str, cell_id: str, device: str, gpu: str | None, threads: int, runner: int) -> None:
    """One cell in a worker process; sends (finished | failed | interrupted, line) to the runner.

    SIGINT and SIGHUP ignored (the runner relays a stop as SIGTERM), SIGTERM handled as a stop; the
    GPU or the CPU threads set before torch starts; a thread watching the runner."""
    for signum in RELAYED:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED)
    with StopSignals((signal.SIGTERM,)) as stop:
        _watch(runner)
        try:
            claim_device(gpu, threads)
            experiment = load_experiment(Path(path))
            outcome = ("finished", run_cell(experiment, experiment.cell(cell_id), _printer(sys.stdout), device))
        except KeyboardInterrupt:
            outcome = ("interrupted", "")
        except Exception as err:  # whatever it is, this cell's failure
            outcome = ("failed", failure_line(err))
        with stop.deferred(reraise=False), contextlib.suppress(OSError):  # OSError: the runner is gone
            result.send(outcome)


def claim_device(gpu: str | None, threads: int) -> None:
    """A worker's share, set before torch starts in it: its GPU (CUDA_VISIBLE_DEVICES), or its CPU threads."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    if threads:
        torch.set_num_threads(threads)


def _watch(runner: int) -> None:
    """A daemon thread: once this process's parent is no longer `runner` (it ended, however), stop as on
    SIGTERM (the cell saves its position at its step's end), and exit after GRACE_S whatever happens."""

    def watch() -> None:
        while os.getppid() == runner:
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_S)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="microseg runner watch", daemon=True).start()


def _printer(stream: TextIO) -> Callable[[str], None]:
    """Progress lines go to `stream` (the command's stdout), whatever a cell redirects meanwhile;
    each line is one write, so the lines of processes sharing the stream do not interleave.
    A stream that no longer takes writes (its reader gone) loses the line, not the cell."""

    def event(line: str) -> None:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    return event
