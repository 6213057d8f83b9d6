"""`microseg compare EXP --out DIR`: experiment folders written by hand (numbers chosen here, no training),
every number of the report recomputed from the cells' per_patient.csv and history.csv with numpy, scipy
and statsmodels; refusals through the CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests

from microseg.cli import main

LOSSES = ("good", "mid", "low")
SEEDS = (1, 2, 3)
N_PATIENTS = 10
PATIENTS = [f"{i + 1:02d}" for i in range(N_PATIENTS)]


def chosen_scores(losses=LOSSES, seeds=SEEDS, folds=(None,)) -> dict[tuple, dict[str, np.ndarray]]:
    """(loss, seed, fold) -> {"dsc": [patients], "hd95_mm": [patients]}: "good" is better than the
    others on every patient by 0.05 DSC; "mid" and "low" differ by 0.002, and every run has a seed
    shift of up to +-0.01 (so their difference is within seed noise)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.80, 0.90, N_PATIENTS)
    hd_base = rng.uniform(2.0, 3.0, N_PATIENTS)
    offset = {"good": 0.05, "mid": 0.002, "low": 0.0, "extra": 0.01}
    out = {}
    for loss in losses:
        for seed in seeds:
            for fold in folds:
                shift = 0.01 * np.sin(7 * seed + 3 * (fold or 0) + len(loss))
                noise = rng.normal(0, 0.004, N_PATIENTS)
                dsc = base + offset[loss] + shift + noise
                hd = hd_base - 10 * offset[loss] - 5 * shift + rng.normal(0, 0.05, N_PATIENTS)
                out[loss, seed, fold] = {"dsc": dsc, "hd95_mm": hd}
    return out


def write_cell(
    exp: Path,
    loss: str,
    seed: int,
    fold,
    scores: dict[str, np.ndarray] | None,
    epochs: int = 4,
    evaluation: dict | None = None,
    patients=PATIENTS,
) -> dict:
    """One cell's run folder: config.yaml, history.csv (numbers from loss, seed, fold) and, when
    `scores` is given, metrics/per_patient.csv (with a rater column and summary rows), evaluation.json and
    the last.pt it records (its sha256)."""
    cell_id = f"{loss}__s{seed}" + ("" if fold is None else f"__f{fold}")
    run = exp / "runs" / cell_id
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"loss: {loss}\nseed: {seed}\nepochs: {epochs}\nmodel: tiny\n")
    with open(run / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "loss", "bce", "val_dsc", "lr", "seconds"])
        for e in range(1, epochs + 1):
            k = LOSSES.index(loss) if loss in LOSSES else 3
            writer.writerow(
                [
                    e,
                    1.0 / e + 0.1 * k + 0.01 * seed,
                    0.5 / e + 0.02 * seed + 0.003 * (fold or 0),
                    0.5 + 0.1 * e - 0.01 * k + 0.002 * seed,
                    0.01,
                    3.0,
                ]
            )
    if scores is not None:
        (run / "metrics").mkdir()
        with open(run / "metrics" / "per_patient.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", "dsc", "hd95_mm", "non_expert_dsc", "non_expert_hd95_mm"])
            for i, case in enumerate(patients):
                writer.writerow([case, scores["dsc"][i], scores["hd95_mm"][i], 0.85 - 0.001 * i, 3.1 + 0.01 * i])
            for name in ("mean", "std", "median"):
                writer.writerow([name, 0.5, 9.0, 0.5, 9.0])  # summary rows: never patients
        checkpoint = f"a stand-in for {cell_id}'s last.pt".encode()  # hashed, never loaded
        (run / "last.pt").write_bytes(checkpoint)
        ev = {
            "data": "/data/phantom",
            "split": "test",
            "protocol": "microsegnet",
            "checkpoint": "last.pt",
            "checkpoint_sha256": hashlib.sha256(checkpoint).hexdigest(),
        }
        (run / "metrics" / "evaluation.json").write_text(json.dumps(dict(ev, **(evaluation or {}))))
    return {"id": cell_id, "loss": loss, "seed": seed, "fold": fold, "run": f"runs/{cell_id}"}


def write_experiment(
    exp: Path, scores: dict[tuple, dict[str, np.ndarray]], unevaluated=(), folds: int = 0, test=PATIENTS, **cell_options
) -> Path:
    cells = [
        write_cell(exp, *key, None if key in unevaluated else value, **cell_options) for key, value in scores.items()
    ]
    plan = {
        "losses": list(dict.fromkeys(k[0] for k in scores)),
        "seeds": sorted({k[1] for k in scores}),
        "folds": folds,
        "cache": "cache.h5",
        "data": "/data/phantom",
        "protocol": "microsegnet",
        "base": {"model": "tiny", "epochs": 4},
    }
    (exp / "experiment.json").write_text(json.dumps({"version": 1, "plan": plan, "cells": cells}))
    fold_ids = [[p for j, p in enumerate(["21", "22", "23", "24"]) if j % folds != f] for f in range(folds)]
    (exp / "splits.json").write_text(json.dumps({"folds": fold_ids, "test": list(test)}))
    return exp


def run_cli(args, capsys) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cell_patients(exp: Path) -> dict[tuple, dict[str, dict[str, float]]]:
    """Independent reader: (loss, seed, fold) -> case -> metric, from each evaluated cell's per_patient.csv."""
    found = {}
    for cell in json.loads((exp / "experiment.json").read_text())["cells"]:
        path = exp / cell["run"] / "metrics" / "per_patient.csv"
        if path.is_file():
            found[cell["loss"], cell["seed"], cell["fold"]] = {
                row["case_id"]: {k: float(v) for k, v in row.items() if k != "case_id"}
                for row in read_rows(path)
                if row["case_id"] not in ("mean", "std", "median")
            }
    return found


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    return write_experiment(tmp_path_factory.mktemp("exp") / "exp", chosen_scores())


@pytest.fixture(scope="module")
def report(experiment, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    assert main(["compare", str(experiment), "--out", str(out)]) == 0
    return out


def per_loss_arrays(exp: Path, key: str) -> dict[str, np.ndarray]:
    """loss -> [run, patient] of `key`, from the cells' CSVs."""
    cells = cell_patients(exp)
    return {
        loss: np.array([[cells[k][p][key] for p in PATIENTS] for k in sorted(cells, key=str) if k[0] == loss])
        for loss in dict.fromkeys(k[0] for k in cells)
    }


def test_report_files_and_sections(report):
    for name in (
        "report.md",
        "losses.csv",
        "curves.csv",
        "curves.png",
        "per_patient.csv",
        "dot_box.png",
        "ranking.csv",
        "ranking.png",
        "significance.csv",
        "significance.png",
        "variance.csv",
        "cells.csv",
    ):
        assert (report / name).is_file(), name
    text = (report / "report.md").read_text()
    for heading in (
        "## What was compared",
        "## Results",
        "## Losses",
        "## Loss curves per epoch",
        "min-max over seeds",
        "## Per-patient DSC and HD95",
        "## Ranking stability",
        "## Significance map",
        "## How much of the spread",
        "## Cells",
    ):
        assert heading in text, heading
    assert "Replicates of each loss: seed 1; seed 2; seed 3." in text
    assert "split test, protocol microsegnet; 10 patients" in text


def test_per_loss_means_seed_sd_and_ranks_recomputed_from_the_cells(experiment, report):
    rows = {r["loss"]: r for r in read_rows(report / "losses.csv")}
    for key, title, higher in (("dsc", "DSC", True), ("hd95_mm", "HD95 (mm)", False)):
        arrays = per_loss_arrays(experiment, key)
        means = {loss: a.mean(axis=0).mean() for loss, a in arrays.items()}  # per-patient means, then patients
        order = sorted(means, key=means.get, reverse=higher)
        for loss, a in arrays.items():
            assert float(rows[loss][f"{title} mean"]) == pytest.approx(means[loss], abs=1e-12)
            assert float(rows[loss][f"{title} seed sd"]) == pytest.approx(np.std(a.mean(axis=1), ddof=1), abs=1e-12)
            assert int(rows[loss][f"{title} rank"]) == order.index(loss) + 1
            assert rows[loss]["runs"] == "3"
    assert rows["good"]["DSC rank"] == "1" and float(rows["good"]["DSC P(rank 1)"]) == 1.0
    rater = rows["rater non_expert"]
    assert float(rater["DSC mean"]) == pytest.approx(np.mean([0.85 - 0.001 * i for i in range(N_PATIENTS)]))
    assert float(rater["HD95 (mm) mean"]) == pytest.approx(np.mean([3.1 + 0.01 * i for i in range(N_PATIENTS)]))


def test_per_patient_table_is_the_mean_over_runs(experiment, report):
    rows = {r["case_id"]: r for r in read_rows(report / "per_patient.csv")}
    arrays = per_loss_arrays(experiment, "dsc")
    for i, case in enumerate(PATIENTS):
        assert float(rows[case]["mid DSC"]) == pytest.approx(arrays["mid"][:, i].mean(), abs=1e-12)
    assert float(rows["mean"]["low DSC"]) == pytest.approx(arrays["low"].mean(), abs=1e-12)


def test_significance_is_wilcoxon_on_patient_means_holm_adjusted_over_pairs_and_metrics(experiment, report):
    rows = read_rows(report / "significance.csv")
    assert [(r["metric"], r["loss_a"], r["loss_b"]) for r in rows] == [
        (m, a, b) for m in ("DSC", "HD95 (mm)") for a, b in (("good", "mid"), ("good", "low"), ("mid", "low"))
    ]
    raw = []
    for r in rows:
        arrays = per_loss_arrays(experiment, "dsc" if r["metric"] == "DSC" else "hd95_mm")
        d = arrays[r["loss_a"]].mean(axis=0) - arrays[r["loss_b"]].mean(axis=0)
        raw.append(wilcoxon(d).pvalue)
        assert float(r["mean_diff"]) == pytest.approx(d.mean(), abs=1e-12) and r["n"] == "10"
        sd = max(np.std(arrays[x].mean(axis=1), ddof=1) for x in (r["loss_a"], r["loss_b"]))
        assert float(r["seed_noise"]) == pytest.approx(sd, abs=1e-12)
        assert r["within_seed_noise"] == ("yes" if abs(d.mean()) < sd else "no")
        assert float(r["ci95_low"]) <= float(r["mean_diff"]) <= float(r["ci95_high"])
    assert [float(r["p_value"]) for r in rows] == pytest.approx(raw)
    adjusted = multipletests(raw, method="holm")[1]
    assert [float(r["p_holm"]) for r in rows] == pytest.approx(adjusted)
    assert [r["significant"] for r in rows] == ["yes" if p < 0.05 else "no" for p in adjusted]
    by_pair = {(r["metric"], r["loss_a"], r["loss_b"]): r for r in rows}
    assert by_pair["DSC", "good", "low"]["significant"] == "yes"  # every patient better: p = 2 / 2^10, x 6
    assert by_pair["DSC", "mid", "low"]["within_seed_noise"] == "yes"


def test_curves_are_mean_sd_and_min_max_over_the_runs_histories(experiment, report):
    rows = read_rows(report / "curves.csv")
    histories = {}
    for cell in json.loads((experiment / "experiment.json").read_text())["cells"]:
        for row in read_rows(experiment / cell["run"] / "history.csv"):
            for column in ("loss", "bce", "val_dsc"):
                histories.setdefault((cell["loss"], column, int(row["epoch"])), []).append(float(row[column]))
    assert len(rows) == len(histories) == 3 * 3 * 4
    for r in rows:
        values = np.array(histories[r["loss"], r["curve"], int(r["epoch"])])
        assert int(r["n"]) == 3
        assert (float(r["mean"]), float(r["sd"]), float(r["min"]), float(r["max"])) == pytest.approx(
            (values.mean(), values.std(ddof=1), values.min(), values.max()), abs=1e-12
        )
    text = (report / "report.md").read_text()
    mean = np.mean(histories["good", "bce", 2])
    sd = np.std(histories["good", "bce", 2], ddof=1)
    assert f"{mean:.4f} ± {sd:.4f}" in text


def test_variance_share_recomputed_from_the_run_means(experiment, report):
    rows = {r["metric"]: r for r in read_rows(report / "variance.csv")}
    for key, title in (("dsc", "DSC"), ("hd95_mm", "HD95 (mm)")):
        run_means = {loss: a.mean(axis=1) for loss, a in per_loss_arrays(experiment, key).items()}
        every = np.concatenate(list(run_means.values()))
        ss_loss = sum(len(u) * (u.mean() - every.mean()) ** 2 for u in run_means.values())
        ss_total = ((every - every.mean()) ** 2).sum()
        assert float(rows[title]["loss share"]) == pytest.approx(ss_loss / ss_total, abs=1e-12)
        assert float(rows[title]["chance share"]) == pytest.approx((3 - 1) / (9 - 1))


def test_ranking_frequencies_sum_to_one_per_loss(report):
    for r in read_rows(report / "ranking.csv"):
        assert sum(float(r[f"P(rank {k})"]) for k in (1, 2, 3)) == pytest.approx(1.0)
        if r["loss"] == "good" and r["metric"] == "DSC":
            assert r["observed rank"] == "1" and float(r["P(rank 1)"]) == 1.0


def test_results_paragraph_says_what_survives_and_what_is_within_seed_noise(report):
    text = (report / "report.md").read_text()
    paragraph = text.split("## Results\n\n", 1)[1].split("\n", 1)[0]
    assert paragraph.startswith("3 loss(es), 3 evaluated run(s) each, 10 patients")
    assert re.search(r"By mean DSC: good [\d.]+ \(seed sd [\d.]+\), ", paragraph)
    assert "good ranks first in 100% of 10,000 bootstrap resamples" in paragraph
    assert "The family: 3 pair(s) of losses x DSC and HD95, 6 paired Wilcoxon tests" in paragraph
    assert re.search(
        r"; 4 survive the correction, beyond seed noise: good - mid on DSC \+0\.05\d+ \(95% CI "
        r"\+0\.0\d+ to \+0\.0\d+, adjusted p = 0\.0117, seed sd 0\.00\d+\); good - low on DSC",
        paragraph,
    )
    assert re.search(
        r"Not surviving it: mid - low on DSC [+-]0\.00\d+ \(.*seed sd 0\.00\d+\), within seed noise; "
        r"mid - low on HD95",
        paragraph,
    )
    assert "after Holm over 6 tests no adjusted p below 0.0117." in paragraph
    assert "The loss explains" in paragraph and "(chance level 25%)" in paragraph


TRAINING = ["21", "22", "23", "24"]
OOF_DSC = {
    ("good", 1): [0.90, 0.88, 0.86, 0.92],
    ("good", 2): [0.91, 0.87, 0.85, 0.94],
    ("low", 1): [0.85, 0.86, 0.80, 0.90],
    ("low", 2): [0.80, 0.83, 0.84, 0.91],
}


def write_oof(exp: Path, dsc=OOF_DSC, extra_row=None) -> None:
    """EXP/oof/per_patient.csv: loss, seed + per_patient.csv columns, every training patient once."""
    (exp / "oof").mkdir()
    with open(exp / "oof" / "per_patient.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["loss", "seed", "case_id", "dsc", "hd95_mm"])
        for (loss, seed), values in dsc.items():
            writer.writerows([loss, seed, case, v, 3 - 2 * v] for case, v in zip(TRAINING, values))
        if extra_row:
            writer.writerow(extra_row)


def test_folds_are_replicates_of_their_seed_and_the_out_of_fold_scores_are_summarised(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", chosen_scores(("good", "low"), (1, 2), (0, 1)), folds=2)
    write_oof(exp)
    code, _, err = run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)
    assert code == 0 and not err, err
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Replicates of each loss: seed 1 fold 0; seed 1 fold 1; seed 2 fold 0; seed 2 fold 1 (2-fold" in text
    assert [r["runs"] for r in read_rows(tmp_path / "r" / "losses.csv")] == ["4", "4", "-"]  # the rater: -
    assert {r["n"] for r in read_rows(tmp_path / "r" / "curves.csv")} == {"4"}
    oof = {r["loss"]: r for r in read_rows(tmp_path / "r" / "oof.csv")}
    for loss in ("good", "low"):
        runs = np.array([OOF_DSC[loss, 1], OOF_DSC[loss, 2]])
        assert (oof[loss]["seeds"], oof[loss]["patients"]) == ("2", "4")
        assert float(oof[loss]["DSC mean"]) == pytest.approx(runs.mean())
        assert float(oof[loss]["DSC seed sd"]) == pytest.approx(np.std(runs.mean(axis=1), ddof=1))
        assert float(oof[loss]["HD95 (mm) mean"]) == pytest.approx(3 - 2 * runs.mean())
    assert (oof["good"]["DSC rank"], oof["low"]["DSC rank"], oof["good"]["HD95 (mm) rank"]) == ("1", "2", "1")
    assert "## Cross-validation: out-of-fold scores of the training patients" in text


def test_a_patient_out_of_fold_twice_is_refused(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", chosen_scores(("good", "low"), (1, 2), (0, 1)), folds=2)
    write_oof(exp, extra_row=["low", 2, "22", 0.8, 1.4])
    line = refused(["compare", exp, "--out", tmp_path / "r"], capsys, tmp_path / "r")
    assert "per_patient.csv: patient 22 appears twice for loss low, seed 2" in line


def _cut_mid_line(text: str) -> str:
    return text[: text.rindex(",") + 3]  # the last row ends inside its last value


def _drop_column(text: str) -> str:
    return "\n".join(",".join(line.split(",")[:-1]) for line in text.splitlines()) + "\n"


def _short_row(text: str) -> str:
    lines = text.splitlines()
    return "\n".join([*lines[:3], ",".join(lines[3].split(",")[:-1]), *lines[4:]]) + "\n"


def _replace_value(old: str, new: str):
    return lambda text: text.replace(old, new, 1)


OOF_DAMAGE = {
    "cut mid-line": (_cut_mid_line, "last line is cut"),
    "last row lost": (lambda text: "".join(text.splitlines(keepends=True)[:-1]), "holds 3 of the folds' 4 patients"),
    "a column missing": (_drop_column, "needs loss, seed, case_id, dsc and hd95_mm"),
    "a row missing a field": (_short_row, "line 4 has 4 fields, the header 5"),
    "a row with an extra field": (lambda t: t.replace("\n", ",1\n", 2).replace(",1\n", "\n", 1), "line 2 has 6"),
    "a metric not a number": (_replace_value(",0.86,", ",0.8x6,"), "dsc '0.8x6' is not a number"),
    "a seed not an integer": (_replace_value("good,2,", "good,two,"), "seed 'two' is not an integer"),
    "a patient not in the folds": (_replace_value("good,1,21,", "good,1,29,"), "not in the folds: 29"),
    "empty": (lambda text: "", "last line is cut"),
    "the header alone": (lambda text: text.splitlines(keepends=True)[0], "holds no patient"),
}


@pytest.mark.parametrize("damage", OOF_DAMAGE)
def test_a_damaged_out_of_fold_file_is_refused_naming_it(damage, tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", chosen_scores(("good", "low"), (1, 2), (0, 1)), folds=2)
    write_oof(exp)
    oof = exp / "oof" / "per_patient.csv"
    change, needle = OOF_DAMAGE[damage]
    oof.write_text(change(oof.read_text().replace("\r\n", "\n")))
    line = refused(["compare", exp, "--out", tmp_path / "r"], capsys, tmp_path / "r")
    assert str(oof) in line and needle in line, line


def test_two_experiments_of_the_same_splits_make_one_report(experiment, report, tmp_path, capsys):
    scores = chosen_scores()
    first = write_experiment(tmp_path / "a", {k: v for k, v in scores.items() if k[0] != "low"})
    second = write_experiment(tmp_path / "b", {k: v for k, v in scores.items() if k[0] == "low"})
    code, _, err = run_cli(["compare", first, second, "--out", tmp_path / "r"], capsys)
    assert code == 0 and not err
    assert read_rows(tmp_path / "r" / "significance.csv") == read_rows(report / "significance.csv")


def test_an_unevaluated_cell_is_left_out_with_a_warning(tmp_path, capsys):
    scores = chosen_scores()
    exp = write_experiment(tmp_path / "exp", scores, unevaluated=[("mid", 2, None)])
    code, _, err = run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)
    assert code == 0 and len(err) == 1 and err[0].startswith("microseg: warning: 1 of 9 cells are left out")
    rows = {r["loss"]: r for r in read_rows(tmp_path / "r" / "losses.csv")}
    assert rows["mid"]["runs"] == "2"
    mid = np.array([scores["mid", s, None]["dsc"] for s in (1, 3)])
    assert float(rows["mid"]["DSC mean"]) == pytest.approx(mid.mean())
    cells = {r["cell"]: r for r in read_rows(tmp_path / "r" / "cells.csv")}
    assert cells["mid__s2"]["state"] == "trained, not evaluated"


def refused(args, capsys, out: Path) -> str:
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("microseg: error: "), err
    assert not out.exists()
    return err[0]


def test_refusals_leave_nothing(tmp_path, capsys, experiment):
    out = tmp_path / "r"
    scores = chosen_scores(("good", "low"), (1, 2))
    none = write_experiment(tmp_path / "none", scores, unevaluated=list(scores))
    assert "no cell of" in refused(["compare", none, "--out", out], capsys, out)

    protocol = write_experiment(tmp_path / "protocol", scores)
    ev = protocol / "runs" / "low__s2" / "metrics" / "evaluation.json"
    ev.write_text(json.dumps(dict(json.loads(ev.read_text()), protocol="volume")))
    assert "different protocols" in refused(["compare", protocol, "--out", out], capsys, out)

    patients = write_experiment(tmp_path / "patients", scores)
    write_experiment(tmp_path / "other", scores, test=[f"{i + 1:02d}" for i in range(1, N_PATIENTS + 1)])
    line = refused(["compare", patients, tmp_path / "other", "--out", out], capsys, out)
    assert "split the patients differently" in line and "splits.json" in line

    wrong_test = write_experiment(tmp_path / "wrong_test", scores, test=["01", "02"])
    assert "not the 2 test patients" in refused(["compare", wrong_test, "--out", out], capsys, out)

    line = refused(["compare", patients, patients / "runs" / "good__s1", "--out", out], capsys, out)
    assert "not an experiment folder" in line and "not both" in line
    assert "--overlays" in refused(["compare", patients, "--out", out, "--overlays"], capsys, out)
    line = refused(["compare", patients, tmp_path / "protocol", "--out", out], capsys, out)
    assert "is a cell of both" in line

    broken = write_experiment(tmp_path / "broken", scores)
    (broken / "experiment.json").write_text("{not json")
    assert "experiment.json is not a readable experiment file" in refused(
        ["compare", broken, "--out", out], capsys, out
    )
    (broken / "experiment.json").write_text(json.dumps({"version": 1, "plan": {}, "cells": [{"id": "x"}]}))
    assert "is not a readable experiment file" in refused(["compare", broken, "--out", out], capsys, out)
    (broken / "splits.json").write_text("[]")
    (broken / "experiment.json").write_text((protocol / "experiment.json").read_text())
    assert "splits.json is not an experiment's splits file" in refused(["compare", broken, "--out", out], capsys, out)

    escaping = write_experiment(tmp_path / "escaping", scores)
    record = json.loads((escaping / "experiment.json").read_text())
    record["cells"][0]["run"] = "../protocol/runs/low__s2"  # a cell that points outside its experiment
    (escaping / "experiment.json").write_text(json.dumps(record))
    assert "is outside the experiment folder" in refused(["compare", escaping, "--out", out], capsys, out)


def test_the_report_folder_is_replaced_whole_and_never_one_holding_other_files(experiment, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(["compare", experiment, "--out", out], capsys)[0] == 0
    (out / "stale.csv").write_text("from an earlier report\n")
    assert run_cli(["compare", experiment, "--out", out], capsys)[0] == 0
    assert (out / "report.md").is_file() and not (out / "stale.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary left beside it
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me\n")
    code, _, err = run_cli(["compare", experiment, "--out", other], capsys)
    assert code == 2 and err == [
        f"microseg: error: --out {other} holds files that are not a report (no report.md): choose a new folder"
    ]
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    code, _, err = run_cli(["compare", experiment, "--out", experiment], capsys)
    assert code == 2 and "holds files that are not a report" in err[0]


def test_cells_scored_on_other_patients_are_refused(tmp_path, capsys):
    scores = chosen_scores(("good", "low"), (1, 2))
    exp = write_experiment(tmp_path / "exp", scores)
    path = exp / "runs" / "low__s1" / "metrics" / "per_patient.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # patient 01 missing
    line = refused(["compare", exp, "--out", tmp_path / "r"], capsys, tmp_path / "r")
    assert "scored other patients than" in line and "01" in line


def test_compare_of_single_runs_keeps_working(experiment, tmp_path, capsys):
    runs = [experiment / "runs" / name for name in ("good__s1", "low__s1")]
    code, _, err = run_cli(["compare", *runs, "--out", tmp_path / "r"], capsys)
    assert code == 0 and not err
    rows = read_rows(tmp_path / "r" / "wilcoxon.csv")
    assert {r["metric"] for r in rows} == {"DSC", "HD95 (mm)"} and all(r["p_holm"] for r in rows)
    smallest = min(float(r["p_value"]) for r in rows)  # a family of 2 tests: the smallest p doubled
    assert math.isclose(min(float(r["p_holm"]) for r in rows), min(1.0, 2 * smallest))


def test_with_one_run_per_loss_the_paragraph_says_the_seed_noise_is_unknown(tmp_path):
    from microseg.experiment_report import analyse, experiment_paragraph

    text = experiment_paragraph(analyse([write_experiment(tmp_path / "exp", chosen_scores(("good", "low"), (1,)))]))
    assert "2 survive the correction, with the seed noise unknown (one run per loss): good - low on DSC" in text
    assert "beyond seed noise" not in text and "train more seeds before trusting any difference" in text
    assert "The loss explains" not in text  # no run to compare within a loss: no variance share


def test_a_cell_retrained_since_its_evaluation_is_refused(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", chosen_scores(("good", "low"), (1, 2)))
    (exp / "runs" / "low__s2" / "last.pt").write_bytes(b"another model")
    line = refused(["compare", exp, "--out", tmp_path / "r"], capsys, tmp_path / "r")
    assert "low__s2" in line and "no longer the run's model" in line
