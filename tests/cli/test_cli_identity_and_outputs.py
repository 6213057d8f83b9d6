"""Identity and output details through the CLI: ids equal as numbers are one patient (refused
naming both files), a run compared with itself is refused, `--config` of a folder says so, and
evaluate's predictions/ folder gets the mode a plain mkdir gives (not mkdtemp's 0700)."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from cli_helpers import one_error, run_cli


@pytest.mark.parametrize(
    "folder, name, twin",
    [
        ("micro_ultrasound_scans", "microUS_train_01.nii.gz", "microUS_train_1.nii.gz"),
        ("expert_annotations", "expert_annotation_train_02.nii.gz", "expert_annotation_train_002.nii.gz"),
    ],
)
def test_ids_equal_as_numbers_are_refused_naming_both_files(folder, name, twin, phantom, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    shutil.copy(data / "train" / folder / name, data / "train" / folder / twin)
    for argv in (["check", "--data", data], ["prepare", "--data", data, "--out", tmp_path / "c.h5", "--size", 32]):
        code, _, err = run_cli(argv, capsys)
        one_error(code, err, name, twin, "appears twice")
    assert not (tmp_path / "c.h5").exists()


def test_a_run_compared_with_itself_is_refused(trained_run, tmp_path, capsys):
    code, _, err = run_cli(["compare", trained_run, f"{trained_run}/", "--out", tmp_path / "report"], capsys)
    one_error(code, err, str(trained_run), "compared twice")
    assert not (tmp_path / "report").exists()


def test_config_of_a_folder_says_it_is_a_folder(cache, tmp_path, capsys):
    code, _, err = run_cli(["train", "--cache", cache, "--run", tmp_path / "r", "--config", tmp_path], capsys)
    one_error(code, err, str(tmp_path), "is a folder, not a YAML file")


def test_predictions_get_the_mode_of_a_plain_folder(trained_run, phantom, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert run_cli(["evaluate", "--run", run, "--data", phantom, "--device", "cpu"], capsys)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((run / "predictions").stat().st_mode) == 0o777 & ~umask


def test_compare_builds_its_report_aside_and_replaces_it_whole(trained_run, phantom, tmp_path, capsys, monkeypatch):
    import microseg.reporting.runs_report as report_module

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert run_cli(["evaluate", "--run", run, "--data", phantom, "--device", "cpu"], capsys)[0] == 0
    out = tmp_path / "report"
    (out / "overlays").mkdir(parents=True)
    (out / "report.md").write_text("an earlier report")
    (out / "overlays" / "stale.png").write_bytes(b"an overlay of an earlier run")
    assert run_cli(["compare", run, "--out", out], capsys)[0] == 0
    assert not (out / "overlays").exists() and (out / "report.md").read_text().startswith("# Run comparison")
    files = lambda: {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # noqa: E731
    before = files()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "plot_loss_curves", killed)
    assert run_cli(["compare", run, "--out", out, "--overlays"], capsys)[0] == 130
    assert files() == before  # the earlier report as it was, no temporary beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "run"]


def test_compare_refuses_a_folder_that_is_not_a_report(trained_run, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("keep")
    code, _, err = run_cli(["compare", trained_run, "--out", notes], capsys)
    one_error(code, err, f"--out {notes} holds files that are not a report (it is a folder that holds no report.md)")
    assert sorted(p.name for p in notes.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("stranger", ["folder", "loop", "dangling", "text"])
def test_predict_refuses_unexpected_entries_of_its_input_folder(stranger, trained_run, phantom, tmp_path, capsys):
    scans = tmp_path / "scans"
    shutil.copytree(phantom / "test" / "micro_ultrasound_scans", scans)
    entry = scans / "extra.nii.gz"
    if stranger == "folder":
        entry.mkdir()
    elif stranger == "loop":
        entry.symlink_to(entry)
    elif stranger == "dangling":
        entry.symlink_to(tmp_path / "nowhere.nii.gz")
    else:
        entry = scans / "notes.txt"
        entry.write_text("notes")
    code, _, err = run_cli(
        ["predict", "--run", trained_run, "--input", scans, "--out", tmp_path / "masks", "--device", "cpu"], capsys
    )
    one_error(code, err, str(entry), "unexpected entry")
    assert not (tmp_path / "masks").exists()
