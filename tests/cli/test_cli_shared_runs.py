"""One writer, consistent readers, through the CLI.

- `evaluate` takes the run's lock: while `train` writes the run (or another process holds the
  lock) it is refused naming the holder's pid and writes nothing; `train --force` while an
  evaluation holds the lock is refused the same way, so the metrics and predictions stay those
  of the model they scored.
- `metrics/evaluation.json` records the checkpoint it scored (file, epoch, sha256 of its bytes);
  `compare` refuses metrics whose checkpoint is no longer the run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import one_error, run_cli
from microseg.cli import main
from train_helpers import TINY_TRAIN


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_argv(cache: Path, run: Path, *extra) -> list:
    argv = ["train", "--cache", cache, "--run", run]
    for key, value in TINY_TRAIN.items():
        argv += ["--" + key.replace("_", "-"), value]
    return argv + list(extra)


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def evaluate_argv(run: Path, phantom: Path) -> list:
    return ["evaluate", "--run", run, "--data", phantom, "--device", "cpu", "--jobs", 1]


def test_evaluate_and_train_force_are_refused_while_another_process_holds_the_lock(run, cache, phantom, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from microseg.runs.folder import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(120)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        code, _, err = run_cli(evaluate_argv(run, phantom), capsys)
        one_error(code, err, str(run), f"pid {holder.pid}")
        code, _, err = run_cli(train_argv(cache, run, "--force"), capsys)
        one_error(code, err, str(run), f"pid {holder.pid}")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(evaluate_argv(run, phantom), capsys)[0] == 0  # a killed holder never blocks


def test_train_force_during_an_evaluation_is_refused(run, cache, phantom, capsys, monkeypatch):
    import microseg.evaluation.evaluate as evaluate_module

    real, answers = evaluate_module._evaluate_case, []

    def score_and_meanwhile_retrain(*args, **kwargs):
        if not answers:
            answers.append(main([str(a) for a in train_argv(cache, run, "--force")]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "_evaluate_case", score_and_meanwhile_retrain)
    model = snapshot(run)["best.pt"]
    code, _, err = run_cli(evaluate_argv(run, phantom), capsys)
    assert code == 0 and answers == [2]
    assert f"pid {os.getpid()}" in err and "microseg: error: run" in err
    assert snapshot(run)["best.pt"] == model  # the model the metrics scored is still the run's
    recorded = json.loads((run / "metrics" / "evaluation.json").read_text())
    assert recorded["checkpoint_sha256"] == hashlib.sha256(model).hexdigest()


def test_evaluate_while_train_writes_the_run_is_refused(cache, phantom, tmp_path, capsys, monkeypatch):
    from microseg.training.trainer import Trainer

    run, answers = tmp_path / "r", []
    real = Trainer.train_step

    def step_and_meanwhile_evaluate(*args, **kwargs):
        if not answers and (run / "last.pt").exists():  # epoch 2: a checkpoint of epoch 1 is there
            answers.append(main([str(a) for a in evaluate_argv(run, phantom)]))
        return real(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", step_and_meanwhile_evaluate)
    code, _, err = run_cli(train_argv(cache, run), capsys)
    assert code == 0 and answers == [2]
    assert f"pid {os.getpid()}" in err
    assert not (run / "metrics").exists() and not (run / "predictions").exists()


def test_metrics_record_their_checkpoint_and_compare_refuses_stale_ones(run, phantom, tmp_path, capsys):
    assert run_cli(evaluate_argv(run, phantom), capsys)[0] == 0
    recorded = json.loads((run / "metrics" / "evaluation.json").read_text())
    best = torch.load(run / "best.pt", weights_only=True)
    assert recorded["checkpoint"] == "best.pt" and recorded["checkpoint_epoch"] == best["epoch"]
    assert recorded["checkpoint_sha256"] == hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    assert run_cli(["compare", run, "--out", tmp_path / "ok"], capsys)[0] == 0

    shutil.copy(run / "last.pt", run / "best.pt")  # the run's model changed since its evaluation
    code, _, err = run_cli(["compare", run, "--out", tmp_path / "stale"], capsys)
    one_error(code, err, str(run), "best.pt", "evaluate the run again")
    (run / "best.pt").unlink()  # now last.pt is what evaluate would use: still not what was scored
    code, _, err = run_cli(["compare", run, "--out", tmp_path / "stale"], capsys)
    one_error(code, err, str(run), "evaluate the run again")
    assert not (tmp_path / "stale").exists()
