"""Typed run configuration: defaults <- YAML file <- command-line options.

Defaults are the reference recipe (MicroSegNet, FACTS.md): SGD, lr 0.01, momentum 0.9,
weight decay 1e-4, batch 8, 10 epochs, poly decay (1 - iter/max_iter)^0.9, seed 1234,
deep-supervision kernels (1, 2, 3, 4) and unit weights for the 28/56/112/224 outputs.
The resolved config is saved as `config.yaml` in every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from microseg.errors import MicrosegError


@dataclass
class TrainConfig:
    cache: str = ""
    run: str = ""
    loss: str = "adaptive_focal"
    model: str = "R50-ViT-B_16"
    weights: str | None = None
    epochs: int = 10
    batch_size: int = 8
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    val_fraction: float = 0.0
    seed: int = 1234
    ds_kernel_sizes: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    ds_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    deep_supervision: bool = True
    augment: bool = True
    amp: str | None = None  # None, "bf16" or "fp16" (fp16 only on CUDA, with a grad scaler)
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    num_workers: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OPTIMIZERS = ("sgd", "adam")
AMP_DTYPES = (None, "bf16", "fp16")


def resolve_config(yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
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
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MicrosegError(f"unknown config option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    config = TrainConfig(**values)
    _validate(config)
    return config


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


def save_config(config: TrainConfig, path: Path) -> None:
    from microseg.atomic import write_text

    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: Path) -> TrainConfig:
    if not path.is_file():
        raise MicrosegError(f"{path.parent} is not a microseg run: {path.name} is missing")
    return TrainConfig(**(yaml.safe_load(path.read_text()) or {}))
