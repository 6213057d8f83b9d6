"""Process-level bad inputs through the CLI: output locations that cannot be written, a full disk,
stale temporaries of killed writers, and help texts.

Every refusal is exit 2 and exactly one ``microseg: error:`` line naming the file or option, no
traceback, and nothing left behind. Tests run as root in CI, where permission bits do not stop a
write: unwritable places are built so that they stop root too (a regular file where a folder
should be, a folder of /proc), or the operating system's error is injected (a full disk).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import pytest

from cli_helpers import PROC_FOLDER, one_error, run_cli, tree
from data_helpers import make_dataset
from microseg.cli import main
from microseg.core.atomic import atomic_path, remove_stale_temporaries, write_text
from microseg.core.errors import MicrosegError


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "data")


# -- output locations that cannot be written ---------------------------------------------------


def test_prepare_into_a_path_through_a_regular_file(small_dataset, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    for out in (blocker / "cache.h5", blocker / "deeper" / "cache.h5"):
        code, _, err = run_cli(["prepare", "--data", small_dataset, "--out", out, "--size", 32], capsys)
        one_error(code, err, str(out), f"{blocker} is a file, not a folder")
    assert tree(tmp_path) == ["results"] and blocker.read_text() == "a file, not a folder"


def test_prepare_onto_a_folder(small_dataset, tmp_path, capsys):
    (tmp_path / "cache.h5").mkdir()
    code, _, err = run_cli(["prepare", "--data", small_dataset, "--out", tmp_path / "cache.h5", "--size", 32], capsys)
    one_error(code, err, f"cannot write {tmp_path / 'cache.h5'}: it is a folder")
    assert tree(tmp_path) == ["cache.h5"]


def test_prepare_into_a_folder_that_refuses_new_files(small_dataset, tmp_path, capsys):
    out = PROC_FOLDER / "cache.h5"
    code, _, err = run_cli(["prepare", "--data", small_dataset, "--out", out, "--size", 32], capsys)
    one_error(code, err, f"cannot write {out}", "does not accept new files")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_prepare_into_a_read_only_folder(small_dataset, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(["prepare", "--data", small_dataset, "--out", locked / "c.h5", "--size", 32], capsys)
        one_error(code, err, f"cannot write {locked / 'c.h5'}", "Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_a_write_refused_by_the_system_names_the_target(tmp_path, monkeypatch):
    """What a read-only folder does to a non-root writer, injected so that it also happens as root."""

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(MicrosegError) as err:
        write_text(tmp_path / "notes.txt", "x")
    assert str(err.value) == f"cannot write {tmp_path / 'notes.txt'}: Permission denied"
    assert tree(tmp_path) == []


def test_prepare_on_a_full_disk_leaves_no_cache_and_no_temporary(small_dataset, tmp_path, capsys, monkeypatch):
    import microseg.data.cache as cache_module

    def disk_full(dataset, values):  # h5py's own error on ENOSPC: errno 28, no file name, several lines
        raise OSError(
            errno.ENOSPC,
            "Can't synchronously write data (file write failed: time = ...\n"
            ", errno = 28, error message = 'No space left on device')",
        )

    monkeypatch.setattr(cache_module, "_append", disk_full)
    out = tmp_path / "out" / "cache.h5"
    code, _, err = run_cli(["prepare", "--data", small_dataset, "--out", out, "--size", 32], capsys)
    one_error(code, err, f"cannot write {out}: No space left on device")
    assert not out.exists() and [p for p in tree(tmp_path) if Path(p).name.startswith(".")] == []


def test_prepare_refuses_a_disk_too_full_for_the_next_case(small_dataset, tmp_path, capsys, monkeypatch):
    """HDF5 crashes the process when it closes a file after ENOSPC, so the cache checks the room first."""
    import shutil

    real = shutil.disk_usage

    def nearly_full(path):  # 1 MiB left: less than one 32 x 32 case plus the margin for HDF5's caches
        return real(path)._replace(free=2**20)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    out = tmp_path / "out" / "cache.h5"
    code, _, err = run_cli(["prepare", "--data", small_dataset, "--out", out, "--size", 32], capsys)
    one_error(code, err, f"cannot write {out}: No space left on device (1.0 MiB free")
    assert not out.exists() and [p for p in tree(tmp_path) if Path(p).name.startswith(".")] == []


def test_simulate_into_a_path_through_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "data"
    blocker.write_text("")
    out = blocker / "phantom"
    code, _, err = run_cli(
        ["simulate", "--out", out, "--train", 1, "--test", 0, "--slices", 3, "--size", 32, 32], capsys
    )
    one_error(code, err, f"cannot create folder {blocker}", f"{blocker} is a file, not a folder")
    assert tree(tmp_path) == ["data"]


def test_simulate_into_a_folder_that_refuses_new_files(capsys):
    out = PROC_FOLDER / "phantom"
    code, _, err = run_cli(
        ["simulate", "--out", out, "--train", 1, "--test", 0, "--slices", 3, "--size", 32, 32], capsys
    )
    one_error(code, err, f"cannot create folder {out.parent}: /proc does not accept new entries")


def test_simulate_on_a_full_disk_names_the_file(tmp_path, capsys, monkeypatch):
    from isal import igzip

    def disk_full(path, mode, **kwargs):
        Path(path).write_bytes(b"\x1f\x8b partial")  # the writer got this far
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(igzip, "open", disk_full)
    out = tmp_path / "phantom"
    code, _, err = run_cli(
        ["simulate", "--out", out, "--train", 1, "--test", 0, "--slices", 3, "--size", 32, 32], capsys
    )
    one_error(code, err, "cannot write", "microUS_train_01.nii.gz: No space left on device")
    assert [p for p in tree(tmp_path) if p.endswith(".nii.gz") or ".tmp" in p] == []


def test_any_other_system_error_is_one_line_naming_its_file(capsys, monkeypatch):
    import microseg.data.prepare as prepare_module

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/train/micro_ultrasound_scans")

    monkeypatch.setattr(prepare_module, "prepare_cache", unreadable)
    code, _, err = run_cli(["prepare", "--data", "/data", "--out", "c.h5"], capsys)
    one_error(code, err, "microseg: error: /data/train/micro_ultrasound_scans: Permission denied")

    def nameless(*args, **kwargs):
        raise OSError("Unable to open file\n(truncated file: eof = 96)")

    monkeypatch.setattr(prepare_module, "prepare_cache", nameless)
    code, _, err = run_cli(["prepare", "--data", "/data", "--out", "c.h5"], capsys)
    one_error(code, err, "microseg: error: Unable to open file (truncated file: eof = 96)")


# -- temporaries of writers that were killed ----------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
from microseg.core.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a cache")
    os.kill(os.getpid(), signal.SIGKILL)
"""


TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.\w+\.tmp(?P<suffix>.*)")


def _killed_writer(target: Path) -> Path:
    """Run a writer that is SIGKILLed inside atomic_path; return the temporary it left."""
    before = set(target.parent.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)])
    assert proc.wait() == -signal.SIGKILL
    (left,) = set(target.parent.iterdir()) - before
    match = TEMPORARY.fullmatch(left.name)
    assert match and match["name"] == target.name and int(match["pid"]) == proc.pid
    return left


def test_a_killed_prepare_leaves_a_temporary_the_next_prepare_removes(small_dataset, tmp_path, capsys):
    out = tmp_path / "cache.h5"
    left = _killed_writer(out)
    assert left.read_bytes() == b"half a cache" and not out.exists()
    code, _, _ = run_cli(["prepare", "--data", small_dataset, "--out", out, "--size", 32], capsys)
    assert code == 0 and not left.exists()
    with h5py.File(out, "r") as f:
        assert f["images"].shape == (10, 32, 32)


def test_only_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    target = tmp_path / "cache.h5"
    dead = _killed_writer(target)
    host = TEMPORARY.fullmatch(dead.name)["host"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".cache.h5.{sleeper.pid}@{host}.k3j2h1g0.tmp.h5"  # a writer still at work
        elsewhere = tmp_path / f".cache.h5.{dead.name.split('.')[3].split('@')[0]}@another-host.a1b2c3d4.tmp.h5"
        for path in (alive, elsewhere):
            path.write_bytes(b"")
        unrelated = [tmp_path / ".cache.h5.notes", tmp_path / ".other.h5.1@x.abc.tmp.h5", tmp_path / "cache.h5.tmp"]
        for path in unrelated:
            path.write_bytes(b"")
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
        assert not dead.exists() and alive.exists() and elsewhere.exists() and all(p.exists() for p in unrelated)
        assert target.read_bytes() == b"new"
        assert remove_stale_temporaries(target) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(target) == [alive]


def test_temporaries_are_named_after_their_writer(tmp_path):
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        name = tmp.name
        tmp.write_bytes(b"")
    assert name.startswith(f".mask.nii.gz.{os.getpid()}@") and name.endswith(".tmp.nii.gz")


# -- options and help ---------------------------------------------------------------------------


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_give_defaults_minimums_and_examples(capsys):
    top = _help(["--help"], capsys)
    assert "examples:" in top and "microseg prepare --data" in top and "microseg demo" in top
    simulate = _help(["simulate", "--help"], capsys)
    assert "slices per sweep (default 24, at least 3)" in simulate
    assert "a multiple of 16" in _help(["prepare", "--help"], capsys)


def test_prepare_size_not_a_multiple_of_16(small_dataset, tmp_path, capsys):
    code, _, err = run_cli(["prepare", "--data", small_dataset, "--out", tmp_path / "c.h5", "--size", 100], capsys)
    one_error(code, err, "--size must be a positive multiple of 16", "(got 100)")
    assert tree(tmp_path) == []


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--slices", 2], "--slices must be >= 3"),
        (["--size", 16, 64], "--size must be at least 32 x 32"),
        (["--train", 0], "--train must be >= 1"),
    ],
)
def test_simulate_options_out_of_range(tmp_path, capsys, argv, needle):
    code, _, err = run_cli(["simulate", "--out", tmp_path / "p", *argv], capsys)
    one_error(code, err, needle)
    assert tree(tmp_path) == []


def test_data_that_is_a_file_or_a_split_folder(small_dataset, tmp_path, capsys):
    scan = next((small_dataset / "train" / "micro_ultrasound_scans").iterdir())
    code, _, err = run_cli(["prepare", "--data", scan, "--out", tmp_path / "c.h5", "--size", 32], capsys)
    one_error(code, err, f"data folder {scan} is not a folder")
    code, _, err = run_cli(
        ["prepare", "--data", small_dataset / "train", "--out", tmp_path / "c.h5", "--size", 32], capsys
    )
    one_error(code, err, "looks like a split folder itself")
    assert tree(tmp_path) == []


# -- predict: companion files and output names --------------------------------------------------


def test_predict_skips_macos_companion_files_in_a_folder(trained_run, phantom, tmp_path, capsys):
    source = tmp_path / "scans"
    source.mkdir()
    scan = sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]
    (source / scan.name).write_bytes(scan.read_bytes())
    (source / f"._{scan.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # not a NIfTI: would fail if read
    (source / ".DS_Store").write_bytes(b"")
    code, _, err = run_cli(["predict", "--run", trained_run, "--input", source, "--out", tmp_path / "masks"], capsys)
    assert code == 0 and "microseg:" not in err
    assert tree(tmp_path / "masks") == [scan.name]


def test_predict_to_an_output_that_is_not_a_nifti_name(trained_run, phantom, tmp_path, capsys):
    scan = sorted((phantom / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]
    for out in (tmp_path / "mask", tmp_path / "mask.png"):
        code, _, err = run_cli(["predict", "--run", trained_run, "--input", scan, "--out", out], capsys)
        one_error(code, err, f"{out}: a NIfTI file name must end in .nii or .nii.gz")
    blocker = tmp_path / "masks"
    blocker.write_text("")
    code, _, err = run_cli(["predict", "--run", trained_run, "--input", scan, "--out", blocker / "m.nii.gz"], capsys)
    one_error(code, err, f"{blocker} is a file, not a folder")
    assert tree(tmp_path) == ["masks"]
