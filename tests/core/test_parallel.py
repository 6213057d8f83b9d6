"""What `--jobs` means when not given: `$MICROSEG_JOBS`, else the machine's rule (`microseg.core.parallel`)."""

from __future__ import annotations

import os
import queue

import cv2
import pytest
import torch

from cli_helpers import one_error, run_cli
from microseg.core.parallel import JOBS_VARIABLE, machine_jobs, resolve_jobs, start_worker

COMMANDS = ("simulate", "check", "prepare", "evaluate", "experiment")


def test_the_variable_is_the_default_of_every_jobs_and_an_option_wins(monkeypatch):
    monkeypatch.setenv(JOBS_VARIABLE, "3")
    assert [resolve_jobs(None, command) for command in COMMANDS] == [3] * len(COMMANDS)
    assert [resolve_jobs(2, command) for command in COMMANDS] == [2] * len(COMMANDS)


def test_without_the_variable_each_command_gets_the_machines_rule(monkeypatch):
    monkeypatch.delenv(JOBS_VARIABLE)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: evaluate in one process
    assert resolve_jobs(None, "evaluate") == machine_jobs("evaluate") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # one worker per visible GPU
    assert resolve_jobs(None, "evaluate") == 2 and resolve_jobs(None, "evaluate", "cpu") == 1
    assert resolve_jobs(None, "experiment") == 1
    for cores, jobs in ((1, 1), (2, 1), (3, 3), (16, 16)):  # one process up to 2 cores, then one per core
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert [resolve_jobs(None, command) for command in ("simulate", "check", "prepare")] == [jobs] * 3
        assert resolve_jobs(None, "evaluate", "cpu") == 1


def _argv(command: str, tmp_path, phantom, cache) -> list:
    return {
        "simulate": ["simulate", "--out", tmp_path / "new", "--train", 1, "--test", 0, "--slices", 3],
        "check": ["check", "--data", phantom, "--json", tmp_path / "check.json"],
        "prepare": ["prepare", "--data", phantom, "--out", tmp_path / "cache.h5", "--size", 32],
        "evaluate": ["evaluate", "--run", tmp_path / "run", "--data", phantom, "--device", "cpu"],
        "experiment": [
            "experiment",
            "run",
            "--out",
            tmp_path / "exp",
            "--losses",
            "dice",
            "--cache",
            cache,
            "--data",
            phantom,
            "--epochs",
            1,
            "--device",
            "cpu",
        ],
    }[command]


@pytest.mark.parametrize("value", ["0", "two", "", "1.5", "-1"])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_invalid_variable_is_one_line_naming_it_and_nothing_is_written(
    command, value, monkeypatch, tmp_path, capsys, phantom, cache
):
    monkeypatch.setenv(JOBS_VARIABLE, value)
    code, _, err = run_cli(_argv(command, tmp_path, phantom, cache), capsys)
    one_error(code, err, f"${JOBS_VARIABLE}", repr(value))
    assert sorted(os.listdir(tmp_path)) == []


def test_an_explicit_jobs_does_not_read_the_variable(monkeypatch, tmp_path, capsys, phantom, cache):
    monkeypatch.setenv(JOBS_VARIABLE, "two")
    code, out, err = run_cli([*_argv("check", tmp_path, phantom, cache), "--jobs", 1], capsys)
    assert code == 0, err
    assert (tmp_path / "check.json").is_file()


def test_each_worker_sees_only_its_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after set_threads
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    slots: queue.Queue[int] = queue.Queue()
    for slot in (0, 1, 2):
        slots.put(slot)
    try:
        seen = []
        for _ in range(3):
            start_worker(slots, ["3", "5"], 1)
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        assert seen == ["3", "5", "3"] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
