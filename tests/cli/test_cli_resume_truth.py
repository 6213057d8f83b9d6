"""`train --resume`: the checkpoint's own training config is the truth, through the CLI.

A --config file, a command-line option or a hand-edited config.yaml that changes the run (loss,
model, cache, schedule, seed, batch, deep-supervision weights) is refused with one line naming the field, and the
run is left as it was; options that do not change the run (device, workers, checks) may differ.
A checkpoint without a record resuming needs is one line, not a KeyError.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from cli_helpers import one_error, run_cli, snapshot


@pytest.mark.parametrize(
    "option, value",
    [
        ("loss", "dice"),
        ("model", "small"),
        ("epochs", "5"),
        ("lr", "0.1"),
        ("seed", "8"),
        ("batch-size", "2"),
        ("optimizer", "sgd"),
        ("weight-decay", "0.5"),
        ("poly-power", "2"),
    ],
)
def test_a_changing_option_is_refused_naming_it(option, value, copied_run, capsys):
    before = snapshot(copied_run)
    code, _, err = run_cli(["train", "--resume", "--run", copied_run, f"--{option}", value], capsys)
    one_error(code, err, f"--{option} ", "differs from the run's config", "a resumed run keeps its config")
    assert snapshot(copied_run) == before


def test_another_cache_is_refused(copied_run, cache, tmp_path, capsys):
    other = tmp_path / "other.h5"
    shutil.copy(cache, other)
    code, _, err = run_cli(["train", "--resume", "--run", copied_run, "--cache", other], capsys)
    one_error(code, err, "--cache ", str(other))


@pytest.mark.parametrize(
    "key, value", [("loss", "ag_bce"), ("model", "small"), ("seed", 99), ("epochs", 7), ("augment", False)]
)
def test_a_config_file_that_changes_the_run_is_refused(key, value, copied_run, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({key: value}))
    before = snapshot(copied_run)
    code, _, err = run_cli(["train", "--resume", "--run", copied_run, "--config", other], capsys)
    one_error(code, err, f"{key}: ", str(other), "differs from the run's config")
    assert snapshot(copied_run) == before


@pytest.mark.parametrize(
    "key, value",
    [("loss", "ag_bce"), ("model", "small"), ("lr", 0.5), ("seed", 3), ("ds_weights", [1.0, 1.0, 1.0, 2.0])],
)
def test_a_hand_edited_config_yaml_is_refused_naming_the_field(key, value, copied_run, capsys):
    saved = yaml.safe_load((copied_run / "config.yaml").read_text())
    assert saved[key] != value
    saved[key] = value
    (copied_run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    before = snapshot(copied_run)
    code, _, err = run_cli(["train", "--resume", "--run", copied_run], capsys)
    one_error(code, err, str(copied_run / "config.yaml"), f"says {key}: ", str(copied_run / "last.pt"))
    assert snapshot(copied_run) == before


@pytest.mark.parametrize("record", ["optimizer", "accum", "train_config", "scaler"])
def test_a_checkpoint_missing_a_resume_record_is_one_line(record, copied_run, capsys):
    state = torch.load(copied_run / "last.pt", weights_only=True)
    del state[record]
    torch.save(state, copied_run / "last.pt")
    before = snapshot(copied_run)
    code, _, err = run_cli(["train", "--resume", "--run", copied_run], capsys)
    one_error(code, err, str(copied_run / "last.pt"), f"no {record} record")
    assert "KeyError" not in err and snapshot(copied_run) == before


def test_options_that_do_not_change_the_run_may_differ(copied_run, tmp_path, capsys):
    same = tmp_path / "same.yaml"
    same.write_text(
        yaml.safe_dump({"loss": yaml.safe_load((copied_run / "config.yaml").read_text())["loss"], "num_workers": 0})
    )
    code, out, err = run_cli(
        [
            "train",
            "--resume",
            "--run",
            copied_run,
            "--config",
            same,
            "--device",
            "cpu",
            "--no-source-check",
            "--sync-every",
            "3",
        ],
        capsys,
    )
    assert code == 0, err
    assert "run written" in out
