"""An experiment's plan: its fields given by a plan file and the command line, checked whole, and
compared with the plan an experiment already holds.

A plan names the losses (loss specs), the training seeds, the folds (k-fold cross-validation of
the training patients, k >= 2, or 0: the fixed train/test split), the slice cache and dataset
folder, the evaluation protocol, `base`: any train option shared by every cell, and `primary`: the
metric the experiment report's verdict rests on (dsc, the default, or hd95_mm; a stored plan from
before it has none and means dsc). Fixed before anything trains, like the other fields: a rerun
that names another primary metric is refused, as choosing it after the results would bias the verdict.

- Given: the plan file's fields, each replaced by its command-line option when that is given; a
  train option given on the command line sets that one base option, over the file's.
- Checked whole before anything is written (`check_plan`): every loss spec (parsed once into a
  `microseg.losses.LossSpec`, checked as deep supervision checks it), every seed (train's seed
  range), the folds, cache and data (text), the protocol, every base option and its type. Loss
  specs are held in their canonical spelling (`LossSpec.canonical`): two spellings of one loss are
  one loss, and the plan refuses them as a duplicate.
- Continued (`continued_plan`): a rerun's given fields override the stored plan field by field,
  and base option by option, so an option not given keeps its stored value. Every field whose
  value then differs is named in one refusal (`base.epochs: 6 -> 2; folds: 2 -> 3`); base options
  are compared by the value the cells would train with (an option given at its default is no
  change). With `--add` the given losses and seeds join the stored ones; any other difference
  is still refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from microseg.core.errors import MicrosegError
from microseg.core.rules import check_value
from microseg.core.yaml_mapping import read_yaml_mapping
from microseg.runs.config import RULES, TrainConfig, resolve_train_config

PLAN_FIELDS = ("losses", "seeds", "folds", "cache", "data", "protocol", "base", "primary")
SET_BY_EXPERIMENT = ("run", "loss", "seed", "cache", "patients", "val_patients", "device")
"""Train options each cell gets from the experiment (the device: from the executor), never from `base`."""
GROWN_BY_ADD = ("losses", "seeds")
"""The fields `--add` extends; every other field of a continued plan must stay as it was."""


@dataclass
class Plan:
    losses: list[str]
    seeds: list[int]
    folds: int
    cache: str
    data: str
    protocol: str = "microsegnet"
    base: dict[str, Any] = field(default_factory=dict)
    primary: str = "dsc"

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PLAN_FIELDS}


def read_plan_file(path: str | Path | None) -> dict[str, Any]:
    """The fields of a plan YAML (nothing when no file is given); refuses unknown fields."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise MicrosegError(f"plan file not found: {path}")
    values = read_yaml_mapping(path, "plan field: value")
    unknown = sorted(set(values) - set(PLAN_FIELDS), key=str)
    if unknown:
        raise MicrosegError(
            f"{path}: unknown plan field(s) {', '.join(map(str, unknown))}; valid: "
            f"{', '.join(PLAN_FIELDS)} (train options go under base:)"
        )
    if not isinstance(values.get("base", {}), dict):
        raise MicrosegError(f"{path}: base must be a mapping of train option: value")
    return values


def given_plan(path: str | Path | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The plan fields given: the plan file's, each replaced by the option of the same name that is given
    (not None); the train options given (TrainConfig fields but those set by the experiment) go into base,
    over the file's base option by option."""
    values = read_plan_file(path)
    for name in PLAN_FIELDS:
        if name != "base" and options.get(name) is not None:
            values[name] = options[name]
    train_options = {
        f.name: options[f.name]
        for f in fields(TrainConfig)
        if f.name not in SET_BY_EXPERIMENT and options.get(f.name) is not None
    }
    if train_options:
        values["base"] = {**(values.get("base") or {}), **train_options}
    return values


def check_plan(values: Mapping[str, Any], strict: bool = False) -> Plan:
    """A plan from its fields, every field checked (types and values; no file is read); losses canonical.

    `strict` (a stored plan, read by status and compare too): numbers must be JSON integers and base
    exactly as `check_plan` writes it, and the loss specs are taken as written (a rerun checks them;
    a report needs only their names); else (a plan file, options) a number may be spelled as text, as
    train options may."""
    losses = _text_list(values.get("losses"), "losses")
    if not losses:
        raise MicrosegError("the plan names no loss: give losses (e.g. --losses adaptive_focal ag_bce)")
    _no_duplicates("loss", losses)
    canonical = losses if strict else _canonical_losses(losses)
    seeds = [_integer("seeds", s, strict) for s in _as_list(values.get("seeds", [1234]), "seeds")]
    if not seeds:
        raise MicrosegError("the plan names no seed: give seeds (e.g. --seeds 1 2 3)")
    for seed in seeds:
        check_value("seeds", seed, RULES["seed"])
    _no_duplicates("seed", seeds)
    folds = _integer("folds", values.get("folds", 0), strict)
    if folds < 0 or folds == 1:
        raise MicrosegError(
            f"folds must be 0 (the fixed train/test split) or at least 2, got {folds}"
            + (": one fold would leave no patient to train on" if folds == 1 else "")
        )
    cache, data = (_path_text(values.get(name), name) for name in ("cache", "data"))
    protocol = _protocol(values.get("protocol", "microsegnet"))
    base = _checked_base(values.get("base"), cache, seeds[0], folds, strict)
    return Plan(canonical, seeds, folds, cache, data, protocol, base, _primary(values.get("primary", "dsc")))


def _primary(value: Any) -> str:
    """The primary metric: a key of the experiment report's metrics."""
    from microseg.stats.replicates import METRICS

    keys = [m.key for m in METRICS]
    if value not in keys:
        raise MicrosegError(f"primary must be one of the report's metrics ({', '.join(keys)}), got {value!r}")
    return str(value)


def _canonical_losses(losses: list[str]) -> list[str]:
    """Each spec (distinct as written) checked and canonical; MicrosegError naming two spellings of one loss."""
    from microseg.losses import LossSpec, check_spec

    first: dict[LossSpec, str] = {}
    for spelled in losses:
        spec = check_spec(spelled)  # the one parse of each given spec
        if spec in first:
            raise MicrosegError(
                f"duplicate loss(es) in the plan: {spec} ({first[spec]!r} and {spelled!r} are one loss)"
            )
        first[spec] = spelled
    return [spec.canonical for spec in first]


def _checked_base(value: Any, cache: str, seed: int, folds: int, strict: bool) -> dict[str, Any]:
    """The base options, typed (every option, as a cell's train options: their checks do not depend on the
    loss, which `check_plan` checks); refuses those the experiment sets."""
    if value is None:
        value = {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise MicrosegError(f"base must be a mapping of train option: value, got {value!r}")
    for name in SET_BY_EXPERIMENT:
        if name in value:
            raise MicrosegError(
                f"base option {name} is set by the experiment for each cell "
                f"({'give losses / seeds' if name in ('loss', 'seed') else 'leave it out'})"
            )
    config = resolve_train_config(None, {**value, "cache": cache, "run": "cell", "seed": seed})
    if folds and config.val_fraction > 0:
        raise MicrosegError("base val_fraction must be 0 with folds: each cell validates on its held-out fold")
    base = {key: getattr(config, key) for key in value}
    for key in base if strict else ():
        if (type(base[key]), base[key]) != (type(value[key]), value[key]):
            raise MicrosegError(f"base.{key} must be {base[key]!r}, as it is written, got {value[key]!r}")
    return base


def plan_differences(stored: Plan, given: Plan, stored_losses: set[str]) -> list[str]:
    """Every field where `given` differs from `stored` ('base.epochs: 6 -> 10'); losses (`stored_losses`: the
    stored ones' canonical specs) and seeds as sets, base options by the value a cell trains with (stored
    base under the stored recipe, given under its)."""
    old, new = stored.to_dict(), given.to_dict()
    differences = []
    for name in PLAN_FIELDS:
        if name == "base":
            differences += _base_differences(stored, given)
        elif name == "losses":
            if stored_losses != set(new[name]):
                differences.append(f"losses: {' '.join(old[name])} -> {' '.join(new[name])}")
        elif name == "seeds":
            if set(old[name]) != set(new[name]):
                differences.append(f"seeds: {' '.join(map(str, old[name]))} -> {' '.join(map(str, new[name]))}")
        elif old[name] != new[name]:
            differences.append(f"{name}: {old[name]!r} -> {new[name]!r}")
    return differences


def _base_differences(stored: Plan, given: Plan) -> list[str]:
    def effective(plan: Plan) -> TrainConfig:
        return resolve_train_config(None, {**plan.base, "cache": plan.cache, "run": "cell"})

    old, new = effective(stored), effective(given)
    return [
        f"base.{key}: {getattr(old, key)!r} -> {getattr(new, key)!r}"
        for key in sorted(set(stored.base) | set(given.base))
        if getattr(old, key) != getattr(new, key)
    ]


def continued_plan(stored: Plan, given: Mapping[str, Any], add: bool, where: Path) -> Plan:
    """The plan a rerun (`add`: an --add) of the experiment at `where` runs: the given fields over the stored
    ones, field by field (base: option by option), checked whole; the stored plan itself, or with `add`
    the stored plan with the given losses and seeds after its own. Every other differing field is named
    in one MicrosegError, before the files the plan names are read."""
    values = {**stored.to_dict(), **{name: v for name, v in given.items() if name != "base"}}
    values["base"] = {**stored.base, **(given.get("base") or {})}
    from microseg.losses import canonical_spec

    plan = _absolute(check_plan(values))
    known = {canonical_spec(loss) for loss in stored.losses}  # a format-1 record holds them as written
    differences = plan_differences(stored, plan, known)
    refused = [d for d in differences if not (add and d.split(":")[0] in GROWN_BY_ADD)]
    if refused:
        grown = any(d.split(":")[0] in GROWN_BY_ADD for d in refused)
        raise MicrosegError(
            f"{where} holds an experiment of another plan ({'; '.join(refused)})"
            + ("; --add adds seeds or losses" if grown else "; --add adds only seeds or losses" if add else "")
            + "; choose another --out for a new plan"
        )
    check_plan_inputs(plan)
    if not differences:
        return stored
    return replace(
        stored,
        losses=stored.losses + [loss for loss in plan.losses if loss not in known],
        seeds=stored.seeds + [seed for seed in plan.seeds if seed not in stored.seeds],
    )


def resolve_plan(values: Mapping[str, Any]) -> Plan:
    """A checked plan from its given fields (`check_plan`), cache and data as absolute paths, and the files
    it names checked (`check_plan_inputs`)."""
    plan = _absolute(check_plan(values))
    check_plan_inputs(plan)
    return plan


def _absolute(plan: Plan) -> Plan:
    plan.cache, plan.data = str(Path(plan.cache).resolve()), str(Path(plan.data).resolve())
    return plan


def check_plan_inputs(plan: Plan) -> None:
    """The files a plan names: the cache (and weights) a cell trains from, the data's test split, and
    folds <= the cache's training patients."""
    from microseg.data.layout import find_cases
    from microseg.runs.inputs import train_inputs

    config = resolve_train_config(
        None, {**plan.base, "cache": plan.cache, "run": "cell", "loss": plan.losses[0], "seed": plan.seeds[0]}
    )
    patients = train_inputs(config, resume=False).cache.case_ids
    if plan.folds > len(patients):
        raise MicrosegError(
            f"folds {plan.folds} is more than the {len(patients)} training patients of "
            f"{plan.cache}: every fold needs a patient"
        )
    find_cases(Path(plan.data), "test", require_non_expert=False)


def _as_list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [value]
    raise MicrosegError(f"{name} must be a list, got {value!r}")


def _text_list(value: Any, name: str) -> list[str]:
    items = _as_list(value, name)
    for item in items:
        if not isinstance(item, str):
            raise MicrosegError(f"{name} must be loss specs (text), got {item!r}")
    return items


def _path_text(value: Any, name: str) -> str:
    if value is None or value == "":
        raise MicrosegError(f"the plan needs {name}: give --{name} (or {name}: in the plan file)")
    if not isinstance(value, str):
        raise MicrosegError(f"{name} must be a path (text), got {value!r}")
    return value


def _protocol(value: Any) -> str:
    from microseg.metrics import check_protocol

    if not isinstance(value, str):
        raise MicrosegError(f"protocol must be a protocol name (text), got {value!r}")
    return check_protocol(value)


def _integer(name: str, value: Any, strict: bool) -> int:
    """An integer: a JSON/YAML integer, or (not `strict`) a number or text that spells one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not strict and isinstance(value, (float, str)):
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number.is_integer():
            return int(number)
    raise MicrosegError(f"{name} must be integers, got {value!r}")


def _no_duplicates(what: str, values: list) -> None:
    seen, repeated = set(), []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    if repeated:
        raise MicrosegError(f"duplicate {what}(s) in the plan: {', '.join(map(str, repeated))}")
