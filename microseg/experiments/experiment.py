"""An experiment: losses x seeds x folds as one plan (`microseg.experiments.plan`), its patient splits
and its cells. Each cell (loss, seed, fold) is an ordinary run folder. On disk, EXP holds

- `experiment.json`: {"version": 2, "plan": {...}, "cache_identity": {"fingerprint", "size", "slices"},
  "cells": [{"id", "loss", "seed", "fold", "run"}]}, written (atomically) only after the whole plan
  was checked, and rewritten only when seeds or losses are added; `run` is `runs/<id>`, relative to
  EXP. `load_experiment`, its one reader, checks every field's type and value, and that every path
  built from a cell id (runs/<id>, logs/<id>.log) stays inside EXP, symbolic links followed;
- `splits.json`: {"folds": [[patients of fold 0], ...] (empty when folds = 0), "test": [ids]}: fold
  i's patients are the held-out ones of the cells of fold i, which train on the other folds;
- `runs/<id>/`: the cell's run folder (config.yaml, history.csv, last.pt, best.pt, metrics/ = the
  test split's evaluation; with folds, heldout/ = the evaluation on the fold's held-out patients);
- `logs/<id>.log`: the cell's own output; its last line says when a cell failed or was interrupted;
- `oof/per_patient.csv` (folds only): per loss and seed, every training patient exactly once.

A cell id derives from its canonical loss spec, seed and fold (`cell_id`): the same cell has the
same id everywhere, two cells never share one, and it is one file name the file system under
EXP can hold (checked before anything is written). Never parse ids.

The cache is pinned: experiment.json records its identity (`CacheIdentity`) at creation, and a
rerun, an `--add` or a cell (`experiment cell`) against a cache of another identity is refused,
naming both. A version 1 record (before the pin) is read as it is; the next `experiment run`
records the cache's present identity, saying so, since what the earlier cells trained on is unknown.

Folds (as nnU-Net's splits_final.json: Isensee et al., "nnU-Net: a self-configuring method for
deep learning-based biomedical image segmentation", 2021): the sorted training patients are
permuted with a fixed seed and dealt round-robin, so folds differ in size by at most one, are
disjoint and cover every training patient, and the same cache always gives the same folds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from microseg.core.atomic import write_text
from microseg.core.errors import MicrosegError
from microseg.experiments.plan import PLAN_FIELDS, SET_BY_EXPERIMENT, Plan, check_plan, continued_plan, resolve_plan
from microseg.runs.config import TrainConfig, resolve_train_config

__all__ = ["PLAN_FIELDS", "SET_BY_EXPERIMENT", "Plan"]  # the plan's names, for the modules that read experiments

VERSION = 2
"""2: the cache's identity recorded, loss specs canonical, cell ids from them. Version 1 files are read too."""
SPLIT_SEED = 0
"""The permutation seed of the folds: fixed, so a cache always gives the same folds."""
CELL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")
"""What a cell id may be: one file-name component, no path, nothing hidden."""
READABLE_SLUG = re.compile(r"[A-Za-z0-9]\w{0,39}")
"""A canonical loss spec used as it is in a cell id: a bare loss name of at most 40 characters."""
RUN_FILES_RESERVE = 192
"""Characters kept for the paths a cell writes below its run folder (heldout/, an atomic write's temporary)."""


@dataclass(frozen=True)
class CacheIdentity:
    """What identifies a slice cache's content: its own fingerprint (sha256 of its format, size and every
    source file's path, byte size and mtime: `microseg.data.cache.fingerprint`), with its size and slice
    count to name it. A cache prepared again at another size or from other files has another one."""

    fingerprint: str
    size: int
    slices: int

    def describe(self) -> str:
        return f"fingerprint {self.fingerprint[:12]}, {self.size} px, {self.slices} slices"


def cache_identity(path: str | Path) -> CacheIdentity:
    """The identity of the cache at `path` (read from its header; MicrosegError when it is not a cache)."""
    from microseg.data.cache import cached_fingerprint, read_cache_info

    info = read_cache_info(path)
    return CacheIdentity(str(cached_fingerprint(Path(path))), info.size, info.n_slices)


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
    cache: CacheIdentity | None = None  # None: a version 1 record, which did not record it

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
            folds, test = values["folds"], values["test"]
            if not (isinstance(folds, list) and isinstance(test, list) and all(isinstance(f, list) for f in folds)):
                raise TypeError
            splits = Splits([list(map(str, f)) for f in folds], list(map(str, test)))
        except FileNotFoundError:
            raise MicrosegError(f"{self.splits_file} is missing: not a complete experiment") from None
        except (ValueError, KeyError, TypeError):
            raise MicrosegError(f"{self.splits_file} is not an experiment's splits file") from None
        if len(splits.folds) != self.plan.folds:
            raise MicrosegError(
                f"{self.splits_file} holds {len(splits.folds)} folds, {self.plan_file} {self.plan.folds}: "
                "the two files are of different plans"
            )
        return splits

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

    def check_cache(self, found: CacheIdentity | None = None) -> None:
        """Refuse the plan's cache when it is not the one the experiment recorded (stored and found named)."""
        found = found or cache_identity(self.plan.cache)
        if self.cache is not None and found != self.cache:
            raise MicrosegError(
                f"cache {self.plan.cache} is not the cache experiment {self.path} was made with: recorded "
                f"{self.cache.describe()}; found {found.describe()} (prepared again since?): its cells would "
                "not be comparable; give the experiment its cache back, or start a new one (another --out)"
            )

    def write(self) -> None:
        record = {
            "version": VERSION,
            "plan": self.plan.to_dict(),
            "cache_identity": None if self.cache is None else vars(self.cache),
            "cells": [cell.to_dict(self.path) for cell in self.cells],
        }
        write_text(self.plan_file, json.dumps(record, indent=1) + "\n")


def load_experiment(path: str | Path) -> Experiment:
    """Read EXP/experiment.json, every field checked (types and values): MicrosegError naming the file and the
    field when it is missing, of another version, or holds what this microseg does not write (a cell id that is
    not one file name, a run that is not runs/<id>, a path that leaves EXP)."""
    path = Path(path)
    file = path / "experiment.json"
    if not file.is_file():
        raise MicrosegError(f"{path} is not an experiment: {file.name} is missing")
    try:
        record = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise MicrosegError(f"{file} is not a readable experiment file (JSON)") from None
    try:
        return _experiment_from(record, path)
    except MicrosegError as err:
        raise MicrosegError(f"{file} is not a readable experiment file: {err}") from None


def _experiment_from(record: Any, path: Path) -> Experiment:
    if not isinstance(record, dict):
        raise MicrosegError("not an experiment record (a JSON object with version, plan, cells)")
    version = record.get("version")
    if version not in (1, VERSION) or isinstance(version, bool):
        raise MicrosegError(f"version {version!r}: this microseg reads experiment formats 1 and {VERSION}")
    plan_values = record.get("plan")
    if not isinstance(plan_values, dict):
        raise MicrosegError(f"plan must be a mapping of plan field: value, got {plan_values!r}")
    required = [f.name for f in fields(Plan) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in plan_values]
    unknown = sorted(set(plan_values) - set(PLAN_FIELDS), key=str)
    if missing or unknown:
        raise MicrosegError(f"plan {'lacks ' + ', '.join(missing) if missing else 'has unknown ' + ', '.join(unknown)}")
    try:
        plan = check_plan(plan_values, strict=True)
    except MicrosegError as err:
        raise MicrosegError(f"plan: {err}") from None
    cache = _stored_identity(record.get("cache_identity")) if version > 1 else None
    cells = _stored_cells(record.get("cells"), plan, path)
    return Experiment(path, plan, cells, cache)


def _stored_identity(value: Any) -> CacheIdentity:
    names = ("fingerprint", "size", "slices")
    if not isinstance(value, dict) or set(value) != set(names):
        raise MicrosegError(f"cache_identity must be a mapping of {', '.join(names)}, got {value!r}")
    fingerprint, size, slices = (value[name] for name in names)
    if not (isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{64}", fingerprint)):
        raise MicrosegError(f"cache_identity.fingerprint must be 64 hex digits, got {fingerprint!r}")
    for name, number in (("size", size), ("slices", slices)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise MicrosegError(f"cache_identity.{name} must be a positive integer, got {number!r}")
    return CacheIdentity(fingerprint, size, slices)


def _stored_cells(values: Any, plan: Plan, path: Path) -> list[Cell]:
    """The record's cells, each checked against the plan; ids unique, one file name each, paths inside EXP."""
    if not isinstance(values, list):
        raise MicrosegError(f"cells must be a list, got {type(values).__name__}")
    cells = [_stored_cell(f"cells[{i}]", value, plan, path) for i, value in enumerate(values)]
    for what, keys in (("id", [c.id for c in cells]), ("cell", [(c.loss, c.seed, c.fold) for c in cells])):
        repeated = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
        if repeated is not None:
            raise MicrosegError(f"cells: {what} {repeated} is listed twice")
    for cell in cells:
        require_inside(path, cell)
    return cells


def _stored_cell(where: str, value: Any, plan: Plan, path: Path) -> Cell:
    """One cell of the record (`where`: its place in it), checked against the plan."""
    if not isinstance(value, dict) or set(value) != {"id", "loss", "seed", "fold", "run"}:
        raise MicrosegError(f"{where} must be a mapping of id, loss, seed, fold, run, got {value!r}")
    name, loss, seed, fold, run = (value[k] for k in ("id", "loss", "seed", "fold", "run"))
    if not (isinstance(name, str) and CELL_ID.fullmatch(name)):
        raise MicrosegError(f"{where}.id {name!r} is not a cell id (one file name: letters, digits, _.=+-)")
    if isinstance(run, str) and not _inside(path, path / run):
        raise MicrosegError(f"{where}.run {run} is outside the experiment folder")
    folds = f"an integer in 0..{plan.folds - 1}" if plan.folds else "null (the plan has no folds)"
    checks = [
        ("loss", loss in plan.losses, "one of the plan's losses"),
        ("seed", type(seed) is int and seed in plan.seeds, "one of the plan's seeds"),
        ("fold", type(fold) is int and 0 <= fold < plan.folds if plan.folds else fold is None, folds),
        ("run", run == f"runs/{name}", f"runs/{name}"),
    ]
    for field, ok, wanted in checks:
        if not ok:
            raise MicrosegError(f"{where}.{field} must be {wanted}, got {value[field]!r}")
    return Cell(name, loss, seed, fold, path / run)


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, symbolic links followed, is strictly inside `root`."""
    target, inside = path.resolve(), root.resolve()
    return target != inside and target.is_relative_to(inside)


def require_inside(root: Path, cell: Cell) -> None:
    """Refuse a cell whose run folder or log, symbolic links followed, is not inside the experiment folder."""
    for where in (cell.run, root / "logs" / f"{cell.id}.log"):
        if not _inside(root, where):
            raise MicrosegError(f"cell {cell.id}: {where} is outside the experiment folder ({where.resolve()})")


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


def cell_id(loss: str, seed: int, fold: int | None) -> str:
    """A cell's id and folder name, from its canonical loss spec: `<slug>__s<seed>[__f<fold>]`.

    The slug is the spec itself when it is a bare loss name (`focal__s1`), else its first characters
    made file-name safe, then `-` and 8 hex digits of the spec's sha256 (`ag_bce-hard_weight=2-3f9c01ab__s1`):
    the same spec gives the same id on every machine, a bare name never equals a hashed slug (which holds a
    `-`), and two specs share a hashed slug only if their hashes agree."""
    if READABLE_SLUG.fullmatch(loss):
        slug = loss
    else:
        prefix = re.sub(r"[^A-Za-z0-9_.=]+", "-", loss)[:24].strip("-._") or "loss"
        slug = f"{prefix}-{hashlib.sha256(loss.encode()).hexdigest()[:8]}"
    return f"{slug}__s{seed}" + ("" if fold is None else f"__f{fold}")


def make_cells(root: Path, plan: Plan, existing: Sequence[Cell] = ()) -> list[Cell]:
    """The plan's cells, seed by seed then loss by loss then fold by fold; `existing` ones first, kept as they are."""
    from microseg.losses import canonical_spec

    cells = list(existing)
    canonical = {loss: canonical_spec(loss) for loss in dict.fromkeys([*plan.losses, *(c.loss for c in cells)])}
    known = {(canonical[c.loss], c.seed, c.fold) for c in cells}
    taken = {c.id: c for c in cells}
    for seed in plan.seeds:
        for loss in plan.losses:
            for fold in range(plan.folds) if plan.folds else [None]:
                if (canonical[loss], seed, fold) in known:
                    continue
                name = cell_id(loss, seed, fold)
                if name in taken:  # two specs whose hashes agree in their first 8 hex digits
                    raise MicrosegError(
                        f"losses {taken[name].loss} and {loss} would share the cell id {name}: run one of them "
                        "in another experiment"
                    )
                cell = taken[name] = Cell(name, loss, seed, fold, root / "runs" / name)
                cells.append(cell)
    return cells


def check_cell_names(root: Path, cells: Sequence[Cell]) -> None:
    """Refuse cells the file system under `root` cannot hold: a run folder or log name longer than its
    NAME_MAX, or a run folder's path (and RUN_FILES_RESERVE for what goes in it) longer than its PATH_MAX."""
    root = Path(os.path.abspath(root))
    existing = next(p for p in (root, *root.parents) if p.is_dir())
    name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    for cell in cells:
        for name in (cell.id, f"{cell.id}.log"):
            if len(os.fsencode(name)) > name_max:
                raise MicrosegError(
                    f"loss {cell.loss}: its cell's file name {name} is longer than the {name_max} bytes "
                    f"the file system of {existing} allows"
                )
        longest = len(os.fsencode(root / "runs" / cell.id)) + RUN_FILES_RESERVE
        if longest >= path_max:
            raise MicrosegError(
                f"cell {cell.id}: its run folder's files would have paths of about {longest} bytes under "
                f"{root}, the file system allows {path_max - 1}: choose a shorter --out"
            )


def open_experiment(out: str | Path, given: dict[str, Any], add: bool = False) -> Experiment:
    """The experiment at `out`: a new one (splits.json and experiment.json written), or the existing one
    when the given plan is its plan; with `add` the given seeds and losses join it (experiment.json
    rewritten with the new cells after the old ones).

    Everything is checked before anything is written: the whole plan (`microseg.experiments.plan`), the
    cache against the one the experiment recorded, the cells' names against the file system. A folder
    that holds files but no experiment (its lock aside), or an experiment of another plan, is refused,
    the latter naming every differing field; a refusal changes no file.
    """
    out = Path(out)
    if not (out / "experiment.json").is_file():
        return _create(out, given)
    experiment = load_experiment(out)
    found = cache_identity(experiment.plan.cache)
    experiment.check_cache(found)
    plan = continued_plan(experiment.plan, given, add, out)
    cells = make_cells(out, plan, experiment.cells)
    check_cell_names(out, cells)
    if experiment.cache is None:
        print(
            f"experiment {out} (format 1) had recorded no cache identity: recorded the cache's present one "
            f"({found.describe()}); its cells trained before were not checked against it",
            flush=True,
        )
    if (plan, cells, experiment.cache) != (experiment.plan, experiment.cells, found):
        experiment.plan, experiment.cells, experiment.cache = plan, cells, found
        experiment.write()
    return experiment


def _create(out: Path, given: dict[str, Any]) -> Experiment:
    """A new experiment at `out` (absent, empty, or holding only the experiment's lock)."""
    from microseg.runs.folder import RunLock

    if out.exists() and (not out.is_dir() or any(p.name != RunLock.NAME for p in out.iterdir())):
        raise MicrosegError(
            f"--out {out} is not empty and holds no experiment.json (another plan's runs or "
            "other files): choose a new folder"
        )
    plan = resolve_plan(given)
    experiment = Experiment(out, plan, make_cells(out, plan), cache_identity(plan.cache))
    check_cell_names(out, experiment.cells)
    splits = make_splits(plan)
    write_text(experiment.splits_file, json.dumps({"folds": splits.folds, "test": splits.test}, indent=1) + "\n")
    try:
        experiment.write()
    except BaseException:
        experiment.splits_file.unlink(missing_ok=True)
        raise
    return experiment
