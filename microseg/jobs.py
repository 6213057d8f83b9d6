"""Patients in parallel: `--jobs N` worker processes, each with its share of the CPU threads.

`default_jobs()` is the number of cores this process may run on; `run_jobs(fn, items, jobs)`
returns `[fn(item) for item in items]` in the items' order, computed by `jobs` processes
(spawned: a fresh interpreter each, no state inherited from the parent) that each set torch,
OpenCV and BLAS to cores // jobs threads, at least one. One job runs in this process with
every core's thread. The results are the same whatever `jobs` is: each item is computed by
the same code on the same inputs, and gathered in order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TypeVar

from tqdm import tqdm

from microseg.errors import OptionError

T = TypeVar("T")
R = TypeVar("R")


def default_jobs() -> int:
    """The number of cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_jobs(jobs: int | None) -> int:
    """`jobs` (None: `default_jobs()`) as an int >= 1, else OptionError naming the option."""
    if jobs is None:
        return default_jobs()
    if isinstance(jobs, bool) or int(jobs) != jobs or jobs < 1:
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


def iterate_jobs(fn: Callable[[T], R], items: Iterable[T], jobs: int | None = None, desc: str = "") -> Iterator[R]:
    """fn(item) for each item, in the items' order, by `jobs` spawned processes (fn must be a
    module-level function); a progress bar `desc` when stderr is a terminal. Closing the iterator
    early (an error in the caller) cancels the items not started."""
    todo: Sequence[T] = list(items)
    jobs = min(check_jobs(jobs), max(1, len(todo)))
    bar = functools.partial(tqdm, total=len(todo), desc=desc, leave=False, disable=None)
    if jobs == 1:
        for item in bar(todo):
            yield fn(item)
        return
    threads = max(1, default_jobs() // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=set_threads, initargs=(threads,))
    try:
        yield from bar(pool.map(fn, todo))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_jobs(fn: Callable[[T], R], items: Iterable[T], jobs: int | None = None, desc: str = "") -> list[R]:
    """[fn(item) for item in items], by `jobs` processes (`iterate_jobs`)."""
    return list(iterate_jobs(fn, items, jobs, desc))
