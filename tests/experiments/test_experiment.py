"""`microseg experiment`: plans, splits, cells as run folders, reruns that train nothing, resuming,
cross-validation's held-out and out-of-fold files, and the refusals."""

from __future__ import annotations

import json
import os
import signal
from itertools import combinations
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import one_error, run_cli, tree
from experiment_helpers import csv_rows, experiment_args, patients_of
from microseg.experiments.experiment import kfold, load_experiment


def files_with_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    }


def test_kfold_is_deterministic_disjoint_covering_and_balanced():
    patients = [f"{i:02d}" for i in range(1, 8)]
    folds = kfold(patients, 3)
    assert kfold(list(reversed(patients)), 3) == folds  # the same patients, whatever their order
    assert sorted(p for fold in folds for p in fold) == patients
    assert all(not set(a) & set(b) for a, b in combinations(folds, 2))
    assert sorted(len(fold) for fold in folds) == [2, 2, 3]  # 7 = 3 + 2 + 2
    assert kfold(patients, 0) == []


@pytest.fixture(scope="module")
def plain(cache, phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "plain"
    from microseg.cli import main

    assert main([str(a) for a in experiment_args(cache, phantom, out)]) == 0
    return out


def test_cells_are_run_folders_of_each_loss_and_seed_on_the_fixed_split(plain, phantom):
    experiment = load_experiment(plain)
    assert [(c.loss, c.seed, c.fold) for c in experiment.cells] == [
        ("focal", 1, None),
        ("ag_bce", 1, None),
        ("focal", 2, None),
        ("ag_bce", 2, None),
    ]
    record = json.loads((plain / "experiment.json").read_text())
    assert record["version"] == 2 and record["plan"]["folds"] == 0 and record["plan"]["base"]["epochs"] == 1
    assert [c["run"] for c in record["cells"]] == [f"runs/{c.id}" for c in experiment.cells]
    splits = json.loads((plain / "splits.json").read_text())
    assert splits == {"folds": [], "test": ["01", "02"]}  # the phantom's two test patients
    for cell in experiment.cells:
        config = yaml.safe_load((cell.run / "config.yaml").read_text())
        assert (config["loss"], config["seed"], config["patients"], config["val_patients"]) == (
            cell.loss,
            cell.seed,
            [],
            [],
        )
        assert patients_of(cell.run / "metrics" / "per_patient.csv") == ["01", "02"]
        assert json.loads((cell.run / "metrics" / "evaluation.json").read_text())["split"] == "test"
        assert not (cell.run / "heldout").exists()


def test_a_second_run_trains_nothing_and_touches_no_file(plain, cache, phantom, capsys):
    before = files_with_stamps(plain / "runs")
    code, out, err = run_cli(experiment_args(cache, phantom, plain), capsys)
    assert code == 0, err
    assert "4 cell(s), 4 done, 0 to run" in out
    assert files_with_stamps(plain / "runs") == before
    code, out, _ = run_cli(["experiment", "run", "--out", plain], capsys)  # the stored plan, no options
    assert code == 0 and "0 to run" in out
    code, out, _ = run_cli(["experiment", "status", plain], capsys)
    assert code == 0 and "4 done" in out and out.count("done") == 5


def test_folds_split_the_training_patients_and_out_of_fold_covers_each_once(cache, phantom, tmp_path, capsys):
    out = tmp_path / "cv"
    code, stdout, err = run_cli(experiment_args(cache, phantom, out, losses=("focal",), folds=2), capsys)
    assert code == 0, err
    splits = json.loads((out / "splits.json").read_text())
    folds = splits["folds"]
    assert len(folds) == 2 and not set(folds[0]) & set(folds[1])
    assert sorted(folds[0] + folds[1]) == ["01", "02", "03"]  # the phantom's three training patients
    experiment = load_experiment(out)
    assert len(experiment.cells) == 4
    for cell in experiment.cells:
        config = yaml.safe_load((cell.run / "config.yaml").read_text())
        held_out = folds[cell.fold]
        assert config["val_patients"] == held_out
        assert sorted(config["patients"]) == sorted(set(folds[0] + folds[1]) - set(held_out))
        assert patients_of(cell.run / "heldout" / "per_patient.csv") == held_out
        assert json.loads((cell.run / "heldout" / "evaluation.json").read_text())["split"] == "train"
        assert patients_of(cell.run / "metrics" / "per_patient.csv") == ["01", "02"]
        history = csv_rows(cell.run / "history.csv")
        assert "val_dsc" in history[0]  # validated on its held-out fold
    rows = csv_rows(out / "oof" / "per_patient.csv")
    assert list(rows[0])[:4] == ["loss", "seed", "case_id", "dsc"]
    for seed in ("1", "2"):
        assert sorted(r["case_id"] for r in rows if r["seed"] == seed) == ["01", "02", "03"]
    assert len(rows) == 6
    assert "epoch 1 of 1" in stdout and "[4 of 4 done]" in stdout


def test_an_interrupted_experiment_is_completed_by_the_next_run(cache, phantom, tmp_path, capsys, monkeypatch):
    from microseg.core.stop import installed
    from microseg.training.trainer import Trainer

    out = tmp_path / "exp"
    args = experiment_args(cache, phantom, out, losses=("focal",), seeds=(1,)) + ["--epochs", "2"]
    real_step, calls = Trainer.train_step, {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # epoch 2, step 2: an epoch is 5 steps (the phantom's 18 training slices, batch 4)
            assert installed() is not None  # the runner handles SIGTERM: it will not end pytest
            os.kill(os.getpid(), signal.SIGTERM)  # a time limit: held to the step's end
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    code, _, err = run_cli(args, capsys)
    assert code == 128 + signal.SIGTERM
    assert torch.load(load_experiment(out).cells[0].run / "last.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(Trainer, "train_step", real_step)
    code, out_text, _ = run_cli(["experiment", "status", out], capsys)
    assert "interrupted, epoch 1 of 2" in out_text
    code, out_text, err = run_cli(args, capsys)
    assert code == 0, err
    assert "resumed at epoch 2" in out_text
    cell = load_experiment(out).cells[0]
    assert len(csv_rows(cell.run / "history.csv")) == 2
    reference = tmp_path / "reference"
    code, _, err = run_cli(
        experiment_args(cache, phantom, reference, losses=("focal",), seeds=(1,)) + ["--epochs", "2"], capsys
    )
    assert code == 0, err
    resumed = torch.load(cell.run / "last.pt", weights_only=False)["model"]
    uninterrupted = torch.load(load_experiment(reference).cells[0].run / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_add_grows_the_experiment_and_a_changed_plan_is_refused(plain, cache, phantom, tmp_path, capsys):
    code, _, err = run_cli(experiment_args(cache, phantom, plain) + ["--epochs", "2"], capsys)
    one_error(code, err, "base.epochs: 1 -> 2")
    code, _, err = run_cli(experiment_args(cache, phantom, plain, seeds=(1, 2, 3)), capsys)
    one_error(code, err, "seeds", "--add")
    assert len(load_experiment(plain).cells) == 4


def test_bad_plans_are_one_line_and_create_nothing(cache, phantom, tmp_path, capsys):
    out = tmp_path / "exp"
    cases = [
        (experiment_args(cache, phantom, out, losses=("focal", "nope")), "nope"),
        (experiment_args(cache, phantom, out, seeds=(1, 1)), "duplicate seed(s) in the plan: 1"),
        (experiment_args(cache, phantom, out, folds=4), "folds 4 is more than the 3 training patients"),
        (experiment_args(cache, phantom, out, folds=1), "folds must be 0"),
    ]
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "losses": ["focal"],
                "cache": str(cache),
                "data": str(phantom),
                "base": {"model": "tiny", "learning_rate": 1},
            }
        )
    )
    cases.append((["experiment", "run", plan, "--out", out], "learning_rate"))
    for args, needle in cases:
        code, _, err = run_cli(args, capsys)
        one_error(code, err, needle)
        assert not out.exists(), args
    with pytest.raises(SystemExit) as exit_:
        run_cli(experiment_args(cache, phantom, out) + ["--bogus"], capsys)
    one_error(exit_.value.code, capsys.readouterr().err, "unrecognized arguments: --bogus")
    assert not out.exists()
    (out / "runs" / "focal__s1").mkdir(parents=True)
    code, _, err = run_cli(experiment_args(cache, phantom, out), capsys)
    one_error(code, err, "not empty and holds no experiment.json")
    assert tree(out) == ["runs", "runs/focal__s1"]


def test_a_deleted_or_locked_cell_is_refused(plain, cache, phantom, tmp_path, capsys):
    import shutil

    from microseg.runs.folder import RunLock

    copy = tmp_path / "copy"
    shutil.copytree(plain, copy)
    cell = load_experiment(copy).cells[1]
    lock = RunLock(cell.run)
    lock.acquire()
    try:
        code, _, err = run_cli(["experiment", "run", "--out", copy], capsys)
        one_error(code, err, cell.id, "locked by a live process")
    finally:
        lock.release()
    shutil.rmtree(cell.run)
    before = tree(copy)
    code, _, err = run_cli(["experiment", "run", "--out", copy], capsys)
    one_error(code, err, cell.id, "was deleted")
    assert tree(copy) == before


def test_experiment_cell_runs_one_cell_and_the_out_of_fold_scores_once_its_folds_are_done(
    cache, phantom, tmp_path, capsys
):
    from microseg.experiments.experiment import open_experiment

    out = tmp_path / "cv"
    base = {"model": "tiny", "epochs": 1, "batch_size": 4, "optimizer": "adam", "lr": 3e-3, "num_workers": 0}
    plan = {"losses": ["focal"], "seeds": [1], "folds": 2, "cache": str(cache), "data": str(phantom), "base": base}
    experiment = open_experiment(out, plan)  # as `experiment run` writes it before any cell runs
    folds = json.loads((out / "splits.json").read_text())["folds"]
    first, second = experiment.cells
    code, stdout, err = run_cli(["experiment", "cell", out, first.id, "--device", "cpu"], capsys)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith(f"{first.id}: finished, test DSC ")
    assert patients_of(first.run / "heldout" / "per_patient.csv") == folds[first.fold]
    assert not (out / "oof" / "per_patient.csv").exists()  # its other fold is not done yet
    code, stdout, err = run_cli(["experiment", "cell", out, second.id, "--device", "cpu"], capsys)
    assert code == 0, err
    rows = csv_rows(out / "oof" / "per_patient.csv")
    assert sorted(r["case_id"] for r in rows) == sorted(folds[0] + folds[1])  # every training patient once
