"""Run an experiment's cells on this machine: in this process (--jobs 1) or in N worker processes.

With GPUs, worker i sees only GPU i mod n (CUDA_VISIBLE_DEVICES, set before torch starts in it);
on the CPU the cores are divided between the workers (torch threads = cores // N, at least 1).
Small models are per-operation overhead bound on the CPU, so several single-threaded trainings
side by side make more optimiser steps per second than one using every core (the demo's
measurement: three side by side on 2 cores, 1.4x). Cell events print as they happen, each
finished or failed cell with the overall count; the experiment's lock (`EXP/.lock`) keeps a
second runner out while this one runs.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing.queues import Queue
from pathlib import Path
from typing import TextIO

from microseg.errors import MicrosegError
from microseg.experiment import Cell, Experiment, load_experiment
from microseg.experiment_cell import lock_holder, run_cell
from microseg.jobs import cores, visible_gpus
from microseg.run import RunLock


def run_local(experiment: Experiment, cells: list[Cell], jobs: int, device: str = "auto") -> list[str]:
    """Run `cells` in `jobs` workers; returns the failed cells' lines ('<id>: <error>')."""
    holder = lock_holder(experiment.path)
    if holder is not None:
        raise MicrosegError(f"experiment {experiment.path} is being run by another microseg process (pid {holder})")
    lock = RunLock(experiment.path)
    lock.acquire()
    try:
        gpus = visible_gpus(device)
        threads = max(1, cores() // jobs) if not gpus else 0
        where = f"{len(gpus)} GPU(s)" if gpus else f"the CPU, {threads} thread(s) each"
        print(f"running {len(cells)} cell(s) of {experiment.path} in {jobs} worker(s) on {where}", flush=True)
        if jobs == 1:
            return _in_process(experiment, cells, device)
        return _in_workers(experiment, cells, jobs, gpus, threads, device)
    finally:
        lock.release()


def _finished(done: int, failed: int, total: int) -> str:
    return f"[{done} of {total} done" + (f", {failed} failed]" if failed else "]")


def _in_process(experiment: Experiment, cells: list[Cell], device: str) -> list[str]:
    failed: list[str] = []
    event = _printer(sys.stdout)
    for i, cell in enumerate(cells):
        try:
            result = run_cell(experiment, cell, event, device)
            event(f"{cell.id}: finished, {result} {_finished(i + 1 - len(failed), len(failed), len(cells))}")
        except MicrosegError as err:
            failed.append(f"{cell.id}: {err}")
            event(f"{cell.id}: failed: {err} {_finished(i + 1 - len(failed), len(failed), len(cells))}")
    return failed


def _in_workers(
    experiment: Experiment, cells: list[Cell], jobs: int, gpus: list[str], threads: int, device: str
) -> list[str]:
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(slot)
    failed: list[str] = []
    event = _printer(sys.stdout)
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_start_worker, initargs=(slots, gpus, threads)
    ) as pool:
        pending = {pool.submit(_work, str(experiment.path), cell.id, device): cell for cell in cells}
        done = 0
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    cell = pending.pop(future)
                    ok, line = future.result()  # a worker's Ctrl-C (its cell saved last.pt) comes back here
                    done += ok
                    if not ok:
                        failed.append(f"{cell.id}: {line}")
                    event(
                        f"{cell.id}: {'finished, ' if ok else 'failed: '}{line} "
                        f"{_finished(done, len(failed), len(cells))}"
                    )
        except KeyboardInterrupt:  # start no other cell; the running ones got Ctrl-C too
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return failed


def _start_worker(slots: Queue[int], gpus: list[str], threads: int) -> None:
    """A worker's setup, before torch: its GPU (by slot), or its share of the CPU threads."""
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    import torch

    if threads:
        torch.set_num_threads(threads)


def _work(path: str, cell_id: str, device: str) -> tuple[bool, str]:
    """One cell in a worker: (True, result line) or (False, its error line); Ctrl-C propagates."""
    experiment = load_experiment(Path(path))
    try:
        return True, run_cell(experiment, experiment.cell(cell_id), _printer(sys.stdout), device)
    except MicrosegError as err:
        return False, str(err)


def _printer(stream: TextIO) -> Callable[[str], None]:
    """Progress lines go to `stream` (the command's stdout), whatever a cell redirects meanwhile;
    each line is one write, so the lines of processes sharing the stream do not interleave."""

    def event(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return event
