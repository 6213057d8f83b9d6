"""`microseg compare EXP --out DIR`: experiment folders written by hand (numbers chosen here, no training),
every number of the report recomputed from the cells' per_patient.csv and history.csv with numpy, scipy
and statsmodels; refusals through the CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy.stats import kendalltau, rankdata, ttest_rel, wilcoxon
from scipy.stats import t as t_distribution
from statsmodels.stats.anova import anova_lm

from microseg.cli import main
from stats_helpers import statsmodels_holm

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
        "power.csv",
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
        "## What this design resolves on DSC",
        "## Cells",
    ):
        assert heading in text, heading
    assert "Replicates of each loss: seed 1; seed 2; seed 3." in text
    assert "split test, protocol microsegnet; 10 patients" in text
    assert "Primary metric: DSC" in text and "Missing is worst**" not in text  # nothing is missing


def test_per_loss_means_seed_sd_and_ranks_recomputed_from_the_cells(experiment, report):
    rows = {r["loss"]: r for r in read_rows(report / "losses.csv")}
    for key, title, higher in (("dsc", "DSC", True), ("hd95_mm", "HD95 (mm)", False)):
        arrays = per_loss_arrays(experiment, key)
        means = {loss: a.mean(axis=0).mean() for loss, a in arrays.items()}  # per-patient means, then patients
        order = sorted(means, key=means.get, reverse=higher)
        stacked = np.array([arrays[loss].mean(axis=0) for loss in LOSSES])  # [loss, patient]
        per_patient = rankdata(-stacked if higher else stacked, method="min", axis=0)
        for i, loss in enumerate(LOSSES):
            a = arrays[loss]
            assert float(rows[loss][f"{title} mean"]) == pytest.approx(means[loss], abs=1e-12)
            assert float(rows[loss][f"{title} seed sd"]) == pytest.approx(np.std(a.mean(axis=1), ddof=1), abs=1e-12)
            assert int(rows[loss][f"{title} rank"]) == order.index(loss) + 1
            assert float(rows[loss][f"{title} mean rank"]) == pytest.approx(per_patient[i].mean())
            assert rows[loss][f"{title} missing scores"] == "0"
        mean_ranks = per_patient.mean(axis=1)
        expected = rankdata(mean_ranks, method="min")
        assert [int(rows[loss][f"{title} rank-then-aggregate rank"]) for loss in LOSSES] == list(expected)
    assert [(rows[x]["cells"], rows[x]["evaluated"], rows[x]["missing cells"]) for x in LOSSES] == [("3", "3", "0")] * 3
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


def reference_fit(d: np.ndarray) -> dict[str, float]:
    """The documented method, written out for one pair: the two-way ANOVA of D[r, p], the REML
    candidate (both components, s2_rep = 0, s2_pat = 0, neither) with the largest restricted
    likelihood among those with non-negative components, Var = (L_rep + L_pat - L_res) / (R P),
    Satterthwaite's df, the two-sided t test."""
    n_rep, n_pat = d.shape
    grand, rep, pat = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ss = [n_pat * ((rep - grand) ** 2).sum(), n_rep * ((pat - grand) ** 2).sum()]
    ss.append(((d - rep[:, None] - pat[None, :] + grand) ** 2).sum())
    df = [n_rep - 1, n_pat - 1, (n_rep - 1) * (n_pat - 1)]
    ms = [s / f for s, f in zip(ss, df, strict=True)]
    pooled_rep = (ss[0] + ss[2]) / (df[0] + df[2])
    pooled_pat = (ss[1] + ss[2]) / (df[1] + df[2])
    pooled = sum(ss) / sum(df)
    satterthwaite = (ms[0] + ms[1] - ms[2]) ** 2 / (ms[0] ** 2 / df[0] + ms[1] ** 2 / df[1] + ms[2] ** 2 / df[2])
    candidates = [  # (L_rep, L_pat, L_res, var * n, df, allowed)
        (ms[0], ms[1], ms[2], ms[0] + ms[1] - ms[2], satterthwaite, ms[0] >= ms[2] and ms[1] >= ms[2]),
        (pooled_rep, ms[1], pooled_rep, ms[1], df[1], ms[1] >= pooled_rep),
        (ms[0], pooled_pat, pooled_pat, ms[0], df[0], ms[0] >= pooled_pat),
        (pooled, pooled, pooled, pooled, sum(df), True),
    ]

    def loglik(c):
        return -sum(f * math.log(lam) + s / lam for f, lam, s in zip(df, c[:3], ss, strict=True))

    best = max((c for c in candidates if c[5]), key=loglik)
    var, dof = best[3] / d.size, best[4]
    p = 2 * t_distribution.sf(abs(d.mean()) / math.sqrt(var), dof)
    return {
        "mean": d.mean(),
        "se": math.sqrt(var),
        "df": dof,
        "p": p,
        "patient_sd": math.sqrt((best[1] - best[2]) / n_rep),
        "replicate_sd": math.sqrt((best[0] - best[2]) / n_pat),
        "residual_sd": math.sqrt(best[2]),
    }


def test_significance_is_the_crossed_effects_test_with_holm_and_matching_cis(experiment, report):
    rows = read_rows(report / "significance.csv")
    assert [(r["metric"], r["family"], r["loss_a"], r["loss_b"]) for r in rows] == [
        (m, f, a, b)
        for m, f in (("DSC", "primary"), ("HD95 (mm)", "secondary"))
        for a, b in (("good", "mid"), ("good", "low"), ("mid", "low"))
    ]
    for family in (rows[:3], rows[3:]):
        raw, wilcoxon_raw = [], []
        for r in family:
            arrays = per_loss_arrays(experiment, "dsc" if r["metric"] == "DSC" else "hd95_mm")
            d = arrays[r["loss_a"]] - arrays[r["loss_b"]]  # [seed, patient]
            expected = reference_fit(d)
            for column in ("mean", "se", "df", "patient_sd", "replicate_sd", "residual_sd"):
                got = float(r["mean_diff" if column == "mean" else column])
                assert got == pytest.approx(expected[column], rel=1e-9, abs=1e-12), column
            assert float(r["p_value"]) == pytest.approx(expected["p"], rel=1e-9)
            assert (r["replicates"], r["patients"]) == ("3", "10")
            raw.append(expected["p"])
            wilcoxon_raw.append(wilcoxon(d.mean(axis=0)).pvalue)
            assert float(r["wilcoxon_p"]) == pytest.approx(wilcoxon_raw[-1])
        adjusted = statsmodels_holm(raw)
        assert [float(r["p_holm"]) for r in family] == pytest.approx(adjusted)
        assert [float(r["wilcoxon_p_holm"]) for r in family] == pytest.approx(statsmodels_holm(wilcoxon_raw))
        for r, p, p_holm in zip(family, raw, adjusted, strict=True):
            level = 1 - 0.05 * p / p_holm
            half = t_distribution.ppf((1 + level) / 2, float(r["df"])) * float(r["se"])
            assert float(r["ci_level"]) == pytest.approx(level)
            assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx(
                (float(r["mean_diff"]) - half, float(r["mean_diff"]) + half)
            )
            assert r["significant"] == ("yes" if p_holm < 0.05 else "no")
            assert (r["significant"] == "yes") == (float(r["ci_low"]) > 0 or float(r["ci_high"]) < 0)
    by_pair = {(r["metric"], r["loss_a"], r["loss_b"]): r for r in rows}
    assert by_pair["DSC", "good", "low"]["significant"] == "yes"
    assert by_pair["DSC", "mid", "low"]["significant"] == "no"


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


def test_variance_table_is_the_anova_of_the_run_means_with_seed_as_a_block(experiment, report):
    rows = {(r["metric"], r["source"]): r for r in read_rows(report / "variance.csv")}
    for key, title in (("dsc", "DSC"), ("hd95_mm", "HD95 (mm)")):
        arrays = per_loss_arrays(experiment, key)
        frame = pd.DataFrame(
            [(loss, seed, u) for loss in LOSSES for seed, u in zip(SEEDS, arrays[loss].mean(axis=1), strict=True)],
            columns=["loss", "seed", "u"],
        )
        reference = anova_lm(smf.ols("u ~ C(loss) + C(seed)", frame).fit())
        total = reference["sum_sq"].sum()
        ms_res = reference.loc["Residual", "sum_sq"] / reference.loc["Residual", "df"]
        for source, name in (("loss", "C(loss)"), ("seed", "C(seed)"), ("residual", "Residual")):
            row = rows[title, source]
            assert float(row["SS"]) == pytest.approx(reference.loc[name, "sum_sq"], rel=1e-9)
            assert float(row["df"]) == reference.loc[name, "df"]
            assert float(row["share"]) == pytest.approx(reference.loc[name, "sum_sq"] / total, rel=1e-9)
        assert float(rows[title, "loss"]["p"]) == pytest.approx(reference.loc["C(loss)", "PR(>F)"], rel=1e-7)
        assert float(rows[title, "seed"]["F"]) == pytest.approx(reference.loc["C(seed)", "F"], rel=1e-9)
        ms_seed = reference.loc["C(seed)", "sum_sq"] / 2
        assert float(rows[title, "seed"]["sd"]) == pytest.approx(math.sqrt(max(0, (ms_seed - ms_res) / 3)), abs=1e-12)
        assert float(rows[title, "total"]["SS"]) == pytest.approx(total)


def bootstrap_ranks(values: np.ndarray, higher: bool, n: int = 10_000, seed: int = 0) -> dict[str, np.ndarray]:
    """The documented resamples (one generator: replicate indices [n, R], then patient indices [n, P]),
    materialised, and each scheme's ranks of every resample [n, loss]."""
    rng = np.random.default_rng(seed)
    n_reps, n_patients = values.shape[1:]
    reps, patients = rng.integers(0, n_reps, (n, n_reps)), rng.integers(0, n_patients, (n, n_patients))
    sample = values[:, reps[:, :, None], patients[:, None, :]]  # [loss, n, R, P]
    sign = -1 if higher else 1
    patient_means = sample.mean(axis=2)  # [loss, n, P]
    per_patient = rankdata(sign * patient_means, method="min", axis=0)
    return {
        "aggregate-then-rank": rankdata(sign * patient_means.mean(axis=2), method="min", axis=0).T,
        "rank-then-aggregate": rankdata(per_patient.mean(axis=2), method="min", axis=0).T,
    }


def test_ranking_table_recomputed_with_kendall_tau(experiment, report):
    rows = read_rows(report / "ranking.csv")
    assert len(rows) == 2 * 2 * 3
    for key, title, higher in (("dsc", "DSC", True), ("hd95_mm", "HD95 (mm)", False)):
        arrays = per_loss_arrays(experiment, key)
        values = np.array([arrays[loss] for loss in LOSSES])
        boot = bootstrap_ranks(values, higher)
        for scheme in ("aggregate-then-rank", "rank-then-aggregate"):
            these = {r["loss"]: r for r in rows if r["metric"] == title and r["scheme"] == scheme}
            observed = np.array([int(these[loss]["rank"]) for loss in LOSSES])
            for i, loss in enumerate(LOSSES):
                shares = [float(these[loss][f"P(rank {k})"]) for k in (1, 2, 3)]
                assert shares == pytest.approx([(boot[scheme][:, i] == k).mean() for k in (1, 2, 3)])
            distinct, which = np.unique(boot[scheme], axis=0, return_inverse=True)  # scipy once per ranking
            tau = np.array([kendalltau(row, observed).statistic for row in distinct])[which.ravel()]
            tau = tau[~np.isnan(tau)]
            quartiles = (np.median(tau), np.percentile(tau, 25), np.percentile(tau, 75))
            row = these["good"]
            assert (float(row["tau median"]), float(row["tau q25"]), float(row["tau q75"])) == pytest.approx(quartiles)
        mean = {
            r["loss"]: float(r["score"]) for r in rows if r["metric"] == title and r["scheme"] == "aggregate-then-rank"
        }
        assert [mean[loss] for loss in LOSSES] == pytest.approx(values.mean(axis=(1, 2)))


def test_results_paragraph_gives_the_primary_verdict_rankings_variance_and_power(report):
    text = (report / "report.md").read_text()
    paragraph = text.split("## Results\n\n", 1)[1].split("\n", 1)[0]
    assert paragraph.startswith(
        "3 loss(es) x 3 seed(s) = 9 cells (9 evaluated), 10 test patients; primary metric DSC, secondary HD95. "
        "No score is missing. On DSC (primary;"
    )
    significance = {(r["metric"], r["loss_a"], r["loss_b"]): r for r in read_rows(report / "significance.csv")}
    good_low = significance["DSC", "good", "low"]
    level = 100 * float(good_low["ci_level"])
    assert (
        f"good is better than low by {float(good_low['mean_diff']):.4f} DSC ({level:.4g}% CI "
        f"{float(good_low['ci_low']):.4f} to {float(good_low['ci_high']):.4f}, adjusted p "
        f"{float(good_low['p_holm']):.3g})" in paragraph
    )
    power = read_rows(report / "power.csv")
    detectable = float(power[0]["detectable difference"])
    assert re.search(r"mid vs low: not resolved at this design \(mid ahead by 0\.00\d+ DSC, [\d.]+% CI ", paragraph)
    assert f"the smallest difference it can detect is {detectable:.4f} DSC" in paragraph
    assert "Secondary, HD95 (the same test, Holm over its own 3 pair(s)): " in paragraph
    assert "Ranking on DSC (mean; mean rank)" in paragraph and "rank-then-aggregate good" in paragraph
    assert re.search(r"Of the variance of the run means on DSC, \d+% is the loss's \(F test p ", paragraph)
    assert "At this design (3 seed(s) x 10 patients) the smallest DSC difference detectable with 80% power" in paragraph
    assert "at alpha 0.0167 (0.05 / 3, Holm's first step)" in paragraph
    assert "within seed noise" not in paragraph.lower()


def test_power_table_pools_the_primary_pairs_components(report):
    significance = [r for r in read_rows(report / "significance.csv") if r["family"] == "primary"]
    rows = read_rows(report / "power.csv")
    assert [(r["design"], r["seeds"], r["replicate slots"], r["patients"]) for r in rows] == [
        ("this design", "3", "3", "10"),
        ("2x the seeds", "6", "6", "10"),
        ("4x the seeds", "12", "12", "10"),
    ]
    for column in ("patient_sd", "replicate_sd", "residual_sd"):
        pooled = math.sqrt(np.mean([float(r[column]) ** 2 for r in significance]))
        assert [float(r[column]) for r in rows] == pytest.approx([pooled] * 3)
    assert float(rows[0]["alpha"]) == pytest.approx(0.05 / 3)
    detectable = [float(r["detectable difference"]) for r in rows]
    assert detectable[0] > detectable[1] > detectable[2] > 0


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
            writer.writerows([loss, seed, case, v, 3 - 2 * v] for case, v in zip(TRAINING, values, strict=True))
        if extra_row:
            writer.writerow(extra_row)


def test_folds_are_replicates_of_their_seed_and_the_out_of_fold_scores_are_summarised(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", chosen_scores(("good", "low"), (1, 2), (0, 1)), folds=2)
    write_oof(exp)
    code, _, err = run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)
    assert code == 0 and not err, err
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Replicates of each loss: seed 1 fold 0; seed 1 fold 1; seed 2 fold 0; seed 2 fold 1 (2-fold" in text
    rows = read_rows(tmp_path / "r" / "losses.csv")
    assert [(r["cells"], r["evaluated"]) for r in rows] == [("4", "4"), ("4", "4"), ("-", "-")]  # the rater: -
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


def test_with_folds_the_anova_has_seed_and_fold_apart_and_the_pairs_use_every_fold_model(tmp_path, capsys):
    scores = chosen_scores(("good", "low"), (1, 2, 3), (0, 1))
    exp = write_experiment(tmp_path / "exp", scores, folds=2)
    assert run_cli(["compare", exp, "--out", tmp_path / "r"], capsys)[0] == 0
    u = [(loss, seed, fold, scores[loss, seed, fold]["dsc"].mean()) for loss, seed, fold in scores]
    reference = anova_lm(
        smf.ols("u ~ C(loss) + C(seed) + C(fold)", pd.DataFrame(u, columns=["loss", "seed", "fold", "u"])).fit()
    )
    rows = {r["source"]: r for r in read_rows(tmp_path / "r" / "variance.csv") if r["metric"] == "DSC"}
    ms_res = reference.loc["Residual", "sum_sq"] / reference.loc["Residual", "df"]
    for source, runs_per_level in (("seed", 2 * 2), ("fold", 2 * 3)):
        expected = reference.loc[f"C({source})"]
        assert float(rows[source]["p"]) == pytest.approx(expected["PR(>F)"], rel=1e-7)
        sd = math.sqrt(max(0.0, (expected["sum_sq"] / expected["df"] - ms_res) / runs_per_level))
        assert float(rows[source]["sd"]) == pytest.approx(sd, abs=1e-12)
    (dsc, *_) = read_rows(tmp_path / "r" / "significance.csv")
    d = np.array([scores["good", s, f]["dsc"] - scores["low", s, f]["dsc"] for s in (1, 2, 3) for f in (0, 1)])
    assert (dsc["replicates"], dsc["patients"]) == ("6", "10")
    assert float(dsc["se"]) == pytest.approx(reference_fit(d)["se"], rel=1e-9)


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


def test_the_report_folder_is_replaced_whole_and_never_one_holding_other_files(experiment, report, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(report, out)  # an earlier report of the experiment
    (out / "stale.csv").write_text("from an earlier report\n")
    assert run_cli(["compare", experiment, "--out", out], capsys)[0] == 0
    assert (out / "report.md").is_file() and not (out / "stale.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary left beside it
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me\n")
    code, _, err = run_cli(["compare", experiment, "--out", other], capsys)
    assert code == 2 and err == [
        f"microseg: error: --out {other} holds files that are not a report (it is a folder that holds no report.md): choose a new folder, or an earlier report's"
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


def test_with_one_run_per_loss_the_test_is_the_paired_t_test_over_patients(tmp_path):
    from microseg.reporting.experiment_report import analyse, experiment_paragraph

    scores = chosen_scores(("good", "low"), (1,))
    analysis = analyse([write_experiment(tmp_path / "exp", scores)])
    text = experiment_paragraph(analysis)
    dsc = next(d for d in analysis.differences if d.metric == "dsc")
    reference = ttest_rel(scores["good", 1, None]["dsc"], scores["low", 1, None]["dsc"])
    assert dsc.p_value == pytest.approx(reference.pvalue) and dsc.df == N_PATIENTS - 1
    assert "good is better than low by" in text and "train more seeds before trusting any difference" in text
    assert "Of the variance of the run means" not in text  # one seed: no residual to test against


def test_a_cell_retrained_since_its_evaluation_is_refused(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", chosen_scores(("good", "low"), (1, 2)))
    (exp / "runs" / "low__s2" / "last.pt").write_bytes(b"another model")
    line = refused(["compare", exp, "--out", tmp_path / "r"], capsys, tmp_path / "r")
    assert "low__s2" in line and "no longer the run's model" in line
