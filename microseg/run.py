"""The run folder: its file names, the overwrite / --force / --resume policy, the checkpoint, reading a run.

`runs/<name>/` holds
- `config.yaml`      the resolved TrainConfig;
- `calf_stats.json`  the CALF moments of the training slices (calf runs only);
- `history.csv`      one row per epoch;
- `last.pt`, `best.pt` checkpoints (`best.pt` by validation DSC, only with a validation split);
- `metrics/`         `per_patient.csv` / `.md`, `per_slice.csv`, `evaluation.json` (from evaluate);
- `predictions/`     the predicted masks (from evaluate).
- `tensorboard/`     TensorBoard event files (with `train --tensorboard`).

While `train` writes a run it holds the run's lock (`RunLock`: an exclusive flock on
`<run>/.lock`, which holds the writer's pid): a second `train` into the same run is refused
naming that pid. The lock dies with its process, so a killed run never blocks the next one.
A fresh run that fails before its first checkpoint leaves nothing: what it created is removed.

A checkpoint is a `Checkpoint`, stored by torch.save as a plain dict of its fields (so a
checkpoint is also a weights file: `model` + `model_config`), the `Preprocess` record among
them. Checkpoints of the first release (no `preprocess`, `scheduler` keys) still load: their
preprocessing is rebuilt from the model config's size and the train config's kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import torch

from microseg.atomic import atomic_path, make_folder
from microseg.config import TrainConfig, load_config, resolve_train_config
from microseg.errors import MicrosegError, OptionError
from microseg.preprocess import REFERENCE_KERNEL_SIZES, Preprocess
from microseg.tables import SUMMARY_ROWS, number, read_csv, write_records
from microseg.torch_files import plain, read_torch_file, require_finite


class RunFolder:
    """The paths of one run folder, and the policy for writing into it."""

    OUTPUTS = ("config.yaml", "calf_stats.json", "history.csv", "last.pt", "best.pt", "metrics", "predictions",
               "tensorboard")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.calf_stats = self.path / "calf_stats.json"
        self.history = self.path / "history.csv"
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self.metrics = self.path / "metrics"
        self.predictions = self.path / "predictions"
        self.tensorboard = self.path / "tensorboard"
        self.per_patient = self.metrics / "per_patient.csv"
        self.per_patient_md = self.metrics / "per_patient.md"
        self.per_slice = self.metrics / "per_slice.csv"
        self.evaluation = self.metrics / "evaluation.json"

    def prepare(self, resume: bool, force: bool) -> None:
        """--resume needs `last.pt`; otherwise refuse an existing run without --force, and with it clear its outputs."""
        if resume:
            if not self.last.is_file():
                raise MicrosegError(f"cannot resume: {self.last} not found")
            return
        existing = [name for name in self.OUTPUTS if (self.path / name).exists()]
        if existing and not force:
            raise MicrosegError(f"run {self.path} already exists ({', '.join(existing)}); use --resume or --force")
        for name in existing:
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def claim(self, resume: bool, force: bool) -> Iterator[None]:
        """Hold the run's lock and apply `prepare` under it while the block writes the run.

        If the block fails before a fresh run has its `last.pt`, the outputs it wrote are removed,
        and so are the folders this call created.
        """
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        make_folder(self.path)
        lock = RunLock(self.path)
        try:
            lock.acquire()
            try:
                self.prepare(resume, force)
            except BaseException:
                lock.release()
                raise
        except BaseException:
            _remove_empty(created)
            raise
        try:
            yield
        except BaseException:
            if not resume and not self.last.exists():
                self._remove_outputs()
            raise
        finally:
            lock.release()
            _remove_empty(created)

    def _remove_outputs(self) -> None:
        for name in self.OUTPUTS:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        write_records(self.history, rows)

    def checkpoint_path(self, which: str = "best") -> Path:
        """`best.pt` (falling back to `last.pt` when training had no validation), or `last.pt`."""
        if not self.path.is_dir():
            raise MicrosegError(f"run folder not found: {self.path}")
        candidates = [self.best, self.last] if which == "best" else [self.last]
        for path in candidates:
            if path.is_file():
                return path
        raise MicrosegError(f"{self.path} holds no checkpoint (expected {' or '.join(p.name for p in candidates)})")


def _remove_empty(folders: list[Path]) -> None:
    """rmdir `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class RunLock:
    """An exclusive, non-blocking flock on `<run>/.lock`; the file holds the holder's pid.

    The kernel drops a flock when its process ends, however it ends, so a stale `.lock` left by a
    killed process is taken over. The holder unlinks the file before it unlocks; a process that
    locked a file since unlinked (it opened it just before) sees another inode at the path and
    tries again.
    """

    NAME = ".lock"

    def __init__(self, run: Path):
        self.run, self.path, self.fd = run, run / self.NAME, None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise MicrosegError(f"run {self.run} is being written by another microseg process (pid {holder}); "
                                    "wait for it to end, or choose another --run") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


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
    accum: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_dsc: float = -1.0
    calf_stats: dict | None = None
    rng: torch.Tensor | None = None

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
        values["preprocess"] = (Preprocess.from_dict(preprocess) if preprocess is not None
                                else _first_release_preprocess(state))
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

    The content is made of plain types (`microseg.torch_files.plain`), so it loads with
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


def load_run_model(run: Path, device: torch.device) -> tuple[torch.nn.Module, Checkpoint, Path]:
    """The run's best (else last) network on `device`, its checkpoint, and the checkpoint's file."""
    path = RunFolder(run).checkpoint_path()
    checkpoint = load_checkpoint(path)
    return checkpoint.build_model(device), checkpoint, path


RESUME_MAY_CHANGE = ("run", "device", "num_workers", "sync_every", "tensorboard")


def resumed_config(run: str, yaml_path: str | None, options: dict[str, Any]) -> TrainConfig:
    """The config a run was started with; options given again must agree with it (bar device, workers)."""
    if not run:
        raise OptionError("`resume` needs `run` RUN: the run folder to continue")
    saved = load_config(RunFolder(run).config)
    explicit = {k: v for k, v in options.items() if v is not None}
    given = resolve_train_config(yaml_path, {"cache": saved.cache, **explicit}).to_dict()
    for key in sorted(set(explicit) - set(RESUME_MAY_CHANGE)):
        if given[key] != getattr(saved, key):
            raise OptionError(f"`{key}` {given[key]} differs from the run's config "
                                f"({getattr(saved, key)}); a resumed run keeps its config")
    return dataclasses.replace(saved, **{k: given[k] for k in RESUME_MAY_CHANGE if k in explicit})


@dataclass
class RunRecord:
    """What `compare` needs of one run folder."""

    name: str
    loss: str
    history: list[dict[str, float]]
    patients: dict[str, dict[str, float]] = field(default_factory=dict)  # case_id -> metric -> value
    slices: list[dict] = field(default_factory=list)  # metrics/per_slice.csv rows
    evaluation: dict = field(default_factory=dict)  # metrics/evaluation.json: data, split, protocol
    path: Path = Path()
    config: dict = field(default_factory=dict)  # config.yaml: model, epochs, cache ...

    @property
    def label(self) -> str:
        """The run's name, with its loss when the name does not already say it."""
        return self.name if self.name == self.loss else f"{self.name} ({self.loss})"


def load_run(run: Path) -> RunRecord:
    """Read a run folder for `compare`; MicrosegError when it is missing or holds no history."""
    folder = RunFolder(run)
    if not folder.path.is_dir():
        raise MicrosegError(f"run folder not found: {folder.path}")
    config = load_config(folder.config)
    if not folder.history.is_file():
        raise MicrosegError(f"{folder.path} has no history.csv: train it first (microseg train --run {folder.path})")
    history = [{k: number(v) for k, v in row.items()} for row in read_csv(folder.history)]
    record = RunRecord(folder.path.name, config.loss, history, path=folder.path, config=config.to_dict())
    if folder.per_patient.is_file():
        for row in read_csv(folder.per_patient):
            if row["case_id"] not in SUMMARY_ROWS:
                record.patients[row["case_id"]] = {k: number(v) for k, v in row.items() if k != "case_id"}
    if folder.per_slice.is_file():
        record.slices = [{k: v if k == "case_id" else number(v) for k, v in row.items()}
                         for row in read_csv(folder.per_slice)]
    if folder.evaluation.is_file():
        record.evaluation = json.loads(folder.evaluation.read_text())
    return record
