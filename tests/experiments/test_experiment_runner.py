"""`microseg experiment run` as the one owner of its experiment: its lock, cells whose failures are
their own (whatever the error), stop signals (no new cell starts; running cells save their
position; one line; exit 128 + signal), and workers that never outlive their runner.

The in-process tests replace a cell's training and evaluation (`cell_module._run`) by a fake
that returns, raises or signals, so they pay for no training; the process tests (slow) run the
command and its workers for real and signal or kill them."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import one_error, run_cli, snapshot, tree
from experiment_helpers import experiment_args
from microseg.core.errors import MicrosegError
from microseg.experiments import cell as cell_module
from microseg.experiments.experiment import Experiment, load_experiment

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""
"""Another process holding a flock on a file (as a running `experiment run` holds EXP/.lock)."""


def fake_cells(monkeypatch, actions: dict | None = None) -> list[tuple[str, int]]:
    """Replace each cell's training and evaluation by `actions[(loss, seed)]()` (nothing by default)
    and a result line; returns the (loss, seed) of the cells in the order they ran."""
    ran: list[tuple[str, int]] = []

    def run(experiment, cell, event, device):
        ran.append((cell.loss, cell.seed))
        action = (actions or {}).get((cell.loss, cell.seed))
        if action is not None:
            action()
        return "test DSC 0.5000 (a fake cell)"

    monkeypatch.setattr(cell_module, "_run", run)
    return ran


def hold_lock(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def cell_ids(out: Path) -> dict[tuple[str, int], str]:
    return {(c.loss, c.seed): c.id for c in load_experiment(out).cells}


def last_line(path: Path) -> str:
    return path.read_text().rstrip().splitlines()[-1]


def test_a_second_runner_is_refused_naming_the_first_and_writes_nothing(cache, phantom, tmp_path, capsys, monkeypatch):
    fake_cells(monkeypatch)
    new, existing = tmp_path / "new", tmp_path / "existing"
    code, _, err = run_cli(experiment_args(cache, phantom, existing), capsys)
    assert code == 0, err
    new.mkdir()
    for out in (new, existing):
        holder = hold_lock(out / ".lock")
        try:
            before = snapshot(out)
            attempts = [
                experiment_args(cache, phantom, out),  # the same plan
                experiment_args(cache, phantom, out, losses=("dice",), seeds=(7,)),  # another plan
                experiment_args(cache, phantom, out, seeds=(9,)) + ["--add"],
            ]
            for args in attempts:
                code, _, err = run_cli(args, capsys)
                one_error(code, err, str(out), f"pid {holder.pid}")
                assert snapshot(out) == before
        finally:
            holder.kill()
            holder.wait()
    assert tree(new) == [".lock"]  # the holder's own file: the refused runners created nothing
    code, _, err = run_cli(experiment_args(cache, phantom, new), capsys)  # a killed owner blocks no one
    assert code == 0, err
    assert not (new / ".lock").exists()  # released at the end


def test_a_refused_plan_leaves_no_folder_and_no_lock(cache, phantom, tmp_path, capsys, monkeypatch):
    fake_cells(monkeypatch)
    out = tmp_path / "a" / "b" / "exp"
    code, _, err = run_cli(experiment_args(cache, phantom, out, losses=("no_such_loss",)), capsys)
    one_error(code, err, "no_such_loss")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_two_runners_started_together_one_owns_the_experiment(cache, phantom, tmp_path):
    """Two real `experiment run` processes with different plans on one new folder: one runs its plan,
    the other exits 2 naming the first's pid and leaves no trace of its plan."""
    out = tmp_path / "exp"
    driver = (
        "import sys, time\n"
        "from microseg.experiments import cell as cell_module\n"
        "cell_module._run = lambda *a: time.sleep(2) or 'test DSC 0.5 (a fake cell)'\n"
        "from microseg.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    plans = {"focal": ("focal",), "dice": ("dice",)}
    runners = {
        name: subprocess.Popen(
            [sys.executable, "-c", driver, *map(str, experiment_args(cache, phantom, out, losses=losses, seeds=(1,)))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, losses in plans.items()
    }
    ended = {name: (p.wait(timeout=120), *p.communicate()) for name, p in runners.items()}
    codes = sorted(code for code, _, _ in ended.values())
    assert codes == [0, 2], ended
    winner = next(name for name, (code, _, _) in ended.items() if code == 0)
    loser = next(name for name in plans if name != winner)
    one_error(ended[loser][0], ended[loser][2], f"pid {runners[winner].pid}")
    assert load_experiment(out).plan.losses == [winner]
    assert all(loser not in path for path in tree(out))


def test_a_failed_cell_never_stops_the_others(cache, phantom, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    args = experiment_args(cache, phantom, out, losses=("focal", "ag_bce"), seeds=(1, 2, 3))
    fake_cells(monkeypatch)
    run_cli(args, capsys)  # the experiment; no cell is done (a fake cell writes no run folder)
    ids = cell_ids(out)
    logs = out / "logs"
    (logs / f"{ids['ag_bce', 1]}.log").unlink()
    (logs / f"{ids['ag_bce', 1]}.log").mkdir()  # a log path that is a folder
    too_long, real_log = ids["focal", 2], Experiment.log
    monkeypatch.setattr(
        Experiment,
        "log",
        lambda self, cell: self.path / "logs" / ("x" * 300 + ".log") if cell.id == too_long else real_log(self, cell),
    )
    unwritable = tmp_path / "somewhere" / "checkpoint.pt"
    ran = fake_cells(
        monkeypatch,
        {
            ("focal", 1): _raise(RuntimeError("boom in training")),
            ("ag_bce", 2): _raise(MicrosegError("a bad input of this cell")),
            ("focal", 3): _raise(OSError(errno.EROFS, "Read-only file system", str(unwritable))),
        },
    )
    code, stdout, err = run_cli(args, capsys)
    failed = [ids[k] for k in [("focal", 1), ("ag_bce", 1), ("focal", 2), ("ag_bce", 2), ("focal", 3)]]
    line = one_error(code, err, *failed, f"{len(failed)} of 6 cells failed")
    assert ids["ag_bce", 3] not in line
    assert ran == [("focal", 1), ("ag_bce", 2), ("focal", 3), ("ag_bce", 3)]  # the two bad logs never started
    assert f"{ids['ag_bce', 3]}: finished" in stdout and "[1 of 6 done, 5 failed]" in stdout
    assert f"{ids['ag_bce', 1]}: failed: cannot write its log: {logs / ids['ag_bce', 1]}.log: Is a directory" in stdout
    assert f"{ids['focal', 2]}: failed: cannot write its log" in stdout and "File name too long" in stdout
    unexpected = (logs / f"{ids['focal', 1]}.log").read_text()
    assert "Traceback" in unexpected and "RuntimeError: boom in training" in unexpected
    assert last_line(logs / f"{ids['focal', 1]}.log").startswith("microseg: error: RuntimeError: boom in training")
    assert last_line(logs / f"{ids['focal', 3]}.log") == f"microseg: error: {unwritable}: Read-only file system"
    assert last_line(logs / f"{ids['ag_bce', 2]}.log") == "microseg: error: a bad input of this cell"
    assert "Traceback" not in (logs / f"{ids['ag_bce', 2]}.log").read_text()
    code, status, _ = run_cli(["experiment", "status", out], capsys)
    states = {row.split()[0]: row for row in status.splitlines()[2:]}
    assert "failed: RuntimeError: boom in training" in states[ids["focal", 1]]
    assert "failed: its log cannot be read" in states[ids["ag_bce", 1]]


def _raise(err: BaseException):
    def action():
        raise err

    return action


def test_a_failing_write_is_named_not_the_experiments_lock(cache, phantom, tmp_path, capsys, monkeypatch):
    """The folder stops taking writes mid-run (here: a file where `oof/` goes, and `.lock` no longer
    removable): the error names the write that failed; the lock's release stays silent."""
    out = tmp_path / "exp"

    def break_the_folder():
        (out / "oof").write_text("in the way")
        os.rename(out / ".lock", tmp_path / "the-lock")  # the runner's lock stays held (same file)
        (out / ".lock").mkdir()  # and unlinking EXP/.lock now fails

    fake_cells(monkeypatch, {("focal", 1): break_the_folder})
    code, _, err = run_cli(experiment_args(cache, phantom, out, losses=("focal",), seeds=(1,), folds=2), capsys)
    line = one_error(code, err, str(out / "oof"))
    assert ".lock" not in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_made_read_only_mid_run_names_the_write(cache, phantom, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    fake_cells(monkeypatch, {("focal", 1): lambda: out.chmod(0o555)})
    try:
        code, _, err = run_cli(experiment_args(cache, phantom, out, losses=("focal",), seeds=(1,), folds=2), capsys)
    finally:
        out.chmod(0o755)
    line = one_error(code, err, str(out / "oof"))
    assert ".lock" not in line


STOPS = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]


@pytest.mark.parametrize("signum", STOPS, ids=[s.name for s in STOPS])
def test_a_stop_signal_in_process_starts_nothing_and_names_the_cell_to_resume(
    signum, cache, phantom, tmp_path, capsys, monkeypatch
):
    from microseg.core.stop import installed

    if signal.getsignal(signum) is not (signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL):
        pytest.skip(f"{signum.name} is not at its default here (ignored by the shell that started the tests)")
    out = tmp_path / "exp"

    def stop():
        assert installed() is not None  # the runner handles it: the signal will not end pytest
        os.kill(os.getpid(), signum)
        time.sleep(30)  # the handler raises in here
        raise AssertionError(f"{signum.name} was not raised")

    ran = fake_cells(monkeypatch, {("focal", 1): stop})
    code, stdout, err = run_cli(experiment_args(cache, phantom, out, losses=("focal", "dice"), seeds=(1, 2)), capsys)
    ids = cell_ids(out)
    assert code == 128 + signum and ran == [("focal", 1)]
    lines = [line for line in err.splitlines() if line.startswith("microseg:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"microseg: interrupted: {signum.name}; cell(s) to resume: {ids['focal', 1]}; 3 ")
    assert last_line(out / "logs" / f"{ids['focal', 1]}.log") == "microseg: interrupted"
    assert sorted(p.name for p in (out / "logs").iterdir()) == [f"{ids['focal', 1]}.log"]
    assert signal.getsignal(signum) is not None and installed() is None  # the handlers are restored


# -- the process tests: the command and its workers for real ------------------------------------------------


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


def saved_position(log: Path, run: Path) -> None:
    """The log says the cell was interrupted and where it saved; last.pt holds that position."""
    import re

    text = log.read_text()
    assert text.rstrip().endswith("microseg: interrupted"), text[-500:]
    epoch, step = map(int, re.findall(r"interrupted at epoch (\d+), step (\d+): saved", text)[-1])
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (epoch - 1, step)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"]
)
def test_workers_stop_with_their_runner_saving_their_position(signum, cache, phantom, tmp_path):
    """--jobs 2, three long cells: the runner is signalled (or killed) once both workers train. No
    third cell starts, both running cells save their position at a step's end, and no worker or
    resource tracker of the runner remains."""
    out = tmp_path / "exp"
    runner, stdout = start_runner(experiment_args(cache, phantom, out, losses=("focal",), seeds=(1, 2, 3)), tmp_path)
    try:
        wait_for(lambda: stdout.read_text().count("epoch 1 of 1000") == 2, "both workers training")
        family = children(runner.pid)  # two workers and the resource tracker
        assert len(family) == 3, family
        if signum == signal.SIGINT:  # a terminal's Ctrl-C reaches every process of the group
            os.killpg(runner.pid, signum)
        else:
            runner.send_signal(signum)
        code = runner.wait(timeout=120)
        wait_for(lambda: not any(alive(pid) for pid in family), "the workers and the tracker ending", 60)
    finally:
        if runner.poll() is None:
            runner.kill()
    ids = {c.seed: c for c in load_experiment(out).cells}
    for seed in (1, 2):
        saved_position(out / "logs" / f"{ids[seed].id}.log", ids[seed].run)
    assert not (out / "logs" / f"{ids[3].id}.log").exists() and not ids[3].run.exists()
    err = runner.stderr.read() if runner.stderr else ""
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
        return
    assert code == 128 + signum
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"microseg: interrupted: {signum.name}; cell(s) to resume: "), err
    assert ids[1].id in lines[0] and ids[2].id in lines[0] and "1 cell(s) not started" in lines[0]


@pytest.mark.slow
def test_a_killed_worker_is_its_cells_failure_and_its_slot_runs_the_next(cache, phantom, tmp_path):
    """kill -9 of one worker (as the OOM killer does): its cell fails with one line, recorded in its log;
    the free slot starts the third cell; a SIGTERM then stops the two running ones."""
    import re

    out = tmp_path / "exp"
    runner, stdout = start_runner(experiment_args(cache, phantom, out, losses=("focal",), seeds=(1, 2, 3)), tmp_path)
    try:
        wait_for(lambda: stdout.read_text().count("epoch 1 of 1000") == 2, "both workers training")
        ids = {c.seed: c for c in load_experiment(out).cells}
        log = out / "logs" / f"{ids[1].id}.log"
        worker = int(re.findall(rf"cell {re.escape(ids[1].id)} \(pid (\d+)\)", log.read_text())[0])
        assert worker in children(runner.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: f"{ids[3].id}: epoch 1 of 1000" in stdout.read_text(), "the third cell training")
        family = children(runner.pid)
        runner.send_signal(signal.SIGTERM)
        code = runner.wait(timeout=120)
        wait_for(lambda: not any(alive(pid) for pid in family), "the workers and the tracker ending", 60)
    finally:
        if runner.poll() is None:
            runner.kill()
    killed = "its worker process ended with signal SIGKILL and no result"
    assert f"{ids[1].id}: failed: {killed}" in stdout.read_text()
    assert last_line(log) == f"microseg: error: {killed}"
    for seed in (2, 3):
        saved_position(out / "logs" / f"{ids[seed].id}.log", ids[seed].run)
    err = runner.stderr.read() if runner.stderr else ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 128 + signal.SIGTERM and len(lines) == 1, err
    assert ids[2].id in lines[0] and ids[3].id in lines[0] and f"1 failed: {ids[1].id}" in lines[0]


def start_runner(args: list, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`microseg experiment run ARGS --epochs 1000 --jobs 2` in its own process group, its stdout in a file."""
    stdout = tmp_path / "stdout"
    with open(stdout, "w") as handle:  # the runner holds its own copy of the descriptor
        runner = subprocess.Popen(
            [sys.executable, "-m", "microseg", *map(str, args), "--epochs", "1000", "--jobs", "2"],
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,  # its own process group, as a command started from a terminal
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background pytest ignores SIGINT
        )
    return runner, stdout


@pytest.mark.slow
def test_a_cell_failing_in_a_worker_leaves_the_others_running(cache, phantom, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    args = experiment_args(cache, phantom, out, losses=("focal",), seeds=(1, 2, 3))
    fake_cells(monkeypatch)  # the experiment, no cell trained (the workers below run the real cells)
    run_cli(args, capsys)
    ids = cell_ids(out)
    shutil.rmtree(out / "logs")
    for seed in (1, 2):
        (out / "logs" / f"{ids['focal', seed]}.log").mkdir(parents=True)
    code, stdout, err = run_cli(args + ["--jobs", "2"], capsys)
    one_error(code, err, ids["focal", 1], ids["focal", 2], "2 of 3 cells failed")
    assert f"{ids['focal', 3]}: finished" in stdout
    assert (load_experiment(out).cells[2].run / "metrics" / "per_patient.csv").is_file()
