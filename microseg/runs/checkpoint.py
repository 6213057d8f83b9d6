"""The checkpoint of a run, and the one loader of a run's model.

A checkpoint is a `Checkpoint`, stored by torch.save as a plain dict of its fields (so a
checkpoint is also a weights file: `model` + `model_config`), the `Preprocess` record among
them. Checkpoints of the first release (no `preprocess`, `scheduler` keys) still load: their
preprocessing is rebuilt from the model config's size and the train config's kernels.
`calf_stats` holds the training-set statistics of the run's loss (`SegLoss.dataset_statistics`),
under the name of the first release. `load_run_model` is how evaluation (and anything else)
gets a run's network with its preprocessing.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from microseg.core.atomic import atomic_path
from microseg.core.errors import MicrosegError, OptionError
from microseg.core.preprocess import PREDICTION_RESIZES, REFERENCE_KERNEL_SIZES, Preprocess
from microseg.core.runtime import configure_speed, resolve_device
from microseg.core.torch_files import plain, read_torch_file, require_finite
from microseg.runs.config import TrainConfig, config_from_dict, load_config, read_config_file, resolve_train_config
from microseg.runs.folder import RunFolder


@dataclass
class Checkpoint:
    """Everything a run needs to evaluate (model, model_config, preprocess) or resume (the rest)."""

    model: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    preprocess: Preprocess
    train_config: dict[str, Any] = field(default_factory=dict)
    optimizer: dict | None = None
    scaler: dict | None = None
    scheduler: dict | None = None
    epoch: int = 0
    step: int = 0
    accum: torch.Tensor | None = None  # the epoch's loss sums so far (every process's up to the last check)
    accum_count: float | None = None  # the weight they carry: steps x processes (None: written by 1 process)
    history: list[dict[str, float]] = field(default_factory=list)
    best_dsc: float = -1.0
    calf_stats: dict | None = None
    world_size: int = 1  # processes that trained it; the position (epoch, step) is in global batches
    global_batch: int = 0  # the global batch (0: an earlier release's, whose --batch-size was per process)
    last_lr: float | None = None  # the learning rate of the last step taken (None: an earlier release's)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Checkpoint:
        """The checkpoint a loaded dict holds; TypeError / KeyError naming a record that is missing
        or of the wrong type (a hand-made or damaged file)."""
        from microseg.models import ModelConfig

        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in state.items() if k in known}
        _require_types(state["model_config"], ModelConfig, "model_config")
        if "name" not in state["model_config"] or "img_size" not in state["model_config"]:
            raise TypeError("its 'model_config' record lacks the model's name or img_size")
        preprocess = state.get("preprocess")
        if preprocess is not None:
            _require_types(preprocess, Preprocess, "preprocess")
        values["preprocess"] = (
            Preprocess.from_dict(preprocess) if preprocess is not None else _first_release_preprocess(state)
        )
        return cls(**values)

    def build_model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The network this checkpoint describes, its weights loaded strictly, in eval mode on `device`."""
        from microseg.models import ModelConfig, build_model

        model = build_model(ModelConfig.from_dict(self.model_config))
        try:
            missing, unexpected = model.load_state_dict(self.model, strict=False)
        except RuntimeError as err:  # a tensor of another shape
            shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
            raise MicrosegError(f"checkpoint does not fit its model config: {(shapes or ['?'])[0]}") from None
        if missing or unexpected:
            raise MicrosegError(
                f"checkpoint does not fit its model config: {len(missing)} missing, {len(unexpected)} unexpected tensors"
            )
        return model.to(device).eval()


def _require_types(values: Any, record: type, name: str) -> None:
    """TypeError unless `values` is a dict whose entries have the types of `record`'s defaults."""
    if not isinstance(values, dict):
        raise TypeError(f"'{name}' is a {type(values).__name__}, not a dict")
    for f in fields(record):
        if f.name not in values or f.default is dataclasses.MISSING:
            continue
        value, default = values[f.name], f.default
        if isinstance(default, tuple):
            item = type(default[0]) if default else object
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, item) for v in value)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default)) and (isinstance(default, bool) or not isinstance(value, bool))
        if not ok:
            raise TypeError(f"'{name}.{f.name}' is {value!r}, not a {type(default).__name__}")


def _first_release_preprocess(state: dict[str, Any]) -> Preprocess:
    """The preprocessing a first-release checkpoint was trained with (its dict had no `preprocess`)."""
    train = state.get("train_config") or {}
    kernels = list(train.get("ds_kernel_sizes", REFERENCE_KERNEL_SIZES))
    if not train.get("deep_supervision", True):
        kernels = kernels[-1:]
    if not isinstance(state["model_config"].get("img_size"), int):
        raise TypeError("it has no 'preprocess' record and no 'model_config.img_size' to rebuild it from")
    return Preprocess(size=state["model_config"]["img_size"], kernel_sizes=tuple(int(k) for k in kernels))


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves half a checkpoint.

    The content is made of plain types (`microseg.core.torch_files.plain`), so it loads with
    weights_only=True. torch reports a failed write (a full disk) as a RuntimeError of its C++
    writer, not an OSError: it becomes one line naming the checkpoint and the free space left.
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(plain(checkpoint.to_dict()), tmp)
        except RuntimeError:
            tmp.unlink(missing_ok=True)
            free = shutil.disk_usage(tmp.parent).free / 2**20
            raise MicrosegError(f"cannot write {path}: the write failed ({free:.1f} MiB free on its disk)") from None


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint onto the CPU without running code; MicrosegError when it is missing,
    corrupt (zip CRCs, non-finite weights), holds Python objects, or lacks a record."""
    path = Path(path)
    if not path.is_file():
        raise MicrosegError(f"checkpoint not found: {path}")
    state = read_torch_file(path, "checkpoint", "not a file torch.save wrote", require_zip=True)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "model_config" not in state:
        raise MicrosegError(f"{path} is not a microseg checkpoint (no model / model_config)")
    require_finite(state["model"], "checkpoint", path)
    try:
        return Checkpoint.from_dict(state)
    except (TypeError, ValueError) as err:
        raise MicrosegError(f"checkpoint {path} is incomplete or damaged: {err}") from None


@dataclass(frozen=True)
class RunModel:
    """A run's network (eval mode, on its device), its preprocessing, its checkpoint and the checkpoint's file."""

    model: torch.nn.Module
    preprocess: Preprocess
    checkpoint: Checkpoint
    path: Path

    @property
    def amp(self) -> str | None:
        """The training's autocast precision, kept for inference on a CUDA device; fp32 elsewhere (fp16
        autocast is CUDA-only, and bf16 autocast is slower than fp32 on most CPUs)."""
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        return self.checkpoint.train_config.get("amp") if on_cuda else None


def load_run_model(run: str | Path, device: str = "auto", resize: str | None = None) -> RunModel:
    """The run's best (else last) network on `device` (a name, `microseg.core.runtime.resolve_device`) with its
    preprocessing; `resize` (bilinear, nearest) replaces the prediction resize the run was trained with."""
    if resize is not None and resize not in PREDICTION_RESIZES:
        raise OptionError(f"`resize` {resize!r} is not one of {', '.join(PREDICTION_RESIZES)}")
    device_ = resolve_device(device)
    configure_speed(device_, deterministic=False)
    path = RunFolder(run).checkpoint_path()
    checkpoint = load_checkpoint(path)
    preprocess = (
        checkpoint.preprocess
        if resize is None
        else dataclasses.replace(checkpoint.preprocess, prediction_resize=resize)
    )
    return RunModel(checkpoint.build_model(device_), preprocess, checkpoint, path)


RESUME_MAY_CHANGE = ("run", "device", "num_workers", "sync_every", "tensorboard", "source_check", "deterministic")
"""The options a resumed run may set anew: they do not change what it computes."""
RESUME_NEEDS = ("train_config", "optimizer", "scaler", "accum")  # no "rng": dropout follows the position
"""The checkpoint records a resumed run needs besides the weights."""


def train_config(yaml_path: str | None, options: dict[str, Any], resume: bool) -> TrainConfig:
    """The config `train` runs with: a resumed run's own (`resumed_config`, its run the `run` option), else the
    `yaml_path` file's and the options over the recipe (`resolve_train_config`)."""
    if resume:
        return resumed_config(options.get("run"), yaml_path, options)
    return resolve_train_config(yaml_path, options)


def resumed_config(run: str | None, yaml_path: str | None, options: dict[str, Any]) -> TrainConfig:
    """The config the run's `last.pt` was trained with: the truth a resumed run keeps.

    `config.yaml` must still say the same (a hand-edited one is refused naming the field), and so
    must every option the --config file or the command line sets (bar RESUME_MAY_CHANGE: device,
    workers, checks, logging), naming the first that differs.
    """
    if not run:
        raise OptionError("`resume` needs `run` RUN: the run folder to continue")
    folder = RunFolder(run)
    saved = load_config(folder.config)
    truth = _trained_config(folder)
    for key, value in truth.to_dict().items():
        if key not in RESUME_MAY_CHANGE and getattr(saved, key) != value:
            raise MicrosegError(
                f"{folder.config} says {key}: {getattr(saved, key)}, but {folder.last} was trained "
                f"with {key}: {value}; a resumed run keeps its config (restore {folder.config.name} "
                "or start a new run)"
            )
    from_file = read_config_file(yaml_path) if yaml_path else {}
    explicit = {k: v for k, v in options.items() if v is not None}
    asked = {**from_file, **explicit}
    given = resolve_train_config(None, {**truth.to_dict(), **asked}).to_dict()
    for key in sorted(set(asked) - set(RESUME_MAY_CHANGE)):
        if given[key] != getattr(truth, key):
            where = f"`{key}` {given[key]}" if key in explicit else f"{key}: {given[key]} in {yaml_path}"
            raise OptionError(
                f"{where} differs from the run's config ({key}: {getattr(truth, key)}, the config "
                f"{folder.last} was trained with); a resumed run keeps its config"
            )
    return dataclasses.replace(truth, **{k: given[k] for k in RESUME_MAY_CHANGE if k in asked})


def _trained_config(folder: RunFolder) -> TrainConfig:
    """The training config recorded in the run's last.pt, once it holds every record resuming needs."""
    if not folder.last.is_file():
        raise MicrosegError(f"cannot resume: {folder.last} not found")
    checkpoint = load_checkpoint(folder.last)
    missing = [name for name in RESUME_NEEDS if getattr(checkpoint, name) is None]
    missing += [] if checkpoint.train_config else ["train_config"]
    if missing:
        raise MicrosegError(
            f"cannot resume from {folder.last}: it has no {', '.join(missing)} record (a "
            "weights-only or damaged checkpoint); start a new run, e.g. with --weights "
            f"{folder.last}"
        )
    return config_from_dict(checkpoint.train_config, f"{folder.last} (its train_config record)")
