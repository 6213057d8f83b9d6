"""An experiment's plan checked whole before anything is written, its record read back strictly, cell ids
from canonical loss specs that neither collide nor leave the experiment, and the cache it is pinned to.

Nothing here trains: experiments are opened (`open_experiment`, as `experiment run` does first) or refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cli_helpers import one_error, run_cli, snapshot, tree
from microseg.core.errors import MicrosegError
from microseg.experiments.experiment import cell_id, load_experiment, open_experiment
from microseg.experiments.plan import given_plan
from microseg.losses import canonical_spec

BASE = {"model": "tiny", "epochs": 6, "batch_size": 4, "num_workers": 0}


def plan(cache, phantom, losses=("focal", "ag_bce"), seeds=(1,), folds=0, **base) -> dict:
    return {
        "losses": list(losses),
        "seeds": list(seeds),
        "folds": folds,
        "cache": str(cache),
        "data": str(phantom),
        "base": {**BASE, **base},
    }


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in snapshot(folder).items()}


@pytest.fixture
def made(cache, phantom, tmp_path) -> Path:
    """An experiment of 2 losses x 1 seed, 2 folds, as `experiment run` writes it before training."""
    out = tmp_path / "exp"
    open_experiment(out, plan(cache, phantom, folds=2))
    return out


def run_args(out, *options) -> list:
    return ["experiment", "run", "--out", out, *options]


# ---------------------------------------------------------------- check, then write


def test_options_override_the_stored_base_field_by_field_and_every_difference_is_named(made, capsys):
    before = digests(made)
    line = one_error(*run_cli(run_args(made, "--epochs", "2"), capsys)[::2], "base.epochs: 6 -> 2")
    assert "batch_size" not in line and "model" not in line  # fields the user did not give keep their value
    line = one_error(
        *run_cli(run_args(made, "--epochs", "2", "--lr", "0.5", "--protocol", "volume", "--folds", "3"), capsys)[::2]
    )
    for needle in (
        "base.epochs: 6 -> 2",
        "base.lr: 0.01 -> 0.5",
        "protocol: 'microsegnet' -> 'volume'",
        "folds: 2 -> 3",
    ):
        assert needle in line, line
    assert digests(made) == before
    experiment = load_experiment(made)  # an option given at the value the cells train with is no change
    assert open_experiment(made, {"base": {"epochs": 6, "momentum": 0.9}}).plan == experiment.plan
    assert digests(made) == before


def test_add_refuses_any_other_change_in_one_line_and_writes_nothing(made, capsys):
    before = digests(made)
    for options, needle in [
        (["--seeds", "2", "--epochs", "2"], "base.epochs: 6 -> 2"),
        (["--seeds", "2", "--folds", "3"], "folds: 2 -> 3"),
        (["--seeds", "2", "-5"], "-5"),
        (["--losses", "dice", "nope"], "nope"),
        (["--losses", "dice", "dice "], "duplicate loss"),
    ]:
        one_error(*run_cli(run_args(made, "--add", *options), capsys)[::2], needle)
        assert digests(made) == before, options
    line = one_error(*run_cli(run_args(made, "--seeds", "1", "3"), capsys)[::2], "seeds: 1 -> 1 3")
    assert "--add adds seeds or losses" in line


def test_add_grows_by_canonical_losses_and_new_seeds_only(made, cache, phantom):
    before = digests(made)
    open_experiment(made, {"losses": [" ag_bce:hard_weight=4.0"], "seeds": [1]}, add=True)  # ag_bce's default w
    assert digests(made) == before  # already there: nothing added, nothing written
    experiment = open_experiment(made, {"losses": ["dice:smooth=1, batch=true"], "seeds": [1, 7]}, add=True)
    assert experiment.plan.losses == ["focal", "ag_bce", "dice:batch=true,smooth=1"]
    assert experiment.plan.seeds == [1, 7]
    assert len(experiment.cells) == 3 * 2 * 2
    assert [c.id for c in experiment.cells] == [c.id for c in load_experiment(made).cells]
    assert experiment.cells[4].id.startswith("dice-batch=true-smooth=1-") and experiment.cells[4].seed == 1
    assert digests(made)["splits.json"] == before["splits.json"]


@pytest.mark.parametrize(
    "losses, seeds, needle",
    [
        (["focal"], [1, -5], "-5"),
        (["focal"], [1, 2**32], "4294967296"),
        (["dice", "dice "], [1], "duplicate loss(es) in the plan: dice"),
        (["dice:smooth=1,batch=true", "dice:batch=true, smooth=1"], [1], "are one loss"),
        (["ag_bce:w=4", "ag_bce"], [1], "duplicate loss"),
    ],
)
def test_a_new_plan_is_refused_whole_before_anything_is_created(cache, phantom, tmp_path, losses, seeds, needle):
    out = tmp_path / "exp"
    with pytest.raises(MicrosegError) as refused:
        open_experiment(out, plan(cache, phantom, losses=losses, seeds=seeds))
    assert needle in str(refused.value)
    assert not out.exists()


def test_bad_plan_file_types_are_one_line_naming_the_field(cache, phantom, tmp_path, capsys):
    import yaml

    out = tmp_path / "exp"
    for field, value, needle in [
        ("cache", [str(cache)], "cache"),
        ("data", True, "data"),
        ("losses", None, "losses"),
        ("losses", [{"focal": 1}], "losses"),
        ("seeds", ["one"], "seeds"),
        ("folds", "x", "folds"),
        ("protocol", 3, "protocol"),
        ("base", {"epochs": "many"}, "epochs"),
        ("base", {"device": "cpu"}, "device"),
    ]:
        values = plan(cache, phantom)
        values[field] = value
        file = tmp_path / "plan.yaml"
        file.write_text(yaml.safe_dump(values))
        one_error(*run_cli(["experiment", "run", file, "--out", out], capsys)[::2], needle)
        assert not out.exists(), field


def test_an_invalid_device_is_refused_before_anything_is_written(made, cache, phantom, tmp_path, capsys):
    out = tmp_path / "new"
    args = ["--losses", "focal", "--cache", cache, "--data", phantom, "--model", "tiny"]
    for device in ("banana", "cuda:x", "meta"):
        one_error(*run_cli(run_args(out, *args, "--device", device), capsys)[::2], device)
        assert not out.exists()
    before = digests(made)
    one_error(*run_cli(run_args(made, "--add", "--seeds", "5", "--device", "banana"), capsys)[::2], "--device")
    assert digests(made) == before


def test_a_folder_holding_only_the_experiment_lock_is_a_new_experiment(cache, phantom, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / ".lock").write_text("123\n")
    experiment = open_experiment(out, plan(cache, phantom))
    assert sorted(tree(out)) == [".lock", "experiment.json", "splits.json"]
    assert [c.id for c in experiment.cells] == ["focal__s1", "ag_bce__s1"]


# ---------------------------------------------------------------- cell ids


def test_cell_ids_derive_from_the_canonical_spec_and_never_collide(cache, phantom, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = open_experiment(a, plan(cache, phantom, losses=["dice:smooth=1,batch=true", "focal"]))
    second = open_experiment(b, plan(cache, phantom, losses=["focal", "dice:batch=true, smooth=1.0"]))
    assert {c.id for c in first.cells} == {c.id for c in second.cells}  # the same spec: the same id anywhere
    assert json.loads((a / "experiment.json").read_text())["plan"]["losses"] == ["dice:batch=true,smooth=1", "focal"]
    long = canonical_spec("+".join(f"{w}*dice:smooth={w / 100}" for w in range(1, 30)))  # 500 characters
    specs = ["dice", "dice:batch=true", "dice:smooth=1", "2*dice", "0.5*dice+focal", "focal+0.25*dice", long]
    ids = [cell_id(spec, 1, 0) for spec in specs]
    assert len(set(ids)) == len(specs) and ids[0] == "dice__s1__f0"
    assert all(
        len(i) <= 64 and i.replace("_", "").replace("-", "").replace("=", "").replace(".", "").isalnum() for i in ids
    )
    assert cell_id(long, 1, 0) != cell_id(long + "+iou", 1, 0) and cell_id(long, 1, 0) == ids[-1]
    experiment = open_experiment(tmp_path / "long", plan(cache, phantom, losses=[long]))
    assert experiment.cells[0].run.name == ids[-1].removesuffix("__f0")


def test_comparing_two_spellings_of_one_loss_is_refused_as_one_cell(cache, phantom, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    open_experiment(a, plan(cache, phantom, losses=["dice:smooth=1,batch=true"]))
    open_experiment(b, plan(cache, phantom, losses=["dice:smooth=1, batch=true"]))
    one_error(*run_cli(["compare", a, b, "--out", tmp_path / "report"], capsys)[::2], "is a cell of both")


def test_a_plan_whose_cell_names_the_file_system_cannot_hold_is_refused_before_any_write(
    cache, phantom, tmp_path, monkeypatch
):
    real = os.pathconf
    out = tmp_path / "exp"
    monkeypatch.setattr(os, "pathconf", lambda p, name: 12 if name == "PC_NAME_MAX" else real(p, name))
    with pytest.raises(MicrosegError, match="longer than the 12 bytes"):
        open_experiment(out, plan(cache, phantom, losses=["adaptive_focal"]))
    assert not out.exists()
    monkeypatch.setattr(os, "pathconf", real)
    room = os.pathconf(tmp_path, "PC_PATH_MAX") - 100 - len(str(tmp_path))  # experiment.json fits, its cells do not
    deep = tmp_path.joinpath(*["d" * 199] * (room // 200), "d" * (room % 200 or 1))
    with pytest.raises(MicrosegError, match="choose a shorter --out"):
        open_experiment(deep, plan(cache, phantom))


# ---------------------------------------------------------------- experiment.json read back


BAD_RECORDS = [
    ("plan.cache", lambda r: r["plan"].update(cache=["a.h5"])),
    ("plan.data", lambda r: r["plan"].update(data=True)),
    ("plan.losses", lambda r: r["plan"].update(losses=None)),
    ("plan.seeds", lambda r: r["plan"].update(seeds=["1"])),
    ("plan.folds", lambda r: r["plan"].update(folds="2")),
    ("plan.base", lambda r: r["plan"]["base"].update(epochs="6")),
    ("cells", lambda r: r.update(cells={"a": 1})),
    ("cells[1].fold", lambda r: r["cells"][1].update(fold="x")),
    ("cells[2].seed", lambda r: r["cells"][2].update(seed=True)),
    ("cells[0].id", lambda r: r["cells"][0].update(id="../../escaped", run="runs/../../escaped")),
    ("cells[0].id", lambda r: r["cells"][0].update(id="/tmp/escaped")),
    ("cells[0].run", lambda r: r["cells"][0].update(run="../elsewhere/runs/x")),
    ("cache_identity", lambda r: r.update(cache_identity=[1, 2])),
    ("version", lambda r: r.update(version="2")),
]


@pytest.mark.parametrize("field, damage", BAD_RECORDS, ids=[f for f, _ in BAD_RECORDS])
def test_a_damaged_experiment_json_is_one_line_naming_file_and_field_everywhere(made, tmp_path, capsys, field, damage):
    record = json.loads((made / "experiment.json").read_text())
    damage(record)
    (made / "experiment.json").write_text(json.dumps(record))
    around = tree(tmp_path)
    commands = [
        ["experiment", "run", "--out", made],
        ["experiment", "status", made],
        ["experiment", "cell", made, record["cells"][0]["id"] if isinstance(record["cells"], list) else "x"],
        ["compare", made, "--out", tmp_path / "report"],
    ]
    for command in commands:
        one_error(*run_cli(command, capsys)[::2], str(made / "experiment.json"), field.split(".")[-1].split("[")[0])
    assert unlocked(tree(tmp_path)) == unlocked(around)  # nothing written, inside or outside the experiment


def unlocked(paths: list[str]) -> list[str]:
    """Paths but the experiment's lock, which `experiment run` takes before it reads the record."""
    return [p for p in paths if Path(p).name != ".lock"]


def test_a_run_folder_that_leaves_the_experiment_by_a_link_is_refused(made, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (made / "runs").symlink_to(elsewhere)
    for command in (["experiment", "status", made], ["experiment", "run", "--out", made]):
        one_error(*run_cli(command, capsys)[::2], "outside the experiment folder")
    assert tree(elsewhere) == []


# ---------------------------------------------------------------- the cache pinned


@pytest.fixture
def other_cache(phantom, tmp_path_factory) -> Path:
    from microseg.data.prepare import prepare_cache

    return prepare_cache(phantom, tmp_path_factory.mktemp("other") / "cache.h5", size=16)


def test_an_experiment_is_pinned_to_its_cache(cache, other_cache, phantom, tmp_path, capsys):
    own = tmp_path / "cache.h5"
    shutil.copy(cache, own)
    out = tmp_path / "exp"
    experiment = open_experiment(out, plan(own, phantom))
    stored = json.loads((out / "experiment.json").read_text())["cache_identity"]
    assert (stored["size"], stored["slices"]) == (32, 18)  # the phantom: 3 training patients x 6 slices
    shutil.copy(other_cache, own)  # prepared again at another size
    before = digests(out)
    found = "found fingerprint"
    one_error(
        *run_cli(run_args(out), capsys)[::2], f"recorded fingerprint {stored['fingerprint'][:12]}", found, "16 px"
    )
    one_error(*run_cli(run_args(out, "--add", "--seeds", "9"), capsys)[::2], "32 px", "16 px")
    one_error(*run_cli(["experiment", "cell", out, experiment.cells[0].id], capsys)[::2], "32 px", "16 px")
    assert not experiment.cells[0].run.exists()
    assert digests(out) == {**before, **{k: v for k, v in digests(out).items() if k.startswith("logs/")}}
    shutil.copy(cache, own)  # its own cache back: accepted again
    assert open_experiment(out, {}).cache == experiment.cache


def test_a_version_1_record_is_read_and_the_next_run_records_its_cache(made, capsys):
    record = json.loads((made / "experiment.json").read_text())
    identity = record.pop("cache_identity")
    record["version"] = 1
    record["plan"]["losses"][1] = "ag_bce: w=4"  # format 1 kept specs as written (4 is ag_bce's default w)
    for cell in record["cells"]:
        cell["loss"] = "ag_bce: w=4" if cell["loss"] == "ag_bce" else cell["loss"]
    (made / "experiment.json").write_text(json.dumps(record))
    code, out, err = run_cli(["experiment", "status", made], capsys)
    assert code == 0 and "2 fold(s) = 4 cell(s)" in out, err
    experiment = open_experiment(made, {"losses": ["ag_bce", "focal"]})  # the same losses, spelled anew
    assert "had recorded no cache identity" in capsys.readouterr().out
    again = json.loads((made / "experiment.json").read_text())
    assert again["version"] == 2 and again["cache_identity"] == identity and again["cells"] == record["cells"]
    assert vars(experiment.cache) == identity


def test_given_plan_takes_options_over_the_file_field_by_field(tmp_path):
    import yaml

    file = tmp_path / "plan.yaml"
    file.write_text(yaml.safe_dump({"losses": ["focal"], "seeds": [1], "base": {"model": "tiny", "epochs": 3}}))
    options = {"losses": None, "seeds": [4], "epochs": 5, "batch_size": None, "device": "cpu", "out": "x"}
    assert given_plan(file, options) == {"losses": ["focal"], "seeds": [4], "base": {"model": "tiny", "epochs": 5}}


def test_two_losses_whose_cell_ids_would_agree_are_refused_before_any_write(cache, phantom, tmp_path, monkeypatch):
    import microseg.experiments.experiment

    monkeypatch.setattr(microseg.experiments.experiment, "cell_id", lambda loss, seed, fold: f"same__s{seed}")
    with pytest.raises(MicrosegError, match="would share the cell id same__s1"):
        open_experiment(tmp_path / "exp", plan(cache, phantom))
    assert not (tmp_path / "exp").exists()
