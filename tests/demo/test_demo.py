"""The experiment's local executor (what the demo trains with): worker processes side by side, one
GPU or a share of the cores each, progress lines, a failed cell reported as one line and retried."""

from __future__ import annotations

import os

import pytest

from cli_helpers import one_error, run_cli
from experiment_helpers import experiment_args, patients_of
from microseg.core.errors import MicrosegError
from microseg.demo import DEMO_JOBS, DEMO_LOSSES, DEMO_SEEDS
from microseg.experiments.experiment import load_experiment


def test_the_demo_is_three_losses_of_at_least_two_seeds():
    assert len(DEMO_LOSSES) == 3 and len(set(DEMO_SEEDS)) >= 2 and DEMO_JOBS >= 1


@pytest.mark.slow  # starts two worker processes
def test_workers_run_the_cells_side_by_side(cache, phantom, tmp_path, capfd):
    from microseg.cli import main

    out = tmp_path / "exp"
    assert main([str(a) for a in experiment_args(cache, phantom, out, seeds=(1,)) + ["--jobs", "2"]]) == 0
    printed = capfd.readouterr().out
    assert "in 2 worker(s) on the CPU, 1 thread(s) each" in printed  # 2 cores (the CI machine's) / 2 workers
    for cell in load_experiment(out).cells:
        assert f"{cell.id}: started" in printed and f"{cell.id}: epoch 1 of 1" in printed
        assert patients_of(cell.run / "metrics" / "per_patient.csv") == ["01", "02"]
    assert "[2 of 2 done]" in printed


def test_a_failed_cell_is_one_line_the_others_finish_and_a_rerun_retries_it(
    cache, phantom, tmp_path, capsys, monkeypatch
):
    from microseg.training.trainer import Trainer

    real_step = Trainer.train_step

    def failing_for_focal(self, batch):
        if self.config.loss == "focal":
            raise MicrosegError("simulated failure of the focal cell")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", failing_for_focal)
    out = tmp_path / "exp"
    args = experiment_args(cache, phantom, out, seeds=(1,))
    code, printed, err = run_cli(args, capsys)
    one_error(code, err, "1 of 2 cells failed", "focal__s1: simulated failure")
    assert "focal__s1: failed: simulated failure of the focal cell" in printed
    focal, ag_bce = load_experiment(out).cells
    assert (ag_bce.run / "metrics" / "per_patient.csv").is_file() and not focal.run.exists()
    assert (out / "logs" / "focal__s1.log").read_text().splitlines()[-1] == (
        "microseg: error: simulated failure of the focal cell"
    )
    code, status, _ = run_cli(["experiment", "status", out], capsys)
    assert "failed: simulated failure" in status and "1 done, 1 failed" in status
    monkeypatch.setattr(Trainer, "train_step", real_step)
    code, printed, err = run_cli(args, capsys)
    assert code == 0, err
    assert "1 done, 1 to run" in printed and "focal__s1: finished" in printed


def test_each_worker_takes_its_own_gpu(monkeypatch):
    from microseg.experiments.local import _Pool, claim_device, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus("auto") == ["3", "5"] and visible_gpus("cpu") == []
    pool = _Pool(jobs=3, gpus=["3", "5"], threads=0, device="auto")
    assert [pool.gpu(slot) for slot in range(3)] == ["3", "5", "3"]  # worker i: GPU i mod n
    assert _Pool(jobs=2, gpus=[], threads=1, device="cpu").gpu(1) is None
    claim_device(pool.gpu(1), threads=0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
