"""Patients in parallel: `--jobs N` worker processes, each with its share of the CPU threads.

`resolve_jobs(jobs, command, device)` is what a command's `--jobs` means: the number given, else
`$MICROSEG_JOBS` when set (the default of every `--jobs`; tests set it to 1), else
`machine_jobs(command, device)`, the fastest setting measured for the command on this machine.
`run_jobs(fn, items, jobs)` returns `[fn(item) for item in items]` in the items' order, computed by
`jobs` processes (spawned: a fresh interpreter each, no state inherited from the parent) that each
set torch, OpenCV and BLAS to cores // jobs threads, at least one; given `gpus`, worker k sees
only GPU k mod len(gpus). One job runs in this process with every core's thread. The results are
the same whatever `jobs` is: each item is computed by the same code on the same inputs, and
gathered in order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.queues import Queue
from typing import TypeVar

from tqdm import tqdm

from microseg.core.errors import OptionError

T = TypeVar("T")
R = TypeVar("R")

JOBS_VARIABLE = "MICROSEG_JOBS"
"""When set, the default of every `--jobs` (an integer >= 1)."""


def cores() -> int:
    """The number of cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus(device: str = "auto") -> list[str]:
    """The GPU ids workers may take: CUDA_VISIBLE_DEVICES's, else every GPU torch sees; none on the CPU."""
    if device == "cpu":
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


SMALL_MACHINE_CORES = 2
"""Up to this many cores, one process is the fastest setting of every command (README, Benchmarks)."""


def machine_jobs(command: str, device: str = "auto") -> int:
    """The `--jobs` measured fastest for `command` on this machine (README, Benchmarks: 2 shared cores,
    each pair of --jobs 1 / 2 run back to back, twice).

    evaluate: one worker per visible GPU (each on its own GPU), else 1: on the CPU one process
    already keeps the cores busy with its pipelined slabs, and each further worker pays its imports
    and the model's load (on 2 cores --jobs 2 took 31-36 s where --jobs 1 took 13-21 s).
    simulate, check and prepare: 1 on up to `SMALL_MACHINE_CORES` cores, where a worker's start
    (about 4 s of CPU importing torch, OpenCV and microseg) outweighs the second core (check 33-34 s
    with --jobs 2 against 11-12 s with --jobs 1 on 2 + 2 native patients of 40 slices), else one
    per core. experiment: 1 (its cells one at a time).
    """
    if command == "evaluate":
        return max(1, len(visible_gpus(device)))
    if command == "experiment":
        return 1
    return cores() if cores() > SMALL_MACHINE_CORES else 1


def default_jobs(command: str, device: str = "auto") -> int:
    """`$MICROSEG_JOBS` when set (OptionError naming it unless an integer >= 1), else `machine_jobs`."""
    value = os.environ.get(JOBS_VARIABLE)
    if value is None:
        return machine_jobs(command, device)
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise OptionError(f"${JOBS_VARIABLE} must be an integer >= 1 (the default --jobs), got {value!r}")
    return jobs


def resolve_jobs(jobs: int | None, command: str, device: str = "auto") -> int:
    """`jobs` checked (`check_jobs`), or None: `default_jobs(command, device)`."""
    return default_jobs(command, device) if jobs is None else check_jobs(jobs)


def check_jobs(jobs: int) -> int:
    """`jobs` as an int >= 1, else OptionError naming the option."""
    if isinstance(jobs, bool) or not isinstance(jobs, int | float) or int(jobs) != jobs or jobs < 1:
        raise OptionError(f"`jobs` must be an integer >= 1, got {jobs!r}")
    return int(jobs)


def set_threads(threads: int) -> None:
    """Limit torch's and OpenCV's thread pools (and BLAS's, for libraries loaded later) to `threads`."""
    import cv2
    import torch

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


def start_worker(slots: Queue[int], gpus: Sequence[str], threads: int) -> None:
    """A worker's setup, before torch starts in it: its GPU (the slot it takes, mod the GPUs) and
    its share of the CPU threads."""
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    set_threads(threads)


def iterate_jobs(
    fn: Callable[[T], R], items: Iterable[T], jobs: int = 1, desc: str = "", gpus: Sequence[str] = ()
) -> Iterator[R]:
    """fn(item) for each item, in the items' order, by `jobs` spawned processes (fn must be a
    module-level function), worker k on GPU `gpus[k % len(gpus)]` when `gpus` are given; a progress
    bar `desc` when stderr is a terminal. Closing the iterator early (an error in the caller)
    cancels the items not started."""
    todo: Sequence[T] = list(items)
    jobs = min(check_jobs(jobs), max(1, len(todo)))
    bar = functools.partial(tqdm, total=len(todo), desc=desc, leave=False, disable=None)
    if jobs == 1:
        for item in bar(todo):
            yield fn(item)
        return
    context = get_context("spawn")
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(slot)
    threads = max(1, cores() // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=start_worker, initargs=(slots, gpus, threads))
    try:
        yield from bar(pool.map(fn, todo))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_jobs(
    fn: Callable[[T], R], items: Iterable[T], jobs: int = 1, desc: str = "", gpus: Sequence[str] = ()
) -> list[R]:
    """[fn(item) for item in items], by `jobs` processes (`iterate_jobs`)."""
    return list(iterate_jobs(fn, items, jobs, desc, gpus))
