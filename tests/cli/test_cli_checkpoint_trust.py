"""Checkpoints and weights handed in by someone else, through the CLI: nothing in them ever runs,
and nothing corrupt in them is used.

Crafted pickles (os.system and builtins.exec through __reduce__, a numpy object array, a code
payload hidden beside a real checkpoint's weights, torch's legacy format, a bare pickle) are given
to every command that reads a checkpoint or weights: evaluate (best.pt, and last.pt when there is
no best.pt), predict, train --resume and train --weights. Each must end with exit 2 and one
`microseg: error:` line saying what the file holds, the marker file the payload would write must
not exist, and the run must be as it was. Corrupted real checkpoints (bytes overwritten at several
offsets, truncated, non-finite weights, a missing record) are refused the same way.
"""

from __future__ import annotations

import builtins
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import one_error, run_cli, snapshot
from train_helpers import TINY_TRAIN


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def write_payload(kind: str, path: Path, marker: Path, real: Path) -> None:
    """A file at `path` that would write `marker` (or hold a non-tensor object) when unpickled in full."""
    if kind == "system":
        torch.save({"model": SystemPayload(marker), "model_config": {}}, path)
    elif kind == "exec":
        torch.save(ExecPayload(marker), path)
    elif kind == "numpy-object":
        torch.save({"model": {"w": np.array([1, None], dtype=object)}, "model_config": {}}, path)
    elif kind == "hidden-in-real":  # a real, loadable checkpoint with one extra entry that runs code
        state = torch.load(real, weights_only=True)
        torch.save({**state, "notes": SystemPayload(marker)}, path)
    elif kind == "legacy-format":
        torch.save(SystemPayload(marker), path, _use_new_zipfile_serialization=False)
    elif kind == "bare-pickle":
        path.write_bytes(pickle.dumps(ExecPayload(marker), protocol=2))
    else:
        raise ValueError(kind)


PAYLOADS = ["system", "exec", "numpy-object", "hidden-in-real", "legacy-format", "bare-pickle"]
# what the one line says the file is, per payload: a checkpoint must be a torch zip (checksummed),
# a weights file of torch's legacy format is read weights-only too and refused for what it holds
SAYS = {
    "system": "holds Python objects besides tensors (posix.system)",
    "exec": "holds Python objects besides tensors (exec)",
    "numpy-object": "holds Python objects besides tensors",
    "hidden-in-real": "holds Python objects besides tensors (posix.system)",
    "legacy-format": "not a torch zip archive",  # checkpoints; weights: what it holds (below)
    "bare-pickle": "not a torch zip archive",
}


def tiny_argv(cache: Path, run: Path, *extra) -> list:
    argv = ["train", "--cache", cache, "--run", run]
    for key, value in TINY_TRAIN.items():
        argv += ["--" + key.replace("_", "-"), value]
    return argv + list(extra)


def entry_points(run: Path, cache: Path, phantom: Path, tmp_path: Path) -> dict[str, tuple[str, list]]:
    """command -> (the checkpoint file it reads, its argv)."""
    volume = sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]
    return {
        "evaluate": ("best.pt", ["evaluate", "--run", run, "--data", phantom, "--device", "cpu"]),
        "evaluate-last": ("last.pt", ["evaluate", "--run", run, "--data", phantom, "--device", "cpu"]),
        "predict": (
            "best.pt",
            ["predict", "--run", run, "--input", volume, "--out", tmp_path / "out.nii.gz", "--device", "cpu"],
        ),
        "train-resume": ("last.pt", ["train", "--resume", "--run", run]),
        "train-weights": ("../weights.pt", tiny_argv(cache, tmp_path / "fresh", "--weights", tmp_path / "weights.pt")),
    }


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_pickles_never_run_through_any_reader(
    payload, copied_run, trained_run, cache, phantom, tmp_path, capsys
):
    marker = tmp_path / "MARKER"
    for command, (name, argv) in entry_points(copied_run, cache, phantom, tmp_path).items():
        shutil.rmtree(copied_run)
        shutil.copytree(trained_run, copied_run)
        if command == "evaluate-last":
            (copied_run / "best.pt").unlink()
        write_payload(payload, copied_run / name, marker, trained_run / "last.pt")
        before = snapshot(copied_run)
        code, _, err = run_cli(argv, capsys)
        says = SAYS[payload]
        if command == "train-weights" and payload in ("legacy-format", "bare-pickle"):
            says = SAYS["system" if payload == "legacy-format" else "exec"]
        line = one_error(code, err, says)
        assert str(copied_run / name).replace("/run/../", "/") in line or "weights.pt" in line, line
        assert "weights_only" not in err and "Warning" not in err, line
        assert not marker.exists(), (command, payload)
        assert snapshot(copied_run) == before, command
        assert not (tmp_path / "fresh").exists() and not (tmp_path / "out.nii.gz").exists()


def test_a_real_checkpoint_loads_weights_only_and_holds_only_plain_types(trained_run):
    state = torch.load(trained_run / "last.pt", weights_only=True)

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert plain(state)
    assert state["epoch"] == TINY_TRAIN["epochs"] and isinstance(state["train_config"]["cache"], str)


# -- corruption: refused, never used --------------------------------------------------------------


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def evaluate_argv(run: Path, phantom: Path) -> list:
    return ["evaluate", "--run", run, "--data", phantom, "--device", "cpu"]


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_anywhere_in_best_pt_are_refused(seed, copied_run, phantom, capsys):
    """64 random bytes at a random offset: the file is refused unless its content is unchanged
    (bytes landing in zip padding that torch never reads)."""
    best = copied_run / "best.pt"
    original = torch.load(best, weights_only=True)
    rng = random.Random(seed)
    size = best.stat().st_size
    overwrite(best, rng.randrange(0, size - 64), bytes(rng.randrange(256) for _ in range(64)))
    before = snapshot(copied_run)
    code, out, err = run_cli(evaluate_argv(copied_run, phantom), capsys)
    if code == 0:  # only acceptable if what was loaded is exactly what was saved
        loaded = torch.load(best, weights_only=True)
        assert all(torch.equal(loaded["model"][k], original["model"][k]) for k in original["model"])
        return
    one_error(code, err, str(best))
    assert snapshot(copied_run) == before


@pytest.mark.parametrize("where", ["tensor data", "pickle", "central directory", "truncated"])
def test_corruption_at_each_part_of_the_zip_is_refused(where, copied_run, phantom, capsys):
    best = copied_run / "best.pt"
    data = best.read_bytes()
    if where == "tensor data":  # inside the largest stored tensor
        import zipfile

        with zipfile.ZipFile(best) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        overwrite(
            best,
            info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2,
            b"\x7f\x7f\x7f\x7f",
        )
    elif where == "pickle":
        overwrite(best, data.index(b"model_config") + 3, b"X")
    elif where == "central directory":
        overwrite(best, data.rindex(b"PK\x01\x02") + 16, b"\x00\x00\x00\x00")  # one member's recorded CRC
    else:
        best.write_bytes(data[: len(data) * 2 // 3])
    before = snapshot(copied_run)
    code, _, err = run_cli(evaluate_argv(copied_run, phantom), capsys)
    one_error(code, err, str(best), "corrupt")
    assert snapshot(copied_run) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_evaluate_predict_and_resume(
    value, copied_run, cache, phantom, tmp_path, capsys
):
    for command, (name, argv) in entry_points(copied_run, cache, phantom, tmp_path).items():
        if command in ("evaluate-last", "train-weights"):
            continue
        state = torch.load(copied_run / name, weights_only=True)
        key = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][key].view(-1)[0] = value
        torch.save(state, copied_run / name)
        code, _, err = run_cli(argv, capsys)
        one_error(code, err, str(copied_run / name), key, "NaN or infinite")


@pytest.mark.parametrize(
    "record", ["model_config.img_size", "preprocess+model_config.img_size", "model", "preprocess.size=str"]
)
def test_a_checkpoint_missing_a_record_is_one_line(record, copied_run, phantom, capsys):
    best = copied_run / "best.pt"
    state = torch.load(best, weights_only=True)
    if record == "model":
        del state["model"]
    elif record == "preprocess.size=str":
        state["preprocess"]["size"] = "large"
    else:
        if record.startswith("preprocess+"):
            del state["preprocess"]
        del state["model_config"]["img_size"]
    torch.save(state, best)
    before = snapshot(copied_run)
    code, _, err = run_cli(evaluate_argv(copied_run, phantom), capsys)
    one_error(code, err, str(best), "incomplete or damaged" if record != "model" else "not a microseg checkpoint")
    assert snapshot(copied_run) == before
