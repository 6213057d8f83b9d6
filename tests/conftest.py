"""Shared fixtures: a small phantom dataset, its slice cache and a trained tiny run (built once)."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest

from train_helpers import train_tiny


def pytest_collection_finish(session):
    """The objects of the modules the tests imported (torch, its compiler, scipy, statsmodels) live as
    long as the session: frozen out of the garbage collector's view, each full collection (about 25
    in the quick tier) skips them instead of walking them again."""
    gc.freeze()


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> Path:
    from microseg.data.phantom import simulate_dataset

    return simulate_dataset(tmp_path_factory.mktemp("phantom"), n_train=3, n_test=2, n_slices=6, size=(64, 96), seed=3)


@pytest.fixture(scope="session")
def cache(phantom, tmp_path_factory) -> Path:
    from microseg.data.prepare import prepare_cache

    return prepare_cache(phantom, tmp_path_factory.mktemp("cache") / "cache.h5", size=32)


@pytest.fixture(scope="session")
def trained_run(cache, tmp_path_factory) -> Path:
    return train_tiny(cache, tmp_path_factory.mktemp("runs") / "tiny_af")


@pytest.fixture
def copied_run(trained_run, tmp_path) -> Path:
    """A copy of the trained run that a test may change."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


@pytest.fixture(scope="session", autouse=True)
def one_job_one_thread_by_default():
    """Every `--jobs` defaults to 1 (`$MICROSEG_JOBS`) and torch runs one intra-op thread
    (`$OMP_NUM_THREADS`), both inherited by CLI subprocesses: a test pays for worker processes and
    threads only where it asks for them (`--jobs`, `torch.set_num_threads`). The tests' tensors are
    too small to gain from a second thread, and OpenMP threads that wait for a busy core burn it:
    on 2 shared cores a tiny training epoch took 20 times longer with two threads than with one."""
    import torch

    from microseg.core.parallel import JOBS_VARIABLE

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(JOBS_VARIABLE, "1")
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
