"""Patients in parallel: `--jobs N` worker processes, each with its share of the CPU threads.

`resolve_jobs(jobs, command, device, work)` is what a command's `--jobs` means: the number given, else
`$MICROSEG_JOBS` when set (the default of every `--jobs`; tests set it to 1), else
`machine_jobs(command, device, work())`: the rule measured for the command, sized by its work (a
worker's start against the work each process gets: `size_jobs`) on this machine's cores.
`run_jobs(fn, items, jobs)` returns `[fn(item) for item in items]` in the items' order, computed by
`jobs` processes (spawned: a fresh interpreter each, no state inherited from the parent) that each
set torch, OpenCV and BLAS to cores // jobs threads, at least one; given `gpus`, worker k sees
only GPU k mod len(gpus). One job runs in this process with every core's thread. The results are
the same whatever `jobs` is: each item is computed by the same code on the same inputs, and
gathered in order.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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


NATIVE_SLICE_PIXELS = 962 * 1372
"""A slice of the real dataset: the unit the costs below are measured in."""
WORKER_START_S = 4.0
"""CPU seconds a spawned worker spends before its first patient, importing torch, OpenCV and microseg
(docs/benchmarks.md, Default --jobs: check took 12.1 s of user CPU with --jobs 2 against 4.0 s with
--jobs 1, two workers' starts)."""
SECONDS_PER_NATIVE_SLICE = {"check": 0.02, "prepare": 0.05}
"""One process's seconds per native training slice (docs/benchmarks.md, At the real dataset's scale,
--jobs 1: check 21.6 s for 4 patients of 250 slices, 0.022 s a slice; prepare 26.2 s for 2 training
patients of 250, 0.052 s, its check of the test split included)."""


@dataclass(frozen=True)
class Work:
    """What a command's worker processes would share: `items` (patients, one per task) of `pixels` in all."""

    items: int
    pixels: int

    @property
    def native_slices(self) -> float:
        return self.pixels / NATIVE_SLICE_PIXELS


def machine_jobs(command: str, device: str = "auto", work: Work | None = None) -> int:
    """The default `--jobs` of `command` on this machine, for `work` (None: unknown, one process).

    evaluate: one worker per visible GPU (each on its own GPU), else 1: on the CPU one process
    already keeps the cores busy with its pipelined slabs, and each further worker pays its imports
    and the model's load (docs/benchmarks.md: --jobs 2 slower at every size measured).
    check and prepare: `size_jobs` of the work's seconds (its native slices x
    `SECONDS_PER_NATIVE_SLICE`). simulate: 1, whatever the size: one process already images as many
    slices at once as there are cores, on its threads (at 250 native slices a patient --jobs 2 took
    80.2 s against 82.7 s). experiment: 1 (its cells one at a time).
    """
    if command == "evaluate":
        return max(1, len(visible_gpus(device)))
    if command in SECONDS_PER_NATIVE_SLICE and work is not None:
        return size_jobs(SECONDS_PER_NATIVE_SLICE[command] * work.native_slices, work.items)
    return 1


def size_jobs(seconds: float, items: int) -> int:
    """How many processes `seconds` of one process's work over `items` patients is worth: each worker
    costs `WORKER_START_S` of CPU before its first patient and takes seconds / jobs of the work, so
    more processes only while the work per process is at least a worker's start,
    jobs = min(cores, items, floor(seconds / WORKER_START_S)), at least 1. On 2 cores the benchmarks'
    sizes come out as measured: check of 4 native patients of 250 slices 2 (20 s of work; 16.9 s
    against 21.6 s with 1), of 40 slices 1 (3.2 s; 11-12 s against 33-34 s with 2), prepare of 2
    patients of 250 slices 2 (25 s), of 40 slices 1 (4 s), a small phantom 1."""
    return max(1, min(cores(), items, math.floor(seconds / WORKER_START_S)))


def default_jobs(command: str, device: str = "auto", work: Callable[[], Work] | None = None) -> int:
    """`$MICROSEG_JOBS` when set (OptionError naming it unless an integer >= 1), else `machine_jobs` of
    `work()` (asked only then)."""
    value = os.environ.get(JOBS_VARIABLE)
    if value is None:
        return machine_jobs(command, device, None if work is None else work())
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise OptionError(f"${JOBS_VARIABLE} must be an integer >= 1 (the default --jobs), got {value!r}")
    return jobs


def resolve_jobs(jobs: int | None, command: str, device: str = "auto", work: Callable[[], Work] | None = None) -> int:
    """`jobs` checked (`check_jobs`), or None: `default_jobs(command, device, work)`."""
    return default_jobs(command, device, work) if jobs is None else check_jobs(jobs)


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
