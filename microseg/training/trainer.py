"""Training: slice cache -> augmented batches -> TransUNet -> deep-supervised loss -> checkpoints.

The config's recipe (`microseg.runs.recipes`, recorded in `config.yaml`) sets the defaults; the
optimisation is MicroSegNet's by default: SGD with poly decay lr_i = lr * (1 - i / max_iter)^0.9
(i = 0-based iteration; torch's PolynomialLR), the plain sum of the loss at the four output
scales. The loss declares the statistics it needs from the data (`microseg.losses.base`): the
training set's, computed before training and saved with the run, and each slice's patient's
(`sample_stats`), carried by every batch from the cache. Each epoch appends a row to `history.csv`: the run's own
loss (total and per scale), a common-ruler BCE of the main output (the same yardstick whatever
the loss), validation DSC / HD95 when there is a validation split, the learning rate of the
epoch's last step and the seconds.

No host synchronisation in a step: the losses stay on the device (`LossMonitor` sums them there)
and are read back every `sync_every` steps and at the epoch's end. That read is the NaN / Inf
guard: a non-finite loss found there stops training, names the step where it appeared, and
leaves `last.pt` at the last completed epoch. It also updates the progress bar and, with
`--tensorboard`, the running loss (`microseg.training.tensorboard`). The loader's workers persist
across epochs (the epoch travels with each index: `microseg.data.order`), pinned on CUDA, where
the optimizer step is fused.

Reproducible and resumable: the data order of epoch e is a permutation seeded by (seed, e), each
item's augmentation is seeded by (seed, e, index) and dropout's random stream at each step by
(seed, process, e, step), so a run resumed from `last.pt`, even one saved mid-epoch by Ctrl-C,
ends with the same weights as an uninterrupted one (on the CPU). A Ctrl-C that arrives inside a
step takes effect at its end, so the position saved is always a step boundary.

What the run trains from is resolved once before anything is created (`microseg.runs.inputs`:
the cache, its patient split, the weights file) and handed to the `Trainer`, whose hooks build
the model, loss, optimizer and loaders; the loaders (`microseg.training.loaders`), validation
(`microseg.training.validation`) and the Ctrl-C checkpoint and its restore
(`microseg.training.checkpoints`) live in their own modules.

Multi-GPU through `torchrun` (DistributedDataParallel; only rank 0 writes). `--batch-size` is the
global batch, split over the processes (`microseg.data.order`): the schedule, the position and
the slices each step sees do not depend on the number of processes, and a run resumes on
another one. The epoch's losses are summed over processes, each step weighted by its process's
share of the batch. On Ctrl-C rank 0 saves its position without any collective (the other
processes may be stopped anywhere); its loss sums then hold every process's up to the last check
and its own after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.optim.lr_scheduler import PolynomialLR
from tqdm import tqdm

from microseg.core.atomic import copy_file, write_text
from microseg.core.errors import OptionError, warn
from microseg.core.runtime import Distributed, ProcessStopped, configure_speed, resolve_amp
from microseg.core.stop import StopSignals, stop_signals
from microseg.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from microseg.runs.config import TrainConfig, save_config
from microseg.runs.folder import RunFolder
from microseg.runs.inputs import TrainInputs, train_inputs
from microseg.training.checkpoints import check_cache_size, restore_optimisation, restore_sums, save_interrupted
from microseg.training.loaders import build_training_data
from microseg.training.monitor import LossMonitor, NonFiniteLoss
from microseg.training.step import StepLosses, seed_step, step_function, train_step
from microseg.training.validation import Overlay, score_validation

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from microseg.losses import DeepSupervision
    from microseg.models import TransUNet
    from microseg.training.tensorboard import TrainingBoard


def train(
    config: TrainConfig,
    resume: bool = False,
    force: bool = False,
    trainer: type[Trainer] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train one run as `config` says (with `trainer`, a `Trainer` subclass whose hooks build something else);
    returns the run folder. `on_epoch` gets each epoch's history row once it is saved (rank 0)."""
    inputs = train_inputs(config, resume)  # before anything is created
    env = Distributed(config.device)
    check_processes(config, env)
    for line in inputs.warnings if env.main else ():
        warn(line)
    folder = RunFolder(config.run)
    configure_speed(env.device, config.deterministic)
    with contextlib.ExitStack() as claimed, stop_signals((signal.SIGINT,)) as interrupts:
        env.start()
        failed = True
        try:
            with env.together():  # rank 0 takes the run's lock: a refusal reaches every rank
                if env.main:
                    claimed.enter_context(folder.claim(resume, force))
            session = (trainer or Trainer)(inputs, env, interrupts)
            _run_epochs(session, config.epochs, env, interrupts, on_epoch)
            failed = False
        except RuntimeError as err:
            if not env.lost_peer(err):
                raise
            if interrupts.pending:
                raise interrupts.interrupted() from None
            raise ProcessStopped(
                f"another process of this {env.world}-process run stopped (the connection to it "
                f"was lost; its own message says why); process {env.rank} stops too"
            ) from None
        finally:
            env.close(failed)
    return folder.path


def _run_epochs(
    session: Trainer,
    epochs: int,
    env: Distributed,
    interrupts: StopSignals,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> None:
    """The session's epochs up to `epochs`, each row to `on_epoch` (rank 0); the position saved on a
    Ctrl-C, or on a lost peer while a stop is pending; the session closed whatever happens."""
    try:
        for epoch in range(session.epoch, epochs):
            row = session.run_epoch(epoch)
            if on_epoch is not None and env.main:
                on_epoch(row)
    except KeyboardInterrupt:
        session.save_interrupted()
        raise
    except RuntimeError as err:  # a collective broke: Ctrl-C reached another process first?
        if env.lost_peer(err) and interrupts.pending:
            session.save_interrupted()
        raise
    finally:
        session.close()


def check_processes(config: TrainConfig, env: Distributed) -> None:
    """Options that depend on the number of processes, refused before any process waits on another."""
    if config.batch_size < env.world:
        raise OptionError(
            f"`batch_size` {config.batch_size} is the global batch (all processes together): it "
            f"must be at least the {env.world} processes"
        )
    if config.sync_bn and env.world > 1 and env.device.type != "cuda":
        raise OptionError("`sync_bn` needs CUDA devices (torch's SyncBatchNorm runs on GPUs only)")


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or Adam, fused: one kernel for all parameters (on the CPU 4x
    faster than torch's default loop for the demo model; on CUDA no host read of the grad
    scaler's inf check)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=True
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


class Trainer:
    """One run's model, loss, optimizer, schedule, data and position (epoch, step, history), trained
    from the inputs `train` resolved; the hooks build_model, build_loss, build_optimizer and
    build_loaders build its parts (a subclass builds something else)."""

    model: TransUNet
    criterion: DeepSupervision
    optimizer: torch.optim.Optimizer
    loader: DataLoader | None  # None once closed
    val_loader: DataLoader | None  # None without a validation split, and on ranks other than 0
    overlay: Overlay | None  # TensorBoard's validation slice
    history: list[dict[str, Any]]

    def __init__(self, inputs: TrainInputs, env: Distributed, interrupts: StopSignals | None = None):
        amp = resolve_amp(inputs.config.amp, env.device) or "none"
        config = dataclasses.replace(inputs.config, amp=amp)  # saved resolved
        self.config, self.inputs, self.env, self.folder = config, inputs, env, RunFolder(config.run)
        self.device, self.interrupts = env.device, interrupts or StopSignals()
        with env.together():  # a failure on any rank (a checkpoint it cannot read, rank 0's writes) reaches all
            self._setup()
        self.step_fn = step_function(self.model, self.criterion, env, config)

    def _setup(self) -> None:
        """Everything but the processes' common model: data, model, loss, optimizer, schedule, position."""
        config, env, inputs = self.config, self.env, self.inputs
        loaded = load_checkpoint(self.folder.last) if inputs.resume else None
        if loaded is not None:
            check_cache_size(loaded, inputs.cache, config)
        self.preprocess = loaded.preprocess if loaded is not None else config.preprocess(inputs.cache.size)
        self._build(inputs.train_idx, fresh=loaded is None)
        self.build_loaders(inputs.train_idx, inputs.val_idx)
        purge = None if loaded is None else loaded.epoch * self.steps_per_epoch + loaded.step + 1
        self.board = _open_board(config, self.folder, purge) if env.main else None
        self.scheduler = PolynomialLR(
            self.optimizer, total_iters=config.epochs * self.steps_per_epoch, power=config.poly_power
        )
        self.epoch, self.step, self.history, self.best_dsc, self.lr = 0, 0, [], -1.0, math.nan
        self.monitor = LossMonitor(self.preprocess.n_scales + 2, config.sync_every, self.device)
        if loaded is not None:
            self._restore(loaded)
        elif env.main:
            save_config(config, self.folder.config)
        if env.main:
            print(_processes_line(config, env, self.steps_per_epoch), flush=True)

    def build_loaders(self, train_idx: list[int], val_idx: list[int]) -> None:
        """Hook: the training loader (persistent workers, (epoch, index) sampler) and the validation one
        (rank 0), as `microseg.training.loaders` builds them."""
        data = build_training_data(self.config, train_idx, val_idx, self.preprocess.intensity_max, self.env)
        self.sampler, self.loader, self.val_loader = data.sampler, data.loader, data.val_loader
        self.steps_per_epoch, self.overlay_index, self.overlay = self.sampler.steps_per_epoch, data.overlay_index, None

    def _build(self, train_idx: list[int], fresh: bool) -> None:
        """Model, loss, optimizer and grad scaler, from the hooks below."""
        self.model = self.build_model(fresh)
        self.criterion = self.build_loss(train_idx)
        self.optimizer = self.build_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.config.amp == "fp16")

    def build_model(self, fresh: bool) -> TransUNet:
        """Hook: the network (seeded), with the pretrained weights on a fresh run, on the device."""
        from microseg.models import build_model
        from microseg.models.weights import format_load_report, load_weights

        config, pre = self.config, self.preprocess
        torch.manual_seed(config.seed)
        model = build_model(config.model, img_size=pre.size, deep_supervision=pre.n_scales > 1)
        if fresh and self.inputs.weights is not None:
            report = load_weights(model, self.inputs.weights)
            if self.env.main:
                print(f"weights {config.weights}: {format_load_report(report)}")
        model.to(self.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def build_loss(self, train_idx: list[int]) -> DeepSupervision:
        """Hook: the deep-supervised loss, given the training-set statistics it declares (saved with the run)."""
        from microseg.data.cache import foreground_areas
        from microseg.losses import DeepSupervision, dataset_statistics

        config, pre, spec = self.config, self.preprocess, self.inputs.loss  # the spec `train_inputs` parsed
        self.loss_stats = dataset_statistics(spec, lambda: foreground_areas(config.cache)[np.asarray(train_idx)])
        if self.loss_stats is not None and self.env.main:
            print(self.loss_stats.summary())
            write_text(self.folder.calf_stats, json.dumps(asdict(self.loss_stats), indent=1))
        return DeepSupervision(
            spec,
            kernel_sizes=pre.kernel_sizes,
            weights=config.ds_weights,
            dataset_stats=self.loss_stats,
            target_resize=pre.target_resize,
        )

    def build_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Hook: the optimizer of `params` (`build_optimizer`: SGD or Adam, fused)."""
        return build_optimizer(self.config, params)

    def _restore(self, loaded: Checkpoint) -> None:
        """Continue from a checkpoint (`microseg.training.checkpoints`): weights, optimizer, scaler,
        schedule, position and the epoch's loss sums, on any number of processes."""
        self.lr = restore_optimisation(
            loaded, self.folder.last, self.model, self.optimizer, self.scaler, self.scheduler, self.steps_per_epoch
        )
        self.epoch, self.step, self.history, self.best_dsc = loaded.epoch, loaded.step, loaded.history, loaded.best_dsc
        restore_sums(loaded, self.monitor, self.env.main)
        if self.env.main:
            world = f" (written by {loaded.world_size} process(es))" if loaded.world_size != self.env.world else ""
            print(f"resuming {self.folder.path} at epoch {self.epoch + 1}, step {self.step}{world}")

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch (from `self.step` when resumed mid-epoch), log it and save the checkpoints."""
        started = time.perf_counter()
        if epoch != self.epoch or self.step == 0:
            self.monitor.restart(None, 0)
        self.epoch = epoch
        self.sampler.set_position(epoch, self.step)
        self.model.train()
        bar = _progress_bar(self.loader, self.steps_per_epoch, self.step, epoch, self.config.epochs, self.env.main)
        for batch in bar:
            with self.interrupts.deferred():  # Ctrl-C waits for the step (and its check) to end
                self.advance(batch)
                if self.monitor.full:
                    self.check(bar)
        if self.monitor.count:
            self.check(bar)
        bar.close()
        losses = self.monitor.epoch_means(self.env.sum)
        with self.env.together():  # rank 0 validates and writes; its failure reaches every rank
            row = self._epoch_row(epoch, losses, self.lr, started)
            self.history.append(row)
            self.monitor.restart(None, 0)
            self.epoch, self.step = epoch + 1, 0
            if self.env.main:
                improved = "val_dsc" in row and row["val_dsc"] > self.best_dsc
                self.best_dsc = max(self.best_dsc, row.get("val_dsc", -1.0))
                self.save(improved)
                self.folder.write_history(self.history)
                if self.board is not None:
                    self.board.epoch(row, self.overlay)
                print(_format_row(row), flush=True)
        return row

    def advance(self, batch: dict) -> None:
        """One step, its losses added to the monitor on the device (no host read)."""
        seed_step(self.config.seed, self.env.rank, self.epoch, self.step, self.device)
        weight = self.sampler.weight(self.step)
        losses = self.train_step(batch)
        self.monitor.add(losses.as_tensor(self.device), weight)
        self.step += 1
        self.lr = losses.lr

    def train_step(self, batch: dict) -> StepLosses:
        """One optimisation step, then the schedule's next learning rate."""
        keys, weight = self.criterion.sample_stat_keys, self.sampler.weight(self.step)
        losses = train_step(self.step_fn, self.optimizer, self.scaler, batch, self.device, self.config, keys, weight)
        self.scheduler.step()
        return losses

    def check(self, bar: tqdm | None = None) -> None:
        """The host read of the losses since the last check, shared by the processes
        (`LossMonitor.read_shared`): stop on a non-finite one (any rank), else show the running loss
        (progress bar, TensorBoard)."""
        window = range(self.monitor.start + 1, self.monitor.start + self.monitor.count + 1)
        found, non_finite = self.monitor.read_shared(self.env.sum)
        if non_finite:
            raise NonFiniteLoss.found(found, self.epoch, window, self.config.sync_every, self.folder.last)
        if bar is not None:
            bar.set_postfix(loss=f"{found.epoch_mean:.4f}")
        if self.board is not None:
            self.board.running(found.window_mean, self.lr, self.epoch * self.steps_per_epoch + window[-1])

    def _epoch_row(self, epoch: int, totals: torch.Tensor, lr: float, started: float) -> dict[str, Any]:
        """The epoch's history row: mean losses, validation (rank 0), lr, seconds."""
        n = self.preprocess.n_scales
        row = {"epoch": epoch + 1, "loss": float(totals[-2])}
        row.update({f"loss_{s}": float(v) for s, v in zip(self.preprocess.scale_sizes, totals[:n], strict=True)})
        row["bce"] = float(totals[-1])
        if self.val_loader is not None:
            row["val_dsc"], row["val_hd95_mm"] = self.validate(self.val_loader)
        row["lr"] = lr
        row["seconds"] = round(time.perf_counter() - started, 2)
        return row

    def validate(self, loader: DataLoader) -> tuple[float, float]:
        """Mean DSC / HD95 over `loader`'s validation patients (`microseg.training.validation`); keeps
        TensorBoard's slice in `self.overlay`."""
        scores = score_validation(
            self.model, loader, self.device, self.config.amp, self.inputs.cache.slice_spacing, self.overlay_index
        )
        self.overlay = scores.overlay
        return scores.dsc, scores.hd95_mm

    def checkpoint(self) -> Checkpoint:
        """The run at its current position (epoch, step inside it), with the processes and global batch."""
        accum, counted = self.monitor.position_sums()
        return Checkpoint(
            model=self.model.state_dict(),
            model_config=asdict(self.model.config),
            preprocess=self.preprocess,
            train_config=self.config.to_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            scheduler=self.scheduler.state_dict(),
            epoch=self.epoch,
            step=self.step,
            accum=accum,
            accum_count=counted,
            history=self.history,
            best_dsc=self.best_dsc,
            calf_stats=asdict(self.loss_stats) if self.loss_stats is not None else None,
            world_size=self.env.world,
            global_batch=self.config.batch_size,
            last_lr=None if math.isnan(self.lr) else self.lr,
        )

    def save(self, improved: bool) -> None:
        """`last.pt`, and `best.pt` when validation improved: the same bytes, serialised once."""
        save_checkpoint(self.checkpoint(), self.folder.last)
        if improved:
            copy_file(self.folder.last, self.folder.best)

    def save_interrupted(self) -> None:
        """Ctrl-C: rank 0 keeps its position inside the epoch in `last.pt` (`microseg.training.checkpoints`),
        with no collective; a second Ctrl-C waits for the write."""
        if self.env.main:
            with self.interrupts.deferred(reraise=False):
                save_interrupted(self.checkpoint, self.monitor, self.folder.last, self.epoch, self.step)

    def close(self) -> None:
        """Stop the loaders' persistent workers now and flush TensorBoard. A failed epoch's traceback
        holds the loader's iterator: left to the garbage collector, its workers would outlive the
        run and their shutdown then wait 5 s for each."""
        for loader in (self.loader, self.val_loader):
            workers = getattr(loader, "_iterator", None)  # DataLoader's, set while workers persist
            if workers is not None:
                workers._shutdown_workers()
        self.loader = self.val_loader = None
        if self.board is not None:
            self.board.close()


def _open_board(config: TrainConfig, folder: RunFolder, purge_step: int | None) -> TrainingBoard | None:
    """The TensorBoard writer with --tensorboard (rank 0's), continuing at `purge_step` (a resumed run's)."""
    if config.tensorboard is None:
        return None
    from microseg.training.tensorboard import TrainingBoard

    log_dir = Path(config.tensorboard) if config.tensorboard else folder.tensorboard
    return TrainingBoard(log_dir, purge_step=purge_step)


def _progress_bar(loader: Any, steps: int, step: int, epoch: int, epochs: int, main: bool) -> tqdm:
    """The epoch's progress bar (rank 0's), from `step` of `steps`."""
    return tqdm(
        loader,
        total=steps,
        initial=step,
        desc=f"epoch {epoch + 1}/{epochs}",
        disable=None if main else True,
        leave=False,
        dynamic_ncols=True,
    )


def _processes_line(config: TrainConfig, env: Distributed, steps_per_epoch: int) -> str:
    """What trains: the processes and their device, the global batch (and each process's share), the
    steps per epoch and the precision."""
    shares = sorted({len(range(r, config.batch_size, env.world)) for r in range(env.world)}, reverse=True)
    per = f", {' or '.join(map(str, shares))} per process" if env.world > 1 else ""
    return (
        f"{env.world} process(es) on {env.device.type}: global batch {config.batch_size}{per}, "
        f"{steps_per_epoch} steps per epoch, amp {config.amp}"
    )


def _format_row(row: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
