"""The one writer of both reports: a table's section and CSV, the `--out` guard (the same refusal for
runs and experiments), the folder written whole or not at all, and compare's choice of report."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from test_experiment_report import chosen_scores, run_cli, write_experiment

from microseg.core.errors import MicrosegError
from microseg.reporting.compare import compare
from microseg.reporting.writer import ReportWriter, write_report_folder

TABLE = ["| case | dsc |", "|---|---|", "| 01 | 0.8125 |", "| 02 | n/a |"]


@pytest.mark.parametrize("notes_below", [False, True])
def test_a_table_is_a_csv_and_a_section_with_its_notes_above_or_below(tmp_path, notes_below):
    report = ReportWriter(tmp_path, notes_below)
    report.table("t", "Title", ["case", "dsc"], [["01", 0.8125], ["02", float("nan")]], ["a note"])
    with open(tmp_path / "t.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [["case", "dsc"], ["01", "0.8125"], ["02", "nan"]]
    body = ["\n".join(TABLE), "", "a note", ""] if notes_below else ["a note", "", "\n".join(TABLE), ""]
    assert report.lines == ["## Title", "", *body, "([t.csv](t.csv))", ""]


def test_a_table_shown_in_another_layout_keeps_its_csv(tmp_path):
    report = ReportWriter(tmp_path)
    report.table("t", "Title", ["case", "dsc"], [["01", 0.8125]], shown=(["x"], [["y"]]))
    assert report.lines == ["## Title", "", "| x |\n|---|\n| y |", "", "([t.csv](t.csv))", ""]
    assert (tmp_path / "t.csv").read_text().splitlines() == ["case,dsc", "01,0.8125"]


def test_a_report_folder_is_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "report"

    def write(report: ReportWriter) -> None:
        report.add("# A report")
        report.table("t", "T", ["a"], [[1]])

    assert write_report_folder(out, write) == out / "report.md"
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "t.csv"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(report: ReportWriter) -> None:
        report.table("u", "U", ["a"], [[2]])
        raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        write_report_folder(out, failing)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary left beside it


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    return write_experiment(tmp_path_factory.mktemp("exp") / "exp", chosen_scores(("good", "low"), (1, 2)))


@pytest.mark.parametrize("target", ["file", "folder of other files"])
def test_runs_and_experiments_meet_one_out_guard(experiment, tmp_path, capsys, target):
    out = tmp_path / "out"
    if target == "file":
        out.write_text("mine\n")
        expected = f"microseg: error: cannot create folder {out}: --out {out} is a file, not a folder"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
        expected = f"microseg: error: --out {out} holds files that are not a report (it is a folder that holds no report.md): choose a new folder, or an earlier report's"
    runs = [experiment / "runs" / "good__s1", experiment / "runs" / "low__s1"]
    for paths in ([experiment], runs):
        code, _, err = run_cli(["compare", *paths, "--out", out], capsys)
        assert (code, err) == (2, [expected])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out.read_text() if target == "file" else (out / "notes.txt").read_text()) == "mine\n"


def test_compare_chooses_the_report_by_the_folders(experiment, tmp_path):
    runs = [experiment / "runs" / "good__s1", experiment / "runs" / "low__s1"]
    assert compare([experiment], tmp_path / "e").read_text().startswith("# Experiment comparison")
    assert compare(runs, tmp_path / "r").read_text().startswith("# Run comparison")
    refusals = [
        ((runs[0], experiment), {}, "is not an experiment folder (no experiment.json) but"),
        ((experiment, runs[0]), {}, "compare run folders or experiment folders, not both"),
        ((experiment,), {"overlays": True}, "--overlays and --cases draw run folders"),
        ((experiment,), {"cases": "01"}, "--overlays and --cases draw run folders"),
        (tuple(runs), {"missing": "drop"}, "--missing applies to experiment folders"),
    ]
    for paths, options, message in refusals:
        with pytest.raises(MicrosegError, match=re.escape(message)):
            compare(list(paths), tmp_path / "refused", **options)
    assert not (tmp_path / "refused").exists()
