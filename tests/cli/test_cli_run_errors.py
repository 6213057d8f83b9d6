"""Run-level bad inputs through the CLI: train options and config, the files a run names, the run
folder's lock, predict's inputs and outputs, demo / compare / evaluate output places, help texts.

Every refusal is exit 2 and exactly one ``microseg: error:`` line naming the file or option, no
traceback, and nothing left behind (in particular no empty run folder). Unwritable places are
built so that they stop root too (a folder of /proc, a regular file where a folder should be).
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cli_helpers import PROC_FOLDER, one_error, run_cli, tree
from microseg.cli import main
from train_helpers import TINY_TRAIN


def tiny_train(cache: Path, run: Path, *extra) -> list:
    options = {**TINY_TRAIN, "epochs": 1}
    argv = ["train", "--cache", cache, "--run", run]
    for key, value in options.items():
        argv += ["--" + key.replace("_", "-"), value]
    return argv + list(extra)


# -- options and config: refused before anything is created -------------------------------------

BAD_OPTIONS = [
    (["--model", "R50-ViT-X"], "--model 'R50-ViT-X' is not a model config"),
    (["--loss", "no_such_loss"], "no_such_loss"),
    (["--loss", "ag_bce:w=-4"], "w=-4"),
    (["--loss", "focal:gamma=-1"], "gamma"),
    (["--lr", "-1"], "--lr must be > 0, got -1"),
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--lr", "inf"], "--lr must be > 0, got inf"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1"),
    (["--momentum", "-0.1"], "--momentum must be in [0, 1)"),
    (["--weight-decay=-1e-4"], "--weight-decay must be >= 0"),
    (["--poly-power", "-1"], "--poly-power must be >= 0"),
    (["--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1"),
    (["--val-fraction", "nan"], "--val-fraction must be in [0, 1), got nan"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--ds-weights", "1", "1", "1", "-1"], "--ds-weights must be >= 0, got -1"),
    (["--ds-weights", "1", "1", "1", "nan"], "--ds-weights must be >= 0, got nan"),
    (["--ds-weights", "0", "0", "0", "0"], "--ds-weights are all 0"),
    (["--ds-weights", "1", "1"], "--ds-weights needs one entry per --ds-kernel-sizes entry (4), got 2"),
    (["--ds-kernel-sizes", "1", "2", "3"], "--ds-kernel-sizes needs 4 entries"),
    (["--ds-kernel-sizes", "0", "2", "3", "4"], "--ds-kernel-sizes must be an integer >= 1, got 0"),
    (["--optimizer", "rmsprop"], "--optimizer 'rmsprop' is not one of sgd, adam"),
    (["--amp", "fp8"], "--amp 'fp8' is not one of"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "mps"], "--device 'mps'"),
]


@pytest.mark.parametrize("options,needle", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_train_option_is_refused_before_the_run_exists(options, needle, cache, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    code, _, err = run_cli(tiny_train(cache, run, *options), capsys)
    one_error(code, err, needle)
    assert tree(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "options,needle",
    [
        (["--device", "cuda:7"], "--device cuda:7: CUDA is not available"),
        (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    ],
)
def test_cuda_options_on_a_machine_without_cuda(options, needle, cache, tmp_path, capsys):
    code, _, err = run_cli(tiny_train(cache, tmp_path / "r", *options), capsys)
    one_error(code, err, needle)
    assert tree(tmp_path) == []


def test_cache_problems_are_refused_before_the_run_exists(cache, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    text = inputs / "notes.h5"
    text.write_text("not HDF5")
    odd = inputs / "odd.h5"  # a cache of an earlier release at a size no model takes
    shutil.copy(cache, odd)
    with h5py.File(odd, "a") as f:
        f.attrs["size"] = 100
    for bad, needle in (
        (inputs / "missing.h5", "missing.h5: cache not found (run 'microseg prepare' first)"),
        (text, "notes.h5: not a readable microseg cache"),
        (inputs, "cache not found"),
        (
            odd,
            "holds 100 px slices, which no model takes (a multiple of 16 is needed): "
            "prepare it again with --size 96 or 112",
        ),
    ):
        code, _, err = run_cli(tiny_train(bad, tmp_path / "runs" / "r"), capsys)
        one_error(code, err, needle)
        assert not (tmp_path / "runs").exists()


def test_weights_that_are_not_weights_say_what_the_file_is_not(cache, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "config.yaml").write_text("cache: c.h5\n")
    (inputs / "empty.pt").write_bytes(b"")
    torch.save({"mean": np.zeros(3)}, inputs / "arrays.pt")  # numpy inside: torch's weights-only load refuses
    torch.save({"epochs": 3}, inputs / "numbers.pt")
    (inputs / "junk.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setenv("MICROSEG_WEIGHTS", str(tmp_path / "no-weights-here"))
    cases = [
        ("absent.pt", "weights file not found"),
        ("config.yaml", "config.yaml: it is not a weights file (not .npz, .safetensors, nor a torch"),
        ("empty.pt", "empty.pt: it is empty"),
        ("arrays.pt", "arrays.pt: it holds Python objects besides tensors"),
        ("numbers.pt", "numbers.pt holds no tensor"),
        ("junk.safetensors", "cannot read weights file"),
        ("R50-ViT-B_16", "microseg download weights R50-ViT-B_16"),
    ]
    for name, needle in cases:
        weights = name if name == "R50-ViT-B_16" else inputs / name
        code, _, err = run_cli(tiny_train(cache, tmp_path / "runs" / "r", "--weights", weights), capsys)
        line = one_error(code, err, needle)
        assert "weights_only" not in err and "UserWarning" not in err, line
        assert not (tmp_path / "runs").exists()


def test_a_failure_after_the_run_is_created_leaves_no_run_folder(trained_run, cache, tmp_path, capsys):
    """Weights of another model config: the shapes are only known once the model is built."""
    run = tmp_path / "runs" / "small"
    code, _, err = run_cli(tiny_train(cache, run, "--model", "small", "--weights", trained_run / "last.pt"), capsys)
    one_error(code, err, "has shape")
    assert tree(tmp_path) == []
    existing = tmp_path / "mine"  # a folder the user made: kept, and left as it was
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    code, _, err = run_cli(
        tiny_train(cache, existing, "--model", "small", "--weights", trained_run / "last.pt"), capsys
    )
    one_error(code, err, "has shape")
    assert tree(tmp_path) == ["mine", "mine/notes.txt"]


def test_a_checkpoint_on_a_full_disk_is_one_line(cache, tmp_path, capsys, monkeypatch):
    """torch's writer reports a full disk as a RuntimeError ("enforce fail ... file write failed"),
    as seen on a 256 KiB tmpfs; the run stops with one line naming the checkpoint, nothing left."""

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "runs" / "full"
    code, _, err = run_cli(tiny_train(cache, run), capsys)
    one_error(code, err, "cannot write", "last.pt", "MiB free")
    assert tree(tmp_path) == []


def test_a_run_folder_that_cannot_be_created(cache, tmp_path, capsys):
    code, _, err = run_cli(tiny_train(cache, PROC_FOLDER / "run"), capsys)
    one_error(code, err, f"cannot create folder {PROC_FOLDER / 'run'}", "/proc does not accept new entries")
    blocker = tmp_path / "runs"
    blocker.write_text("")
    code, _, err = run_cli(tiny_train(cache, blocker / "r"), capsys)
    one_error(code, err, f"{blocker} is a file, not a folder")
    assert tree(tmp_path) == ["runs"]


def test_config_file_gives_run_and_values_are_typed(cache, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"cache: {cache}\nrun: {tmp_path / 'runs' / 'r'}\nmodel: tiny\nlr: -1e-3\n")
    code, _, err = run_cli(["train", "--config", config], capsys)  # no --run: not an argparse error
    one_error(code, err, "--lr must be > 0, got -0.001")
    config.write_text(f"cache: {cache}\nmodel: tiny\n")
    code, _, err = run_cli(["train", "--config", config], capsys)
    one_error(code, err, "no run folder given: pass --run runs/NAME (or run: in the --config file)")
    for line, needle in (
        ("epochs: two", "--epochs must be an integer, got 'two'"),
        ("epochs: 2.5", "--epochs must be an integer, got 2.5"),
        ("ds_weights: [1, 1, 1, heavy]", "--ds-weights must be a number, got 'heavy'"),
        ("augment: 'no'", "--augment must be true or false, got 'no'"),
        ("loss: [focal]", "--loss must be a text value, got ['focal']"),
    ):
        config.write_text(f"cache: {cache}\nrun: {tmp_path / 'runs' / 'r'}\n{line}\n")
        code, _, err = run_cli(["train", "--config", config], capsys)
        one_error(code, err, needle)
    config.write_bytes(b"\xff\xfe\x00binary")
    code, _, err = run_cli(["train", "--config", config], capsys)
    one_error(code, err, "is not a text (YAML) file")
    assert tree(tmp_path) == ["run.yaml"]


def test_yaml_numbers_written_as_yaml_reads_them(tmp_path):
    from microseg.runs.config import resolve_train_config

    config = tmp_path / "run.yaml"
    config.write_text(
        "cache: c.h5\nrun: r\nlr: 1e-3\nweight_decay: 1e-4\nepochs: 3.0\nds_kernel_sizes: 4\nds_weights: 2\n"
    )  # YAML 1.1 reads 1e-3 as a string, not a number
    resolved = resolve_train_config(str(config), {})
    assert (resolved.lr, resolved.weight_decay, resolved.epochs) == (0.001, 0.0001, 3)
    assert (resolved.ds_kernel_sizes, resolved.ds_weights) == ([4], [2.0])
    assert isinstance(resolved.epochs, int)


def test_a_run_config_of_another_version_is_one_line(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with open(run / "config.yaml", "a") as handle:
        handle.write("future_option: 3\n")
    code, _, err = run_cli(["compare", run, "--out", tmp_path / "report"], capsys)
    one_error(code, err, f"{run / 'config.yaml'} has option(s) this microseg does not know: future_option")
    assert not (tmp_path / "report").exists()


def test_resume_without_a_run(capsys):
    code, _, err = run_cli(["train", "--resume"], capsys)
    one_error(code, err, "--resume needs --run RUN")


# -- a batch larger than the data: a warning, and the run goes on --------------------------------


def test_batch_larger_than_the_training_data_warns_and_trains(cache, tmp_path, capsys):
    from microseg.data.dataset import split_by_patient

    train_idx, _ = split_by_patient(cache, TINY_TRAIN["val_fraction"], TINY_TRAIN["seed"])
    code, _, err = run_cli(tiny_train(cache, tmp_path / "big", "--batch-size", 64), capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("microseg:")]
    assert lines == [
        f"microseg: warning: --batch-size 64 is larger than the {len(train_idx)} training slices of "
        f"{cache}: every step sees the whole training split"
    ]
    assert (tmp_path / "big" / "last.pt").is_file()


# -- the run folder's lock ----------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from microseg.runs.folder import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_train_into_a_run_being_written_is_refused(cache, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(tiny_train(cache, run), capsys)
        one_error(code, err, f"run {run} is being written by another microseg process (pid {holder.pid})")
        assert tree(tmp_path) == ["run", "run/.lock"]  # the holder's lock, nothing of ours
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock file is still there, but its lock died with it: the next train runs
    assert (run / ".lock").read_text().strip() == str(holder.pid)
    code, _, err = run_cli(tiny_train(cache, run), capsys)
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "history.csv", "last.pt"]


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    from microseg.core.errors import MicrosegError
    from microseg.runs.folder import RunLock

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(MicrosegError, match=rf"pid {os.getpid()}\)"):
        second.acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    second.acquire()
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    second.release()


# -- predict: inputs checked first, a folder written whole or not at all ---------------------------


@pytest.fixture()
def scans(phantom, tmp_path) -> Path:
    source = tmp_path / "scans"
    source.mkdir()
    for scan in sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz")):
        shutil.copy(scan, source / scan.name)
    return source


def test_predict_out_name_and_bad_headers_are_refused_before_the_model_loads(scans, tmp_path, capsys):
    scan = sorted(scans.iterdir())[0]
    absent_run = tmp_path / "no-run"  # never read: the refusal comes first
    code, _, err = run_cli(["predict", "--run", absent_run, "--input", scan, "--out", tmp_path / "mask"], capsys)
    one_error(code, err, f"--out {tmp_path / 'mask'}: a NIfTI file name must end in .nii or .nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not a nifti")
    code, _, err = run_cli(["predict", "--run", absent_run, "--input", scans, "--out", tmp_path / "masks"], capsys)
    one_error(code, err, f"{scans / 'broken.nii.gz'}: not a readable NIfTI file")
    code, _, err = run_cli(["predict", "--run", absent_run, "--input", scans, "--out", scans], capsys)
    one_error(code, err, "is the input folder")
    code, _, err = run_cli(["predict", "--run", absent_run, "--input", scan, "--out", scan], capsys)
    one_error(code, err, "is the input volume")
    assert tree(tmp_path) == sorted(["scans"] + [f"scans/{p.name}" for p in scans.iterdir()])


def test_predict_a_folder_with_a_truncated_volume_writes_nothing(trained_run, scans, tmp_path, capsys):
    last = sorted(scans.iterdir())[-1]
    truncated = scans / "zz_truncated.nii.gz"  # sorts last: every other volume is predicted first
    whole = gzip.decompress(last.read_bytes())
    truncated.write_bytes(gzip.compress(whole)[: len(gzip.compress(whole)) // 2])
    out = tmp_path / "results" / "masks"
    code, _, err = run_cli(["predict", "--run", trained_run, "--input", scans, "--out", out], capsys)
    one_error(code, err, str(truncated))
    assert not (tmp_path / "results").exists()
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["predict", "--run", trained_run, "--input", scans, "--out", out], capsys)
    one_error(code, err, str(truncated))
    assert tree(tmp_path / "results") == ["masks", "masks/keep.txt"]
    truncated.unlink()
    code, out_text, err = run_cli(["predict", "--run", trained_run, "--input", scans, "--out", out], capsys)
    assert code == 0, err
    assert tree(out) == sorted(["keep.txt"] + [p.name for p in scans.iterdir()])


@pytest.mark.parametrize("out", [PROC_FOLDER / "masks", PROC_FOLDER / "mask.nii.gz"])
def test_predict_into_a_place_that_refuses_new_files(trained_run, scans, out, capsys):
    source = scans if out.suffix != ".gz" else sorted(scans.iterdir())[0]
    code, _, err = run_cli(["predict", "--run", trained_run, "--input", source, "--out", out], capsys)
    one_error(code, err, "cannot write", "/proc does not accept new files")


def test_predict_into_a_folder_that_is_a_file(trained_run, scans, tmp_path, capsys):
    blocker = tmp_path / "masks"
    blocker.write_text("")
    code, _, err = run_cli(["predict", "--run", trained_run, "--input", scans, "--out", blocker], capsys)
    one_error(code, err, f"--out {blocker} is a file; for a folder of volumes give a folder")


# -- demo, compare, evaluate: output places that cannot be written --------------------------------


def test_demo_epochs_and_out_refused_before_anything_is_written(tmp_path, capsys):
    code, _, err = run_cli(["demo", "--out", tmp_path / "demo", "--epochs", 0], capsys)
    one_error(code, err, "--epochs must be >= 1, got 0")
    assert tree(tmp_path) == []
    code, _, err = run_cli(["demo", "--out", PROC_FOLDER / "demo"], capsys)
    one_error(code, err, str(PROC_FOLDER / "demo"), "/proc does not accept new entries")
    blocker = tmp_path / "demo"
    blocker.write_text("")
    code, _, err = run_cli(["demo", "--out", blocker], capsys)
    one_error(code, err, f"{blocker} is a file, not a folder")
    assert tree(tmp_path) == ["demo"]


def test_compare_into_a_place_that_cannot_be_written(trained_run, tmp_path, capsys):
    for out in (PROC_FOLDER / "report", tmp_path / "file" / "report"):
        (tmp_path / "file").write_text("")
        code, _, err = run_cli(["compare", trained_run, "--out", out], capsys)
        one_error(code, err, str(out))
    assert tree(tmp_path) == ["file"]


def test_evaluate_a_run_whose_folder_cannot_be_written(trained_run, phantom, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "metrics", ignore_errors=True)
    (run / "metrics").write_text("a file where the metrics folder goes")
    code, _, err = run_cli(["evaluate", "--run", run, "--data", phantom], capsys)
    one_error(code, err, str(run / "metrics"), "is a file, not a folder")
    assert (run / "metrics").read_text() == "a file where the metrics folder goes"
    assert not [p for p in tree(run) if ".tmp" in p]


# -- help -----------------------------------------------------------------------------------------


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens


def test_help_says_what_a_new_user_needs(capsys):
    train = _help(["train", "--help"], capsys)
    assert "the default model R50-ViT-B_16 trains from scratch unless --weights R50-ViT-B_16" in train
    assert "required, here or as run: in --config" in train
    assert "--lr LR base learning rate, > 0" in train and "in [0, 1)" in train
    assert "ending in .nii or .nii.gz" in _help(["predict", "--help"], capsys)
    from microseg.demo import DEMO_TRAIN

    assert f"epochs per run (default {DEMO_TRAIN['epochs']}, at least 1)" in _help(["demo", "--help"], capsys)
    assert "(default 24, at least 3)" in _help(["simulate", "--help"], capsys)
    assert "examples:" in _help(["--help"], capsys)
