"""What `--jobs` means when not given: `$MICROSEG_JOBS`, else the machine's rule (`microseg.core.parallel`)."""

from __future__ import annotations

import os
import queue
import shutil

import cv2
import pytest
import torch

from cli_helpers import one_error, run_cli
from microseg.core.parallel import JOBS_VARIABLE, Work, machine_jobs, resolve_jobs, start_worker

COMMANDS = ("simulate", "check", "prepare", "evaluate", "experiment")


def test_the_variable_is_the_default_of_every_jobs_and_an_option_wins(monkeypatch):
    monkeypatch.setenv(JOBS_VARIABLE, "3")
    assert [resolve_jobs(None, command) for command in COMMANDS] == [3] * len(COMMANDS)
    assert [resolve_jobs(2, command) for command in COMMANDS] == [2] * len(COMMANDS)


NATIVE = 962 * 1372  # pixels of a real slice: the unit of the cost model


def on_cores(monkeypatch, n: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))


def test_without_the_variable_each_command_gets_the_machines_rule(monkeypatch):
    monkeypatch.delenv(JOBS_VARIABLE)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: evaluate in one process
    assert resolve_jobs(None, "evaluate") == machine_jobs("evaluate") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # one worker per visible GPU
    assert resolve_jobs(None, "evaluate") == 2 and resolve_jobs(None, "evaluate", "cpu") == 1
    assert resolve_jobs(None, "experiment") == 1
    on_cores(monkeypatch, 16)
    big = Work(items=75, pixels=75 * 250 * NATIVE)  # the real dataset's size
    for command in ("simulate", "check", "prepare"):
        assert resolve_jobs(None, command) == 1  # no size known: one process
    assert [resolve_jobs(None, command, work=lambda: big) for command in ("simulate", "check", "prepare")] == [
        1,
        16,
        16,
    ]
    assert resolve_jobs(None, "evaluate", "cpu", work=lambda: big) == 1


# (cores, patients, native slices in all) -> processes by hand: min(cores, patients, floor(c x slices / 4 s)),
# c = 0.02 s (check) or 0.05 s (prepare) per native slice, at least 1
SIZES = [
    ("check", 2, 4, 4 * 250, 2),  # 20 s of work: 5 starts' worth, 2 cores (the benchmark: 2 was faster)
    ("check", 2, 4, 4 * 40, 1),  # 3.2 s: less than one start (the benchmark: 1 was faster)
    ("prepare", 2, 2, 2 * 250, 2),  # 25 s
    ("prepare", 2, 2, 2 * 40, 1),  # 4 s: one start's worth
    ("check", 2, 6, 6 * 24 * (240 * 343) / NATIVE, 1),  # the small phantom
    ("check", 16, 20, 600, 3),  # 12 s: three starts' worth
    ("check", 16, 20, 599, 2),  # 11.98 s
    ("prepare", 16, 40, 400, 5),  # 20 s
    ("prepare", 16, 3, 10_000, 3),  # 500 s, but 3 patients
    ("check", 1, 75, 75 * 250, 1),  # one core
    ("simulate", 16, 75, 75 * 250, 1),  # its threads image slices on every core
    ("check", 16, 0, 0, 1),  # nothing readable
]


@pytest.mark.parametrize("command, cores, patients, slices, jobs", SIZES)
def test_the_default_is_sized_by_the_work_against_a_workers_start(monkeypatch, command, cores, patients, slices, jobs):
    monkeypatch.delenv(JOBS_VARIABLE)
    on_cores(monkeypatch, cores)
    work = Work(items=patients, pixels=round(slices * NATIVE))
    assert machine_jobs(command, work=work) == jobs
    assert resolve_jobs(None, command, work=lambda: work) == jobs
    monkeypatch.setenv(JOBS_VARIABLE, "7")  # the variable and an explicit --jobs win, the work is not read
    assert resolve_jobs(None, command, work=lambda: pytest.fail("read")) == 7
    assert resolve_jobs(5, command, work=lambda: pytest.fail("read")) == 5


def test_the_work_of_a_dataset_is_its_patients_and_their_images_pixels(phantom, tmp_path):
    from microseg.data.check import dataset_work
    from microseg.data.layout import find_cases
    from microseg.data.volumes import read_volume

    train, test = find_cases(phantom, "train"), find_cases(phantom, "test")
    voxels = [read_volume(case.image, "image").array.size for case in train]  # every voxel, read
    test_voxels = sum(read_volume(case.image, "image").array.size for case in test)
    assert dataset_work(phantom, ["train", "test"]) == Work(len(train) + len(test), sum(voxels) + test_voxels)
    assert dataset_work(phantom, ["train"]) == Work(len(train), sum(voxels))
    assert dataset_work(tmp_path / "absent", ["train", "test"]) == Work(0, 0)  # its check says why
    copy = tmp_path / "copy"
    shutil.copytree(phantom, copy)
    find_cases(copy, "train")[0].image.write_bytes(b"not a volume")  # a patient, its pixels unknown
    assert dataset_work(copy, ["train"]) == Work(len(train), sum(voxels[1:]))


def test_check_and_prepare_size_their_default_by_their_data(monkeypatch, phantom, tmp_path):
    from microseg.core import parallel
    from microseg.data.check import check_dataset, dataset_work
    from microseg.data.prepare import prepare_cache

    asked = []
    monkeypatch.delenv(JOBS_VARIABLE)
    monkeypatch.setattr(parallel, "size_jobs", lambda seconds, items: asked.append((seconds, items)) or 1)
    check_dataset(phantom, jobs=None)  # None: the default, as the command line gives it
    prepare_cache(phantom, tmp_path / "cache.h5", size=32, jobs=None)
    both, train = dataset_work(phantom, ["train", "test"]), dataset_work(phantom, ["train"])
    expected = [(0.02 * both.pixels / NATIVE, both.items), (0.05 * train.pixels / NATIVE, train.items)]
    assert asked == [(pytest.approx(seconds, rel=1e-12), items) for seconds, items in expected]


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
            start_worker(slots, ["3", "5"], 2)  # not the tests' one thread
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        assert seen == ["3", "5", "3"] and torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
