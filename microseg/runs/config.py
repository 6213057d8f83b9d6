"""Typed run configuration: defaults <- recipe <- YAML file <- command-line options.

Defaults (the `default` recipe) take MicroSegNet's optimisation: SGD, lr 0.01, momentum 0.9,
weight decay 1e-4, batch 8, 10 epochs, poly decay (1 - iter/max_iter)^0.9, seed 1234,
deep-supervision kernels (1, 2, 3, 4) and unit weights for the 28/56/112/224 outputs; with the
adaptive focal loss, augmentation and bilinear resize back at evaluation. `--recipe microsegnet`
or `--recipe adaptive-focal` sets what each paper used instead (`microseg.runs.recipes`). One kernel
size (and one weight) trains the main output alone, without deep supervision. Each field's
`help` metadata is the `microseg train` option's help (the CLI adds the default). The resolved
config, with its recipe's name, is saved as `config.yaml` in every run.

Validation, all before a run folder is created: every value has its field's type (a YAML
`lr: 1e-3`, which YAML reads as a string, is read as the number it spells) and its range
(`RULES`, in the rule system of `microseg.core.rules`); names (optimizer, amp, device, model, loss spec) are checked against what exists;
then `microseg.runs.inputs.train_inputs` reads the files the config names (the cache, and the
weights) and checks that the model can take the cache's slice size. Each refusal is one
MicrosegError line naming the option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from microseg.core.errors import MicrosegError, OptionError
from microseg.core.preprocess import PREDICTION_RESIZES, REFERENCE_KERNEL_SIZES, Preprocess
from microseg.core.rules import KERNEL, NON_NEGATIVE, POSITIVE, Number, Rule, check_value
from microseg.core.yaml_mapping import read_yaml_mapping
from microseg.runs.recipes import DEFAULT_RECIPE, RECIPES, recipe_settings


def option(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A config field with its command-line help (and any extra argparse keywords)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    cache: str = option("", "slice cache from `microseg prepare`")
    source_check: bool = option(
        True, "refuse a cache whose source files changed since `microseg prepare` (--no-source-check: use it as it is)"
    )
    run: str = option("", "run folder to write, e.g. runs/NAME (required, here or as run: in --config)")
    recipe: str = option(
        DEFAULT_RECIPE,
        "named set of defaults (the --config file and the options win over it): "
        + "; ".join(f"{r.name} ({r.reproduces})" for r in RECIPES.values()),
    )
    loss: str = option("adaptive_focal", "loss spec, e.g. adaptive_focal, ag_bce:w=4, 0.5*dice+focal")
    model: str = option(
        "R50-ViT-B_16",
        "named model config: R50-ViT-B_16 (the paper's; without --weights it "
        "trains from scratch, not from the paper's ImageNet-21k encoder), "
        "R50-ViT-B_16-port, R50-ViT-L_16, small, tiny: see docs/reference/models.md",
    )
    weights: str | None = option(
        None,
        "pretrained weights file (Google .npz, timm/safetensors state dict, "
        "microseg checkpoint) or a name found in weights/: R50-ViT-B_16 "
        "(fetch it with `microseg download weights R50-ViT-B_16`)",
    )
    epochs: int = option(10, "epochs, at least 1")
    batch_size: int = option(
        8, "global batch size, at least 1: under torchrun the processes split it (at least one slice each)"
    )
    lr: float = option(0.01, "base learning rate, > 0, poly decay")
    optimizer: str = option("sgd", "sgd or adam")
    momentum: float = option(0.9, "SGD momentum, in [0, 1)")
    weight_decay: float = option(1e-4, "weight decay, >= 0")
    poly_power: float = option(0.9, "poly decay power, >= 0: lr (1 - iteration / max_iter) ^ power")
    val_fraction: float = option(0.0, "fraction of training patients held out for validation, in [0, 1)")
    patients: list[str] = option(
        [], "train on these patients of the cache only, by id (default: all of them)", metavar="ID", type=str
    )
    val_patients: list[str] = option(
        [],
        "validate on these patients of the cache, by id, never trained on "
        "(instead of --val-fraction; a cross-validation fold's held-out ones)",
        metavar="ID",
        type=str,
    )
    seed: int = option(1234, "random seed, 0 to 2^32 - 1")
    ds_kernel_sizes: list[int] = option(
        list(REFERENCE_KERNEL_SIZES),
        "hard-region dilation kernel per output, coarsest first (one: no deep supervision)",
    )
    ds_weights: list[float] = option(
        [1.0] * len(REFERENCE_KERNEL_SIZES), "loss weight per output, coarsest first, each >= 0, not all 0"
    )
    augment: bool = option(
        True,
        "augment the training slices: flips, rotations, scaling, brightness/contrast "
        "(--no-augment: none, as MicroSegNet)",
    )
    prediction_resize: str = option(
        "bilinear",
        "how evaluation brings probabilities back to native size: bilinear, or nearest (MicroSegNet's test script)",
    )
    amp: str | None = option(
        "auto",
        "mixed precision: auto (bf16 on a GPU that has it natively, fp16 on an older GPU, "
        "none on the CPU), bf16 (a bare --amp), "
        "fp16 (CUDA, with a grad scaler) or none (fp32)",
        nargs="?",
        const="bf16",
    )
    channels_last: bool = option(False, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model and its loss together (one graph)")
    sync_bn: bool = option(
        False, "synchronise BatchNorm statistics across torchrun's processes (CUDA; for small per-GPU batches)"
    )
    deterministic: bool = option(False, "deterministic kernels where torch has them; cudnn.benchmark and TF32 off")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    num_workers: int = option(2, "DataLoader workers, >= 0 (0: load in the main process); they persist across epochs")
    sync_every: int = option(
        50,
        "read the losses back from the device every N steps (and at each epoch's end): "
        "the NaN/Inf check, progress bar and TensorBoard running loss, >= 1",
    )
    tensorboard: str | None = option(
        None,
        "write TensorBoard logs to DIR (a bare --tensorboard: RUN/tensorboard; needs pip install -e '.[tensorboard]')",
        nargs="?",
        const="",
        metavar="DIR",
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def preprocess(self, size: int) -> Preprocess:
        """The preprocessing of a run trained on a `size` px cache with this config."""
        return Preprocess(
            size=size,
            kernel_sizes=tuple(int(k) for k in self.ds_kernel_sizes),
            prediction_resize=self.prediction_resize,
        )


OPTIMIZERS = ("sgd", "adam")
AMP_DTYPES = (None, "auto", "none", "bf16", "fp16")
SEED_MAX = 2**32 - 1

RULES: dict[str, Rule] = {  # the numeric fields' ranges (`_typed` has made them ints or floats)
    "epochs": Number(1),
    "batch_size": Number(1),
    "num_workers": Number(0),
    "sync_every": Number(1),
    "seed": Number(0, SEED_MAX),
    "lr": POSITIVE,
    "momentum": Number(0.0, 1.0, high_open=True),
    "weight_decay": NON_NEGATIVE,
    "poly_power": NON_NEGATIVE,
    "val_fraction": Number(0.0, 1.0, high_open=True),
}


def resolve_train_config(yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Merge a YAML file (if any) and non-None CLI overrides over the defaults; validate."""
    values: dict[str, Any] = read_config_file(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values = {**recipe_settings(values.get("recipe", DEFAULT_RECIPE)), **values}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise MicrosegError(
            f"unknown config option(s) {', '.join(map(str, unknown))}; valid: {', '.join(sorted(known))}"
        )
    config = TrainConfig(**{key: _typed(key, value) for key, value in values.items()})
    _validate(config)
    return config


def read_config_file(yaml_path: str) -> dict[str, Any]:
    """The options a --config YAML file sets (upgraded from an earlier release's names)."""
    path = Path(yaml_path)
    if path.is_dir():
        raise MicrosegError(f"--config {path} is a folder, not a YAML file")
    if not path.is_file():
        raise MicrosegError(f"config file not found: {path}")
    return _upgrade(read_yaml_mapping(path, "option: value"))


def config_from_dict(values: dict[str, Any], source: str) -> TrainConfig:
    """A TrainConfig saved by a run (config.yaml, a checkpoint's record); `source` names it in errors."""
    values = _upgrade(values)
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)}, key=str)
    if unknown:
        raise MicrosegError(
            f"{source} has option(s) this microseg does not know: {', '.join(map(str, unknown))} "
            "(written by another version?)"
        )
    try:
        return TrainConfig(**{key: _typed(key, value) for key, value in values.items()})
    except MicrosegError as err:
        raise MicrosegError(f"{source}: {err}") from None


def _upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A config of an earlier release: `deep_supervision: false` meant the main output's kernel and weight alone."""
    values = dict(values)
    if "deep_supervision" in values and not values.pop("deep_supervision"):
        for key, default in (("ds_kernel_sizes", REFERENCE_KERNEL_SIZES), ("ds_weights", [1.0])):
            values[key] = list(values.get(key, default))[-1:]
    return values


def _typed(name: str, value: Any) -> Any:
    """`value` as the type of field `name`'s default (a string that spells a number is that number)."""
    default = getattr(TrainConfig(), name)
    if isinstance(default, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items and default:
            raise OptionError(f"`{name}` needs at least one value")
        return [_scalar(name, item, type(default[0]) if default else str) for item in items]
    if default is None and value is None:
        return None
    return _scalar(name, value, str if default is None else type(default))


def _scalar(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif not isinstance(value, bool):
        try:
            number = float(value)
            if kind is float:
                return number
            if number.is_integer():
                return int(number)
        except (TypeError, ValueError, OverflowError):
            pass
    what = {bool: "true or false", str: "a text value", int: "an integer", float: "a number"}[kind]
    raise OptionError(f"`{name}` must be {what}, got {value!r}")


def _validate(c: TrainConfig) -> None:
    """Ranges and names of a merged config (no file is read)."""
    from microseg.core.runtime import resolve_device
    from microseg.losses import check_spec
    from microseg.models.configs import CONFIGS

    if not c.cache:
        raise OptionError("no slice cache given: pass `cache` CACHE.h5 (made by `microseg prepare`)")
    if not c.run:
        raise OptionError("no run folder given: pass `run` runs/NAME (or run: in the `config` file)")
    for name, rule in RULES.items():
        check_value(name, getattr(c, name), rule)
    if c.optimizer not in OPTIMIZERS:
        raise OptionError(f"`optimizer` {c.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if c.amp not in AMP_DTYPES:
        raise OptionError(f"`amp` {c.amp!r} is not one of auto, bf16, fp16, none")
    if c.prediction_resize not in PREDICTION_RESIZES:
        raise OptionError(f"`prediction_resize` {c.prediction_resize!r} is not one of {', '.join(PREDICTION_RESIZES)}")
    if c.model not in CONFIGS:
        raise OptionError(f"`model` {c.model!r} is not a model config; choose one of: {', '.join(CONFIGS)}")
    _validate_deep_supervision(c)
    if c.val_patients and c.val_fraction > 0:
        raise OptionError("`val_patients` names the validation patients: leave `val_fraction` at 0")
    check_spec(c.loss)
    if resolve_device(c.device).type != "cuda" and c.amp == "fp16":
        raise OptionError("`amp` fp16 needs a CUDA device; use `amp` bf16 on the CPU")


def _validate_deep_supervision(c: TrainConfig) -> None:
    n = len(REFERENCE_KERNEL_SIZES)
    if len(c.ds_kernel_sizes) not in (1, n):
        raise OptionError(
            f"`ds_kernel_sizes` needs {n} entries (one per output, coarsest first) "
            f"or 1 (the main output alone), got {len(c.ds_kernel_sizes)}"
        )
    if len(c.ds_kernel_sizes) != len(c.ds_weights):
        raise OptionError(
            f"`ds_weights` needs one entry per `ds_kernel_sizes` entry ({len(c.ds_kernel_sizes)}), "
            f"got {len(c.ds_weights)}"
        )
    for k in c.ds_kernel_sizes:
        check_value("ds_kernel_sizes", k, KERNEL)
    for w in c.ds_weights:
        check_value("ds_weights", w, NON_NEGATIVE)
    if not sum(c.ds_weights) > 0:
        raise OptionError("`ds_weights` are all 0: at least one output must have a weight > 0")


CONFIG_HEADER = "# microseg train config; batch_size is the global batch (torchrun's processes split it)\n"


def save_config(config: TrainConfig, path: Path) -> None:
    from microseg.core.atomic import write_text

    write_text(path, CONFIG_HEADER + yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: Path) -> TrainConfig:
    if not path.is_file():
        raise MicrosegError(f"{path.parent} is not a microseg run: {path.name} is missing")
    return config_from_dict(read_yaml_mapping(path, "option: value"), str(path))
