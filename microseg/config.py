"""Typed run configuration: defaults <- YAML file <- command-line options.

Defaults are the reference recipe (MicroSegNet): SGD, lr 0.01, momentum 0.9, weight decay 1e-4,
batch 8, 10 epochs, poly decay (1 - iter/max_iter)^0.9, seed 1234, deep-supervision kernels
(1, 2, 3, 4) and unit weights for the 28/56/112/224 outputs. One kernel size (and one weight)
trains the main output alone, without deep supervision. Each field's `help` metadata is the
`microseg train` option's help (the CLI adds the default). The resolved config is saved as
`config.yaml` in every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from microseg.errors import MicrosegError
from microseg.preprocess import REFERENCE_KERNEL_SIZES, Preprocess


def option(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A config field with its command-line help (and any extra argparse keywords)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    cache: str = option("", "slice cache from `microseg prepare`")
    run: str = option("", "run folder to write, e.g. runs/NAME", required=True)
    loss: str = option("adaptive_focal", "loss spec, e.g. adaptive_focal, ag_bce:w=4, 0.5*dice+focal")
    model: str = option("R50-ViT-B_16", "named model config (the paper's, or small, tiny: see the README)")
    weights: str | None = option(None, "pretrained weights file (Google .npz, timm/safetensors state dict, "
                                       "microseg checkpoint) or a name found in weights/: R50-ViT-B_16")
    epochs: int = option(10, "epochs")
    batch_size: int = option(8, "batch size")
    lr: float = option(0.01, "base learning rate, poly decay")
    optimizer: str = option("sgd", "sgd or adam")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "weight decay")
    poly_power: float = option(0.9, "poly decay power: lr (1 - iteration / max_iter) ^ power")
    val_fraction: float = option(0.0, "fraction of training patients held out for validation")
    seed: int = option(1234, "random seed")
    ds_kernel_sizes: list[int] = option(list(REFERENCE_KERNEL_SIZES),
                                        "hard-region dilation kernel per output, coarsest first (one: no deep supervision)")
    ds_weights: list[float] = option([1.0] * len(REFERENCE_KERNEL_SIZES), "loss weight per output, coarsest first")
    augment: bool = option(True, "train without augmentation", flag="--no-augment")
    amp: str | None = option(None, "mixed precision: bf16 (with a bare --amp) or fp16 (CUDA, with a grad scaler)",
                             nargs="?", const="bf16")
    channels_last: bool = option(False, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    num_workers: int = option(2, "DataLoader workers")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def preprocess(self, size: int) -> Preprocess:
        """The preprocessing of a run trained on a `size` px cache with this config."""
        return Preprocess(size=size, kernel_sizes=tuple(int(k) for k in self.ds_kernel_sizes))


OPTIMIZERS = ("sgd", "adam")
AMP_DTYPES = (None, "bf16", "fp16")


def resolve_train_config(yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Merge a YAML file (if any) and non-None CLI overrides over the defaults; validate."""
    values: dict[str, Any] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise MicrosegError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise MicrosegError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise MicrosegError(f"{path} must hold a mapping of option: value")
        values.update(_upgrade(loaded))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MicrosegError(f"unknown config option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    config = TrainConfig(**values)
    _validate(config)
    return config


def _upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A config of an earlier release: `deep_supervision: false` meant the main output's kernel and weight alone."""
    values = dict(values)
    if "deep_supervision" in values and not values.pop("deep_supervision"):
        for key, default in (("ds_kernel_sizes", REFERENCE_KERNEL_SIZES), ("ds_weights", [1.0])):
            values[key] = list(values.get(key, default))[-1:]
    return values


def _validate(c: TrainConfig) -> None:
    if not c.cache:
        raise MicrosegError("no slice cache given: pass --cache CACHE.h5 (made by `microseg prepare`)")
    if not c.run:
        raise MicrosegError("no run folder given: pass --run runs/NAME")
    if c.optimizer not in OPTIMIZERS:
        raise MicrosegError(f"--optimizer {c.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if c.amp not in AMP_DTYPES:
        raise MicrosegError(f"--amp {c.amp!r} is not one of bf16, fp16")
    if c.epochs < 1 or c.batch_size < 1:
        raise MicrosegError("--epochs and --batch-size must be at least 1")
    if not 0.0 <= c.val_fraction < 1.0:
        raise MicrosegError(f"--val-fraction must be in [0, 1), got {c.val_fraction}")
    if len(c.ds_kernel_sizes) != len(c.ds_weights):
        raise MicrosegError("ds_kernel_sizes and ds_weights must have one entry per output scale")
    if len(c.ds_kernel_sizes) not in (1, len(REFERENCE_KERNEL_SIZES)):
        raise MicrosegError(f"ds_kernel_sizes needs {len(REFERENCE_KERNEL_SIZES)} entries (one per output) "
                            "or 1 (the main output alone)")


def save_config(config: TrainConfig, path: Path) -> None:
    from microseg.atomic import write_text

    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: Path) -> TrainConfig:
    if not path.is_file():
        raise MicrosegError(f"{path.parent} is not a microseg run: {path.name} is missing")
    return TrainConfig(**_upgrade(yaml.safe_load(path.read_text()) or {}))
