"""Training on several processes (gloo, 2 CPU processes, as torchrun starts them): the global batch,
resumes from 1 to 2 and from 2 to 1 processes, Ctrl-C at several steps, and a failure on rank 0 or
rank 1 ending every process. These start processes (seconds each): the slow group of the suite."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from microseg.cli import main
from microseg.core.tables import read_csv
from process_helpers import install_recorder, launch, steps_by_position
from train_helpers import TINY_TRAIN, train_tiny

pytestmark = pytest.mark.slow  # each test starts processes

ENDED_WITHIN_S = 60  # every process ends this soon after the Ctrl-C or failure (a hang: gloo's 30 minutes)


def tiny_args(cache, run, *extra: str) -> list[str]:
    options = dict(TINY_TRAIN, sync_every=1)  # a check every step: the saved sums hold every process's
    args = ["train", "--cache", str(cache), "--run", str(run), "--device", "cpu"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


def history(run):
    return read_csv(run / "history.csv")


def lrs(run) -> list[float]:
    return [float(row["lr"]) for row in history(run)]


def position(run) -> tuple[int, int]:
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    return state["epoch"], state["step"]


def completed(record: dict, actions: dict) -> dict:
    """The record without the step a "ctrl_c" or "raise" stopped before it ran."""
    stopped = [call for call, action in actions.items() if action in ("ctrl_c", "raise")]
    steps = record["steps"][: min(stopped) - 1] if stopped else record["steps"]
    return {**record, "steps": steps}


def train_in_process(cache, run, actions: dict | None = None, resume: bool = False) -> dict:
    """One process, here, recording its completed steps (and whether Ctrl-C stopped it)."""
    record: dict = {"interrupted": False}
    patch = pytest.MonkeyPatch()
    install_recorder(record, actions or {}, patch.setattr)
    try:
        if resume:
            assert main(["train", "--run", str(run), "--resume"]) == 0
        else:
            train_tiny(cache, run, sync_every=1)
    except KeyboardInterrupt:
        record["interrupted"] = True
    finally:
        patch.undo()
    return completed(record, actions or {})


@pytest.fixture(scope="module")
def one_process(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    return run, train_in_process(cache, run)


@pytest.fixture(scope="module")
def two_processes(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    records = launch(2, tiny_args(cache, run), run.parent / "log")
    assert [r["code"] for r in records] == [0, 0], [r["err"][-3:] for r in records]
    return run, records


def test_two_processes_split_the_global_batch_and_keep_the_schedule(one_process, two_processes):
    (one, solo), (two, (rank0, rank1)) = one_process, two_processes
    # 12 training slices, global batch 4: 3 steps an epoch on 1 or 2 processes, lr_i = 3e-3 (1 - i / 6)^0.9
    expected = [3e-3 * (1 - (3 * (e + 1) - 1) / 6) ** 0.9 for e in range(2)]
    assert lrs(one) == pytest.approx(expected, rel=1e-12) and lrs(two) == lrs(one)
    # the same 4 slices at each step, 2 on each process
    assert steps_by_position(rank0, rank1) == steps_by_position(solo)
    assert all(len(ids) == 2 for _, _, ids, _ in rank0["steps"] + rank1["steps"])
    # dropout: each process its own stream at each step; rank 0's is the single process's
    for (e0, s0, _, state0), (e1, s1, _, state1), (_, _, _, state) in zip(
        rank0["steps"], rank1["steps"], solo["steps"], strict=True
    ):
        assert (e0, s0) == (e1, s1) and state0 != state1 and state0 == state


@pytest.mark.parametrize("call", [2, 5])  # Ctrl-C inside the 2nd step of epoch 1, the 2nd of epoch 2
def test_ctrl_c_on_two_processes_saves_the_position_and_resumes_on_two_or_one(
    call, cache, tmp_path, one_process, two_processes
):
    (one, solo), (two, full) = one_process, two_processes
    run = tmp_path / "cut"
    cut = launch(2, tiny_args(cache, run), tmp_path / "log_cut", {0: {call: "sigint"}, 1: {call: "sigint"}})
    assert [r["code"] for r in cut] == [130, 130]
    assert max(r["ended"] for r in cut) - min(r["injected"] for r in cut) < ENDED_WITHIN_S
    epoch, step = divmod(call, 3)  # the step Ctrl-C arrived in ran to its end
    assert position(run) == (epoch, step)
    shutil.copytree(run, tmp_path / "cut1")

    # resumed on 2 processes: the uninterrupted run's weights, history and steps
    resumed = launch(2, ["train", "--run", str(run), "--resume"], tmp_path / "log_resume")
    assert [r["code"] for r in resumed] == [0, 0], [r["err"][-3:] for r in resumed]
    a = torch.load(two / "last.pt", weights_only=False)["model"]
    b = torch.load(run / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for got, want in zip(history(run), history(two), strict=True):  # the epoch losses summed over both processes
        assert {k: float(v) for k, v in got.items() if k != "seconds"} == pytest.approx(
            {k: float(v) for k, v in want.items() if k != "seconds"}, rel=1e-12, nan_ok=True
        )
    for rank in (0, 1):
        assert cut[rank]["steps"] + resumed[rank]["steps"] == full[rank]["steps"]

    # resumed on 1 process: the same schedule and slices as the uninterrupted single process
    rest = train_in_process(cache, tmp_path / "cut1", resume=True)
    assert lrs(tmp_path / "cut1") == lrs(one)
    assert steps_by_position(cut[0], cut[1], rest) == steps_by_position(solo)
    assert all(math.isfinite(float(row["loss"])) for row in history(tmp_path / "cut1"))


def test_one_process_run_resumes_on_two(cache, tmp_path, one_process):
    one, solo = one_process
    run = tmp_path / "cut"
    before = train_in_process(cache, run, {5: "ctrl_c"})  # before the 2nd step of epoch 2
    assert before["interrupted"] and position(run) == (1, 1)
    resumed = launch(2, ["train", "--run", str(run), "--resume"], tmp_path / "log")
    assert [r["code"] for r in resumed] == [0, 0], [r["err"][-3:] for r in resumed]
    assert lrs(run) == lrs(one)
    assert steps_by_position(before, *resumed) == steps_by_position(solo)


@pytest.mark.parametrize(
    "actions, codes, last",
    [
        ({0: {2: "sigint"}}, [130, 2], (0, 2)),  # Ctrl-C on rank 0 alone: it saves, rank 1 stops
        ({1: {2: "raise"}}, [2, "raised"], None),  # a failure on rank 1 in a step: nothing was kept yet
        ({0: {"validate": "raise"}}, [2, 2], None),  # rank 0 fails alone (validation) while rank 1 waits
        ({0: {5: "raise"}}, ["raised", 2], (1, 0)),  # a failure on rank 0 in epoch 2: last.pt keeps epoch 1
    ],
    ids=["ctrl_c_rank0", "fail_rank1_step", "fail_rank0_validation", "fail_rank0_step"],
)
def test_ctrl_c_or_a_failure_on_one_process_ends_both(actions, codes, last, cache, tmp_path):
    run = tmp_path / "run"
    records = launch(2, tiny_args(cache, run), tmp_path / "log", actions)
    got = [r["code"] if isinstance(r["code"], int) else r["code"].split()[0] for r in records]
    assert got == codes, [r["err"][-3:] for r in records]
    injected = min(r["injected"] for r in records if "injected" in r)
    assert max(r["ended"] for r in records) - injected < ENDED_WITHIN_S
    for record, code in zip(records, codes, strict=True):
        if code == 2:  # one line naming what happened
            assert len(record["err"]) == 1 and record["err"][0].startswith("microseg: error:"), record["err"]
    if last is None:
        assert not (run / "last.pt").exists() and not (run / "config.yaml").exists()
    else:
        assert position(run) == last
