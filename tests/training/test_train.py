"""Training: history, checkpoints, resume equivalence, NaN stop, Ctrl-C, refusals, torchrun."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microseg.cli import main
from microseg.core.errors import MicrosegError
from microseg.runs.config import resolve_train_config
from microseg.training.trainer import train
from train_helpers import TINY_TRAIN, faulty_trainer, tiny_train_argv, train_tiny, train_until_ctrl_c


def read_history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_history_and_checkpoints(trained_run):
    rows = read_history(trained_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"loss", "loss_4", "loss_8", "loss_16", "loss_32", "bce", "val_dsc", "val_hd95_mm", "lr", "seconds"} <= set(
        rows[0]
    )
    for row in rows:  # total = plain sum of the four scales (reference weights 1, 1, 1, 1)
        scales = sum(float(row[k]) for k in ("loss_4", "loss_8", "loss_16", "loss_32"))
        assert float(row["loss"]) == pytest.approx(scales, rel=1e-5)
        assert 0 <= float(row["val_dsc"]) <= 1
    assert (trained_run / "last.pt").is_file() and (trained_run / "config.yaml").is_file()
    assert not [p for p in trained_run.iterdir() if p.name.startswith(".")]  # no temp files left


def test_calf_statistics_come_from_the_training_slices(cache, tmp_path):
    import json

    from scipy.stats import kurtosis, skew

    from microseg.data.cache import foreground_areas
    from microseg.data.dataset import split_by_patient

    run = train_tiny(cache, tmp_path / "calf", loss="calf", epochs=1)
    saved = json.loads((run / "calf_stats.json").read_text())
    train_idx, _ = split_by_patient(cache, TINY_TRAIN["val_fraction"], TINY_TRAIN["seed"])
    areas = foreground_areas(cache)[train_idx]
    # CALF's default (Table 1: all N images) counts the slices without foreground too
    assert saved["n"] == len(areas) and saved["include_empty"] is True
    assert saved["skewness"] == pytest.approx(skew(areas), rel=1e-5)
    assert saved["kurtosis"] == pytest.approx(kurtosis(areas), rel=1e-5)
    assert saved["branch"] and torch.load(run / "last.pt", weights_only=True)["calf_stats"] == saved


def test_bf16_autocast_and_channels_last_train(cache, tmp_path):
    run = train_tiny(cache, tmp_path / "amp", epochs=1, amp="bf16", channels_last=True)
    row = read_history(run)[0]
    assert math.isfinite(float(row["loss"])) and math.isfinite(float(row["bce"]))


def test_yaml_config_with_command_line_overrides(tmp_path):
    from microseg.runs.config import TrainConfig

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("cache: c.h5\nrun: runs/x\nloss: ag_bce:w=2\nepochs: 3\n")
    config = resolve_train_config(str(yaml_file), {"loss": "focal", "lr": None})
    assert (config.cache, config.loss, config.epochs, config.lr) == ("c.h5", "focal", 3, TrainConfig.lr)
    yaml_file.write_text("cache: c.h5\nrun: runs/x\nepoch: 3\n")
    with pytest.raises(MicrosegError, match="epoch"):
        resolve_train_config(str(yaml_file), {})


def test_the_trainer_trains_from_the_inputs_resolved_once(cache, tmp_path, monkeypatch):
    """train() splits the patients, resolves the weights and parses the loss spec once, before anything is
    created; the Trainer's hooks get that split, the model those weights and the loss that spec (no second
    split, resolution or parse)."""
    import h5py

    import microseg.data.dataset
    import microseg.losses.registry
    import microseg.models.pretrained
    from microseg.models import build_model
    from microseg.training.trainer import Trainer

    calls = {"split": 0, "resolve": 0, "parse": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(
        microseg.data.dataset, "split_by_patient", counted("split", microseg.data.dataset.split_by_patient)
    )
    monkeypatch.setattr(
        microseg.models.pretrained, "resolve_weights", counted("resolve", microseg.models.pretrained.resolve_weights)
    )
    monkeypatch.setattr(microseg.losses.registry, "parse_spec", counted("parse", microseg.losses.registry.parse_spec))
    start = build_model("tiny", img_size=32).state_dict()
    start = {k: v + 0.5 if v.is_floating_point() else v for k, v in start.items()}  # not the seeded init
    torch.save(start, tmp_path / "start.pt")
    seen = {}

    class Recording(Trainer):
        def build_loaders(self, train_idx, val_idx):
            seen["split"] = (train_idx, val_idx)
            super().build_loaders(train_idx, val_idx)

        def build_model(self, fresh):
            model = super().build_model(fresh)
            seen["model"] = {k: v.clone() for k, v in model.state_dict().items()}
            return model

        def build_loss(self, train_idx):
            parsed = calls["parse"]
            loss = super().build_loss(train_idx)
            seen["loss"] = (loss.spec, loss.spec is self.inputs.loss, calls["parse"] - parsed)
            return loss

    options = dict(epochs=1, val_patients=["03"], val_fraction=0.0, weights=str(tmp_path / "start.pt"))
    train_tiny(cache, tmp_path / "run", trainer=Recording, loss="0.5*dice + ag_bce:w=2", **options)
    assert (calls["split"], calls["resolve"]) == (1, 1)
    assert seen["loss"] == (microseg.losses.LossSpec.parse("0.5*dice+ag_bce:hard_weight=2"), True, 0)
    with h5py.File(cache, "r") as f:
        ids = [i.decode() for i in f["case_id"][()]]
    assert seen["split"] == ([i for i, p in enumerate(ids) if p != "03"], [i for i, p in enumerate(ids) if p == "03"])
    assert all(torch.equal(seen["model"][k], start[k]) for k in start)


def test_poly_schedule_matches_reference_formula(trained_run, cache):
    from torch.optim.lr_scheduler import PolynomialLR

    from microseg.data.dataset import split_by_patient

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    schedule, lrs = PolynomialLR(optimizer, total_iters=100, power=0.9), []
    for _ in range(51):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0.01
    assert lrs[50] == pytest.approx(0.01 * 0.5**0.9)
    # the run's history logs each epoch's last lr: lr (1 - i / max_iter)^0.9, i the 0-based iteration
    train_idx, _ = split_by_patient(cache, TINY_TRAIN["val_fraction"], TINY_TRAIN["seed"])
    steps = math.ceil(len(train_idx) / TINY_TRAIN["batch_size"])
    max_iter = TINY_TRAIN["epochs"] * steps
    expected = [TINY_TRAIN["lr"] * (1 - ((e + 1) * steps - 1) / max_iter) ** 0.9 for e in range(TINY_TRAIN["epochs"])]
    assert [float(r["lr"]) for r in read_history(trained_run)] == pytest.approx(expected, rel=1e-9)


def test_resume_after_ctrl_c_matches_uninterrupted_run(cache, tmp_path):
    full = train_tiny(cache, tmp_path / "full")
    cut = tmp_path / "cut"
    train_until_ctrl_c(cache, cut, 5)  # epoch 2, second batch (3 batches of 4 per epoch)
    assert torch.load(cut / "last.pt", weights_only=True)["step"] == 1
    assert main(["train", "--run", str(cut), "--resume", "--num-workers", "0"]) == 0
    a, b = weights(full / "last.pt"), weights(cut / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_history(full)] == [
        {k: v for k, v in r.items() if k not in drop} for r in read_history(cut)
    ]


@pytest.mark.parametrize("checkpoint", ["recorded", "earlier_release"])
def test_a_run_interrupted_on_an_epochs_last_step_resumes_with_the_schedules_lr(
    checkpoint, trained_run, cache, tmp_path, monkeypatch
):
    """Ctrl-C inside the last step of epoch 1: the position saved is (epoch 0, step = all of them), so
    the resumed epoch 1 has no step left and its history row needs the lr of the step before."""
    import signal

    from microseg.training.trainer import Trainer

    run, real_step, calls = tmp_path / "cut", Trainer.train_step, {"n": 0}
    steps = 3  # 12 training slices (val_fraction 0.34 of 3 patients), batch 4

    def ctrl_c_in_last_step(self, batch):
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)  # a terminal's Ctrl-C, held to the step's end
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_last_step)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even in background
    try:
        with pytest.raises(KeyboardInterrupt):
            train_tiny(cache, run)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], len(state["history"])) == (0, steps, 0)
    if checkpoint == "earlier_release":
        del state["last_lr"]
        torch.save(state, run / "last.pt")
    assert main(["train", "--run", str(run), "--resume", "--num-workers", "0"]) == 0
    max_iter = TINY_TRAIN["epochs"] * steps
    # epoch e's row: the lr of its last step, lr (1 - i / max_iter)^0.9 at 0-based iteration i = (e + 1) steps - 1
    expected = [TINY_TRAIN["lr"] * (1 - ((e + 1) * steps - 1) / max_iter) ** 0.9 for e in range(TINY_TRAIN["epochs"])]
    resumed = [float(row["lr"]) for row in read_history(run)]
    assert resumed == pytest.approx(expected, rel=1e-9)
    if checkpoint == "recorded":  # the very lr an uninterrupted run logs
        assert resumed == [float(row["lr"]) for row in read_history(trained_run)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache, tmp_path):
    run = tmp_path / "nan"
    nan_at_7 = faulty_trainer(nan_at=7)[0]  # epoch 2, step 2 (5 steps/epoch)
    options = dict(cache=str(cache), run=str(run), model="tiny", epochs=3, batch_size=4, num_workers=0)
    with pytest.raises(MicrosegError) as err:
        train(resolve_train_config(None, options), trainer=nan_at_7)
    message = str(err.value)
    assert "\n" not in message and "nan" in message and "epoch 2, step 2" in message and "keeps epoch 1" in message
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert len(read_history(run)) == 1


@pytest.mark.parametrize("record", ["optimizer", "scaler", "accum"])
def test_resume_from_a_checkpoint_without_a_resume_record_is_refused(record, copied_run, cache):
    """`train(resume=True)` called directly (as an experiment cell does) on a `last.pt` lacking a record."""
    state = torch.load(copied_run / "last.pt", weights_only=True)
    torch.save({**state, record: None}, copied_run / "last.pt")
    config = resolve_train_config(None, dict(TINY_TRAIN, cache=str(cache), run=str(copied_run)))
    with pytest.raises(MicrosegError, match="cannot resume from .*last.pt: a weights-only or damaged checkpoint"):
        train(config, resume=True)


@pytest.mark.parametrize("case", ["exists", "cache_size", "other_model", "no_cache", "bad_loss"])
def test_bad_train_inputs_give_one_line(case, trained_run, cache, phantom, tmp_path, capsys):
    args = ["train", "--cache", str(cache), "--run", str(trained_run), "--model", "tiny", "--num-workers", "0"]
    if case == "cache_size":  # the run's cache rebuilt at another size, then --resume
        run = tmp_path / "run"
        shutil.copytree(trained_run, run)
        other = tmp_path / "cache.h5"
        shutil.copy(cache, other)
        from microseg.runs.config import load_config, save_config

        config = load_config(run / "config.yaml")
        config.cache = str(other)
        save_config(config, run / "config.yaml")
        state = torch.load(run / "last.pt", weights_only=True)  # the run was trained on `other`
        state["train_config"]["cache"] = str(other)
        torch.save(state, run / "last.pt")
        from microseg.data.prepare import prepare_cache

        prepare_cache(phantom, other, size=48)
        capsys.readouterr()  # what preparing the cache printed is not the train command's
        args = ["train", "--run", str(run), "--resume"]
    elif case == "other_model":  # weights from a checkpoint of another model config
        args = tiny_train_argv(cache, tmp_path / "r", "--model", "small", "--weights", str(trained_run / "last.pt"))
    elif case == "no_cache":
        args[2] = str(tmp_path / "missing.h5")
        args[4] = str(tmp_path / "new")
    elif case == "bad_loss":
        args[4] = str(tmp_path / "new")
        args += ["--loss", "no_such_loss"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("microseg: error:")
    expected = {
        "exists": "--force",
        "cache_size": "48",
        "other_model": "",
        "no_cache": "missing.h5",
        "bad_loss": "no_such_loss",
    }
    assert expected[case] in err[0]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_one_run(cache, tmp_path):
    run = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "microseg",
        "--",
        *tiny_train_argv(cache, run, "--batch-size", "2", "--device", "cpu"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("run written") == 2  # both ranks finished ...
    assert len(read_history(run)) == 1  # ... and one history, one checkpoint were written
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "history.csv", "last.pt"]
    assert TINY_TRAIN["model"] == torch.load(run / "last.pt", weights_only=True)["model_config"]["name"]


def test_train_options_come_from_the_config_fields(capsys):
    import dataclasses

    from microseg.runs.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--no-augment" if field.name == "augment" else "--" + field.name.replace("_", "-")
        assert flag in text
    assert "(default 10)" in text and "(default 1234)" in text and "(default 1 2 3 4)" in text


def test_first_release_config_without_deep_supervision_keeps_the_main_output(tmp_path):
    from microseg.runs.config import load_config

    (tmp_path / "config.yaml").write_text(
        "cache: c.h5\nrun: r\ndeep_supervision: false\n"
        "ds_kernel_sizes: [1, 2, 3, 4]\nds_weights: [1.0, 1.0, 1.0, 2.0]\n"
    )
    config = load_config(tmp_path / "config.yaml")
    assert (config.ds_kernel_sizes, config.ds_weights) == ([4], [2.0])
    assert config.preprocess(64).scale_sizes == (64,)
