"""An experiment: losses x seeds x folds as one plan, its patient splits and its cells.

A plan names the losses (loss specs), the training seeds, the folds (k-fold cross-validation of
the training patients, k >= 2, or 0: the fixed train/test split), the slice cache and dataset
folder, the evaluation protocol, and `base`: any train option shared by every cell. Each cell
(loss, seed, fold) is an ordinary run folder. On disk, EXP holds

- `experiment.json`: {"version": 1, "plan": {...}, "cells": [{"id", "loss", "seed", "fold", "run"}]},
  written first (atomically) and rewritten only when seeds or losses are added (`run` is
  relative to EXP; cell ids are file-system safe and unique: never parse them);
- `splits.json`: {"folds": [[patients of fold 0], ...] (empty when folds = 0), "test": [ids]}: fold
  i's patients are the held-out ones of the cells of fold i, which train on the other folds;
- `runs/<id>/`: the cell's run folder (config.yaml, history.csv, last.pt, best.pt, metrics/ = the
  test split's evaluation; with folds, heldout/ = the evaluation on the fold's held-out patients);
- `logs/<id>.log`: the cell's own output; its last line says when a cell failed or was interrupted;
- `oof/per_patient.csv` (folds only): per loss and seed, every training patient exactly once.

Folds (as nnU-Net's splits_final.json: Isensee et al., "nnU-Net: a self-configuring method for
deep learning-based biomedical image segmentation", 2021): the sorted training patients are
permuted with a fixed seed and dealt round-robin, so folds differ in size by at most one, are
disjoint and cover every training patient, and the same cache always gives the same folds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from microseg.atomic import write_text
from microseg.config import TrainConfig, resolve_train_config
from microseg.errors import MicrosegError

VERSION = 1
PLAN_FIELDS = ("losses", "seeds", "folds", "cache", "data", "protocol", "base")
SET_BY_EXPERIMENT = ("run", "loss", "seed", "cache", "patients", "val_patients", "device")
"""Train options each cell gets from the experiment (the device: from the executor), never from `base`."""
SPLIT_SEED = 0
"""The permutation seed of the folds: fixed, so a cache always gives the same folds."""


@dataclass
class Plan:
    losses: list[str]
    seeds: list[int]
    folds: int
    cache: str
    data: str
    protocol: str = "microsegnet"
    base: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PLAN_FIELDS}


@dataclass(frozen=True)
class Cell:
    """One (loss, seed, fold) of an experiment; `run` is its run folder (EXP/runs/<id>)."""

    id: str
    loss: str
    seed: int
    fold: int | None
    run: Path

    def to_dict(self, root: Path) -> dict[str, Any]:
        return {
            "id": self.id,
            "loss": self.loss,
            "seed": self.seed,
            "fold": self.fold,
            "run": self.run.relative_to(root).as_posix(),
        }


@dataclass(frozen=True)
class Splits:
    folds: list[list[str]]
    test: list[str]

    def training(self, fold: int | None) -> tuple[list[str], list[str]]:
        """(training patients, held-out patients) of a cell of `fold` (None: the fixed split, all, none)."""
        if fold is None:
            return [], []
        train = sorted(p for i, patients in enumerate(self.folds) if i != fold for p in patients)
        return train, list(self.folds[fold])


@dataclass
class Experiment:
    path: Path
    plan: Plan
    cells: list[Cell]

    @property
    def plan_file(self) -> Path:
        return self.path / "experiment.json"

    @property
    def splits_file(self) -> Path:
        return self.path / "splits.json"

    @property
    def oof_file(self) -> Path:
        return self.path / "oof" / "per_patient.csv"

    def log(self, cell: Cell) -> Path:
        return self.path / "logs" / f"{cell.id}.log"

    def cell(self, cell_id: str) -> Cell:
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        raise MicrosegError(f"{self.plan_file} has no cell {cell_id!r}")

    def splits(self) -> Splits:
        try:
            values = json.loads(self.splits_file.read_text())
            return Splits([list(map(str, f)) for f in values["folds"]], list(map(str, values["test"])))
        except FileNotFoundError:
            raise MicrosegError(f"{self.splits_file} is missing: not a complete experiment") from None
        except (ValueError, KeyError, TypeError):
            raise MicrosegError(f"{self.splits_file} is not an experiment's splits file") from None

    def cell_config(self, cell: Cell) -> TrainConfig:
        """The train config of a cell: the plan's base, its loss and seed, its fold's patients."""
        train, held_out = self.splits().training(cell.fold)
        return resolve_train_config(
            None,
            {
                **self.plan.base,
                "cache": self.plan.cache,
                "run": str(cell.run),
                "loss": cell.loss,
                "seed": cell.seed,
                "patients": train,
                "val_patients": held_out,
            },
        )

    def write(self) -> None:
        record = {
            "version": VERSION,
            "plan": self.plan.to_dict(),
            "cells": [cell.to_dict(self.path) for cell in self.cells],
        }
        write_text(self.plan_file, json.dumps(record, indent=1) + "\n")


def load_experiment(path: str | Path) -> Experiment:
    """Read EXP/experiment.json; MicrosegError when it is missing or not an experiment of this version."""
    path = Path(path)
    file = path / "experiment.json"
    if not file.is_file():
        raise MicrosegError(f"{path} is not an experiment: {file.name} is missing")
    try:
        record = json.loads(file.read_text())
        if record.get("version") != VERSION:
            raise MicrosegError(f"{file}: experiment format {record.get('version')!r}, expected {VERSION}")
        plan = Plan(**{name: record["plan"][name] for name in PLAN_FIELDS})
        cells = [
            Cell(c["id"], c["loss"], int(c["seed"]), None if c["fold"] is None else int(c["fold"]), path / c["run"])
            for c in record["cells"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MicrosegError(f"{file} is not a readable experiment file") from None
    inside = path.resolve()
    for cell in cells:  # a hand-edited or foreign file must not point the commands outside the experiment
        if not cell.run.resolve().is_relative_to(inside):
            raise MicrosegError(f"{file}: cell {cell.id}'s run {cell.run} is outside the experiment folder")
    return Experiment(path, plan, cells)


def read_plan_file(path: str | Path | None) -> dict[str, Any]:
    """The fields of a plan YAML (nothing when no file is given); refuses unknown fields."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise MicrosegError(f"plan file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise MicrosegError(f"{path} is not a readable plan (YAML)") from None
    if not isinstance(values, dict):
        raise MicrosegError(f"{path} must hold a mapping of plan field: value")
    unknown = sorted(set(values) - set(PLAN_FIELDS), key=str)
    if unknown:
        raise MicrosegError(
            f"{path}: unknown plan field(s) {', '.join(map(str, unknown))}; valid: "
            f"{', '.join(PLAN_FIELDS)} (train options go under base:)"
        )
    if not isinstance(values.get("base", {}), dict):
        raise MicrosegError(f"{path}: base must be a mapping of train option: value")
    return values


def resolve_plan(values: dict[str, Any]) -> Plan:
    """A checked plan from its fields (plan file, then options); every refusal names the field."""
    from microseg.losses import check_spec
    from microseg.metrics import check_protocol

    losses = _as_list(values.get("losses"), "losses")
    if not losses:
        raise MicrosegError("the plan names no loss: give losses (e.g. --losses adaptive_focal ag_bce)")
    losses = [str(loss) for loss in losses]
    _no_duplicates("loss", losses)
    for loss in losses:
        check_spec(loss)
    seeds = [_integer("seeds", s) for s in _as_list(values.get("seeds", [1234]), "seeds")]
    if not seeds:
        raise MicrosegError("the plan names no seed: give seeds (e.g. --seeds 1 2 3)")
    _no_duplicates("seed", seeds)
    folds = _integer("folds", values.get("folds", 0))
    if folds < 0 or folds == 1:
        raise MicrosegError(
            f"folds must be 0 (the fixed train/test split) or at least 2, got {folds}"
            + (": one fold would leave no patient to train on" if folds == 1 else "")
        )
    for name in ("cache", "data"):
        if not values.get(name):
            raise MicrosegError(f"the plan needs {name}: give --{name} (or {name}: in the plan file)")
    protocol = str(values.get("protocol", "microsegnet"))
    check_protocol(protocol)
    base = dict(values.get("base") or {})
    for name in SET_BY_EXPERIMENT:
        if name in base:
            raise MicrosegError(
                f"base option {name} is set by the experiment for each cell "
                f"({'give losses / seeds' if name in ('loss', 'seed') else 'leave it out'})"
            )
    cache, data = str(Path(values["cache"]).resolve()), str(Path(values["data"]).resolve())
    for loss in losses:  # every option of base, once per loss (its spec and the options together)
        config = resolve_train_config(None, {**base, "cache": cache, "run": "cell", "loss": loss, "seed": seeds[0]})
    if folds and config.val_fraction > 0:
        raise MicrosegError("base val_fraction must be 0 with folds: each cell validates on its held-out fold")
    plan = Plan(losses, seeds, folds, cache, data, protocol, {key: getattr(config, key) for key in base})
    _check_sources(plan, config)
    return plan


def _check_sources(plan: Plan, config: TrainConfig) -> None:
    """The cache (and weights) a cell would train from, the dataset's test split, and folds <= patients."""
    from microseg.config import check_train_inputs
    from microseg.data.cache import read_cache_info
    from microseg.data.layout import find_cases

    check_train_inputs(config, resume=False)
    patients = read_cache_info(plan.cache).case_ids
    if plan.folds > len(patients):
        raise MicrosegError(
            f"folds {plan.folds} is more than the {len(patients)} training patients of "
            f"{plan.cache}: every fold needs a patient"
        )
    find_cases(Path(plan.data), "test", require_non_expert=False)


def make_splits(plan: Plan) -> Splits:
    """The plan's folds of the cache's training patients and the cache's test patients."""
    from microseg.data.cache import read_cache_info

    info = read_cache_info(plan.cache)
    return Splits(kfold(info.case_ids, plan.folds), sorted(info.test_cases))


def kfold(patients: list[str], k: int, seed: int = SPLIT_SEED) -> list[list[str]]:
    """k disjoint folds covering `patients` (k = 0: none): a seeded permutation dealt round-robin."""
    if k == 0:
        return []
    ordered = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [sorted(ordered[i] for i in order[f::k]) for f in range(k)]


def make_cells(root: Path, plan: Plan, existing: Sequence[Cell] = ()) -> list[Cell]:
    """The plan's cells, seed by seed then loss by loss then fold by fold; `existing` ones first, kept as they are."""
    cells = list(existing)
    known = {(c.loss, c.seed, c.fold) for c in cells}
    ids = {c.id for c in cells}
    for seed in plan.seeds:
        for loss in plan.losses:
            for fold in range(plan.folds) if plan.folds else [None]:
                if (loss, seed, fold) in known:
                    continue
                cell_id = _cell_id(loss, seed, fold, ids)
                ids.add(cell_id)
                cells.append(Cell(cell_id, loss, seed, fold, root / "runs" / cell_id))
    return cells


def _cell_id(loss: str, seed: int, fold: int | None, taken: set[str]) -> str:
    """A file-system safe, unique folder name: the loss spec's slug, `__s<seed>`, `__f<fold>`."""
    slug = re.sub(r"_{2,}", "_", re.sub(r"[^A-Za-z0-9._=+-]+", "-", loss.replace("*", "x"))).strip("-._") or "loss"
    base = f"{slug}__s{seed}" + ("" if fold is None else f"__f{fold}")
    cell_id, n = base, 2
    while cell_id in taken:
        cell_id, n = f"{slug}-{n}__s{seed}" + ("" if fold is None else f"__f{fold}"), n + 1
    return cell_id


def plan_difference(stored: Plan, given: Plan) -> str | None:
    """The first field where `given` differs from `stored` ('base.epochs: 6 -> 10'), or None."""
    old, new = stored.to_dict(), given.to_dict()
    for name in PLAN_FIELDS:
        if name == "base":
            for key in sorted(set(old["base"]) | set(new["base"])):
                if old["base"].get(key) != new["base"].get(key):
                    return f"base.{key}: {old['base'].get(key)!r} -> {new['base'].get(key)!r}"
        elif old[name] != new[name]:
            return f"{name}: {old[name]!r} -> {new[name]!r}"
    return None


def open_experiment(out: str | Path, plan_values: dict[str, Any], add: bool = False) -> Experiment:
    """The experiment at `out`: a new one (experiment.json and splits.json written first), or the
    existing one when the given plan is its plan; with `add` the given seeds and losses join it
    (experiment.json rewritten with the new cells after the old ones).

    Nothing is created before the plan has been checked. A folder that holds files but no
    experiment, or an experiment of another plan, is refused naming the first differing field.
    """
    out = Path(out)
    for name, what in (("losses", "loss"), ("seeds", "seed")):
        _no_duplicates(what, _as_list(plan_values.get(name), name))
    if not (out / "experiment.json").is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise MicrosegError(
                f"--out {out} is not empty and holds no experiment.json (another plan's runs or "
                "other files): choose a new folder"
            )
        plan = resolve_plan(plan_values)
        experiment = Experiment(out, plan, make_cells(out, plan))
        splits = make_splits(plan)
        experiment.write()
        write_text(experiment.splits_file, json.dumps({"folds": splits.folds, "test": splits.test}, indent=1) + "\n")
        return experiment
    experiment = load_experiment(out)
    stored = experiment.plan
    values = {**stored.to_dict(), **plan_values}
    if add:
        losses = [str(x) for x in _as_list(values["losses"], "losses")]
        seeds = [_integer("seeds", s) for s in _as_list(values["seeds"], "seeds")]
        values["losses"] = stored.losses + [x for x in losses if x not in stored.losses]
        values["seeds"] = stored.seeds + [s for s in seeds if s not in stored.seeds]
    given = resolve_plan(values)
    difference = plan_difference(stored, given)
    if difference is not None and not (add and difference.split(":")[0] in ("losses", "seeds")):
        hint = "; --add adds seeds or losses" if difference.split(":")[0] in ("losses", "seeds") else ""
        raise MicrosegError(
            f"{out} holds an experiment of another plan ({difference}){hint}; choose another --out for a new plan"
        )
    if add and plan_difference(stored, given) is not None:
        experiment.plan, experiment.cells = given, make_cells(out, given, experiment.cells)
        experiment.write()
    return experiment


def _as_list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [value]
    raise MicrosegError(f"{name} must be a list, got {value!r}")


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise MicrosegError(f"{name} must be integers, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MicrosegError(f"{name} must be integers, got {value!r}") from None
    if not number.is_integer():
        raise MicrosegError(f"{name} must be integers, got {value!r}")
    return int(number)


def _no_duplicates(what: str, values: list) -> None:
    seen, repeated = set(), []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    if repeated:
        raise MicrosegError(f"duplicate {what}(s) in the plan: {', '.join(map(str, repeated))}")
