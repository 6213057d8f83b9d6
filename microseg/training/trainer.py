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
from torch import nn
from torch.optim.lr_scheduler import PolynomialLR
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from microseg.core.atomic import copy_file, write_text
from microseg.core.errors import MicrosegError, OptionError, warn
from microseg.core.runtime import Distributed, ProcessStopped, autocast_context, configure_speed, resolve_amp
from microseg.core.stop import StopSignals, stop_signals
from microseg.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from microseg.runs.config import TrainConfig, check_train_inputs, save_config
from microseg.runs.folder import RunFolder
from microseg.training.monitor import LossMonitor, NonFiniteLoss
from microseg.training.step import ModelWithLoss, StepLosses, compile_step, train_step

if TYPE_CHECKING:
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
    warnings = check_train_inputs(config, resume)  # before anything is created
    env = Distributed(config.device)
    check_processes(config, env)
    for line in warnings if env.main else ():
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
            session = (trainer or Trainer)(config, env, resume, interrupts)
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


def build_loader(
    dataset: Dataset,
    config: TrainConfig,
    device: torch.device,
    sampler: Sampler | None = None,
    seed_offset: int = 0,
    batch_sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader (batches of the config's size, or `batch_sampler`'s) whose workers persist across
    epochs, pinned on CUDA, with its own seeded generator."""
    batches = (
        {"batch_sampler": batch_sampler}
        if batch_sampler is not None
        else {"batch_size": config.batch_size, "sampler": sampler}
    )
    return DataLoader(
        dataset,
        **batches,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=_loader_generator(config.seed, seed_offset),
    )


class Trainer:
    """One run's model, loss, optimizer, schedule, data and position (epoch, step, history)."""

    model: TransUNet
    criterion: DeepSupervision
    optimizer: torch.optim.Optimizer
    loader: DataLoader | None  # None once closed
    val_loader: DataLoader | None  # None without a validation split, and on ranks other than 0
    overlay: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # TensorBoard's (image, expert, prediction)
    history: list[dict[str, Any]]

    def __init__(self, config: TrainConfig, env: Distributed, resume: bool, interrupts: StopSignals | None = None):
        config = dataclasses.replace(config, amp=resolve_amp(config.amp, env.device) or "none")  # saved resolved
        self.config, self.env, self.folder = config, env, RunFolder(config.run)
        self.device, self.interrupts = env.device, interrupts or StopSignals()
        with env.together():  # a failure on any rank (a checkpoint it cannot read, rank 0's writes) reaches all
            self._setup(resume)
        if env.world > 1 and config.sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # in place: the same module and parameters
        step: nn.Module = ModelWithLoss(self.model, self.criterion)
        if env.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            step = nn.parallel.DistributedDataParallel(step, device_ids=ids)
        self.step_fn = compile_step(step) if config.compile else step

    def _setup(self, resume: bool) -> None:
        """Everything but the processes' common model: data, model, loss, optimizer, schedule, position."""
        from microseg.data.cache import read_cache_info
        from microseg.data.dataset import split_by_patient

        config, env = self.config, self.env
        loaded = load_checkpoint(self.folder.last) if resume else None
        self.info = read_cache_info(Path(config.cache))
        if loaded is not None and loaded.preprocess.size != self.info.size:
            size = loaded.preprocess.size
            raise MicrosegError(
                f"cache {config.cache} holds {self.info.size} px slices but run {config.run} was "
                f"trained at {size} px; prepare a cache with --size {size}"
            )
        self.preprocess = loaded.preprocess if loaded is not None else config.preprocess(self.info.size)
        train_idx, val_idx = split_by_patient(
            Path(config.cache), config.val_fraction, config.seed, config.patients, config.val_patients
        )
        self._build(train_idx, fresh=loaded is None)
        self.build_loaders(train_idx, val_idx)
        self.board = self._open_board(loaded)
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
            shares = sorted({len(range(r, config.batch_size, env.world)) for r in range(env.world)}, reverse=True)
            per = f", {' or '.join(map(str, shares))} per process" if env.world > 1 else ""
            print(
                f"{env.world} process(es) on {self.device.type}: global batch {config.batch_size}{per}, "
                f"{self.steps_per_epoch} steps per epoch, amp {config.amp}",
                flush=True,
            )

    def _open_board(self, loaded: Checkpoint | None) -> TrainingBoard | None:
        """The TensorBoard writer (rank 0, with --tensorboard), continuing at the checkpoint's position."""
        if self.config.tensorboard is None or not self.env.main:
            return None
        from microseg.training.tensorboard import TrainingBoard

        log_dir = Path(self.config.tensorboard) if self.config.tensorboard else self.folder.tensorboard
        return TrainingBoard(
            log_dir, purge_step=None if loaded is None else loaded.epoch * self.steps_per_epoch + loaded.step + 1
        )

    def build_loaders(self, train_idx: list[int], val_idx: list[int]) -> None:
        """Hook: the training loader (persistent workers, (epoch, index) sampler) and the validation one (rank 0)."""
        from microseg.data.dataset import SliceDataset
        from microseg.data.order import EpochItems, EpochSampler

        config, cache = self.config, Path(self.config.cache)
        self.dataset = SliceDataset(
            cache, train_idx, augment=config.augment, seed=config.seed, intensity_max=self.preprocess.intensity_max
        )
        self.sampler = EpochSampler(self.dataset, self.env.world, self.env.rank, config.seed, config.batch_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.loader = build_loader(EpochItems(self.dataset), config, self.device, batch_sampler=self.sampler)
        self.val_loader, self.overlay_index, self.overlay = None, 0, None
        if val_idx and self.env.main:
            from microseg.data.cache import foreground_areas

            val = SliceDataset(cache, val_idx, augment=False, intensity_max=self.preprocess.intensity_max)
            self.val_loader = build_loader(val, config, self.device, seed_offset=-1)
            self.overlay_index = int(np.argmax(foreground_areas(cache)[np.asarray(val_idx)]))

    def _build(self, train_idx: list[int], fresh: bool) -> None:
        """Model, loss, optimizer and grad scaler, from the hooks below."""
        self.model = self.build_model(fresh)
        self.criterion = self.build_loss(train_idx)
        self.optimizer = self.build_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.config.amp == "fp16")

    def build_model(self, fresh: bool) -> TransUNet:
        """Hook: the network (seeded), with the pretrained weights on a fresh run, on the device."""
        from microseg.models import build_model
        from microseg.models.pretrained import resolve_weights
        from microseg.models.weights import format_load_report, load_weights

        config, pre = self.config, self.preprocess
        torch.manual_seed(config.seed)
        model = build_model(config.model, img_size=pre.size, deep_supervision=pre.n_scales > 1)
        if config.weights and fresh:
            report = load_weights(model, resolve_weights(config.weights))
            if self.env.main:
                print(f"weights {config.weights}: {format_load_report(report)}")
        model.to(self.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def build_loss(self, train_idx: list[int]) -> DeepSupervision:
        """Hook: the deep-supervised loss, given the training-set statistics it declares (saved with the run)."""
        from microseg.data.cache import foreground_areas
        from microseg.losses import DeepSupervision, LossSpec, dataset_statistics

        config, pre = self.config, self.preprocess
        spec = LossSpec.parse(config.loss)  # once: the statistics and every scale's loss take the parsed spec
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
        """Continue from a checkpoint: weights, optimizer, scaler, schedule, position and the epoch's loss
        sums (rank 0 holds them; the others start at zero), on any number of processes."""
        optimizer, scaler, accum = loaded.optimizer, loaded.scaler, loaded.accum
        if optimizer is None or scaler is None or accum is None:  # as `resumed_config`, for a direct `train` call
            raise MicrosegError(f"cannot resume from {self.folder.last}: a weights-only or damaged checkpoint")
        self.model.load_state_dict(loaded.model)
        self.optimizer.load_state_dict(optimizer)
        self.scaler.load_state_dict(scaler)
        self.epoch, self.step = loaded.epoch, loaded.step
        self.history, self.best_dsc = loaded.history, loaded.best_dsc
        counted = loaded.accum_count if loaded.accum_count is not None else float(loaded.step)  # earlier: 1 process
        if self.env.main:
            self.monitor.restart(accum.to(self.device), self.step, counted)
        else:
            self.monitor.restart(None, self.step)
        iteration = self.epoch * self.steps_per_epoch + self.step
        if loaded.scheduler is not None:
            self.scheduler.load_state_dict(loaded.scheduler)
        else:  # a first-release checkpoint: the closed form at its iteration
            self.scheduler.last_epoch = iteration
            for group in self.optimizer.param_groups:
                group["lr"] = self._poly_lr(iteration, group["initial_lr"])
        # the last step's lr: the epoch's history row needs it even when none of its steps is left
        self.lr = loaded.last_lr if loaded.last_lr is not None else self._poly_lr(iteration - 1)
        if self.env.main:
            world = f" (written by {loaded.world_size} process(es))" if loaded.world_size != self.env.world else ""
            print(f"resuming {self.folder.path} at epoch {self.epoch + 1}, step {self.step}{world}")

    def _poly_lr(self, iteration: int, initial: float | None = None) -> float:
        """The poly schedule's closed form at 0-based `iteration`: lr (1 - i / max_iter)^power (NaN before
        the first step); for checkpoints that did not record their last lr (an earlier release's)."""
        if iteration < 0:
            return math.nan
        initial = self.optimizer.param_groups[0]["initial_lr"] if initial is None else initial
        return initial * (1 - iteration / self.scheduler.total_iters) ** self.scheduler.power

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch (from `self.step` when resumed mid-epoch), log it and save the checkpoints."""
        config, started = self.config, time.perf_counter()
        if epoch != self.epoch or self.step == 0:
            self.monitor.restart(None, 0)
        self.epoch = epoch
        self.sampler.set_position(epoch, self.step)
        self.model.train()
        bar = tqdm(
            self.loader,
            total=self.steps_per_epoch,
            initial=self.step,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=None if self.env.main else True,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            with self.interrupts.deferred():  # Ctrl-C waits for the step (and its check) to end
                self.advance(batch)
                if self.monitor.full:
                    self.check(bar)
        if self.monitor.count:
            self.check(bar)
        bar.close()
        losses = self._epoch_losses()
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
        self._seed_step()
        weight = self.sampler.weight(self.step)
        losses = self.train_step(batch)
        self.monitor.add(losses.as_tensor(self.device), weight)
        self.step += 1
        self.lr = losses.lr

    def _seed_step(self) -> None:
        """Dropout's random stream for this process at (epoch, step), seeded by (seed, rank, epoch, step):
        each process draws its own masks, and a resumed run the same masks as an uninterrupted one,
        with no generator state to save (CPU and this process's GPU)."""
        seed = int(
            np.random.SeedSequence([self.config.seed, self.env.rank, self.epoch, self.step]).generate_state(1)[0]
        )
        torch.random.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def train_step(self, batch: dict) -> StepLosses:
        """One optimisation step, then the schedule's next learning rate."""
        losses = train_step(
            self.step_fn,
            self.optimizer,
            self.scaler,
            batch,
            self.device,
            self.config,
            self.criterion.sample_stat_keys,
            self.sampler.weight(self.step),
        )
        self.scheduler.step()
        return losses

    def check(self, bar: tqdm | None = None) -> None:
        """The host read of the losses since the last check: stop on a non-finite one (any rank), else
        show the running loss (progress bar, TensorBoard). The ranks share their sums here (one
        all_reduce with the NaN flag), so that rank 0 alone can save a position with all of them."""
        first_step, steps = self.monitor.start + 1, self.monitor.start + self.monitor.count
        found = self.monitor.read()
        local = torch.cat(
            [
                torch.tensor([float(found.first_bad_step is not None), self.monitor.counted], dtype=torch.float64),
                found.sums,
            ]
        )
        shared = self.env.sum(local.clone())
        self.monitor.offset = shared[2:] - found.sums
        self.monitor.counted_offset = float(shared[1]) - self.monitor.counted
        if shared[0] > 0:
            where = (
                f"became {found.bad_value} at epoch {self.epoch + 1}, step {found.first_bad_step}"
                if found.first_bad_step is not None
                else f"became non-finite on another rank in epoch {self.epoch + 1}"
            )
            kept = f"{self.folder.last} keeps epoch {self.epoch}" if self.epoch else "no epoch had finished"
            raise NonFiniteLoss(
                f"loss {where} (found at the check of steps {first_step}-{steps}, every "
                f"--sync-every {self.config.sync_every}); stopped ({kept})"
            )
        if bar is not None:
            bar.set_postfix(loss=f"{found.epoch_mean:.4f}")
        if self.board is not None:
            self.board.running(found.window_mean, self.lr, self.epoch * self.steps_per_epoch + steps)

    def _epoch_losses(self) -> torch.Tensor:
        """The epoch's mean losses [per scale..., total, bce] over its steps and processes (a collective)."""
        counted = torch.tensor([self.monitor.counted], dtype=torch.float64)
        shared = self.env.sum(torch.cat([self.monitor.sums.cpu(), counted]))
        return shared[:-1] / shared[-1]

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

    @torch.inference_mode()
    def validate(self, loader: DataLoader) -> tuple[float, float]:
        """Mean over `loader`'s validation patients of per-slice DSC / HD95 at the cache's size, in the training's
        precision (autocast as `--amp`).

        Protocol "all-slices": every slice where the expert or the prediction is non-empty counts, a
        one-sided slice with DSC 0 (so an untrained model that predicts nothing scores 0, not NaN).
        Keeps (image, expert, prediction) of the validation slice with the largest expert area in
        `self.overlay` (TensorBoard's image).
        """
        from microseg.metrics import score_case

        self.model.eval()
        preds: dict[str, list[np.ndarray]] = {}
        refs: dict[str, list[np.ndarray]] = {}
        seen = 0
        for batch in loader:
            with autocast_context(self.device, self.config.amp):
                logits = self.model(batch["image"].to(self.device, non_blocking=True)).logits
            pred = (logits.float() > 0).cpu().numpy()[:, 0]
            expert = batch["expert"].numpy()[:, 0] > 0.5
            for case, p, r in zip(batch["case_id"], pred, expert, strict=True):
                preds.setdefault(case, []).append(p)
                refs.setdefault(case, []).append(r)
            if seen <= self.overlay_index < seen + len(pred):
                i = self.overlay_index - seen
                self.overlay = (batch["image"][i, 0].numpy(), expert[i], pred[i])
            seen += len(pred)
        scores = [
            score_case(np.stack(preds[c]), np.stack(refs[c]), self.info.slice_spacing(c), "all-slices") for c in preds
        ]
        self.model.train()
        dsc = [s.dsc for s in scores if s.n_slices]
        hd = [s.hd95_mm for s in scores if s.n_slices]
        return (float(np.mean(dsc)) if dsc else math.nan, float(np.mean(hd)) if hd else math.nan)

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
        """Ctrl-C: rank 0 keeps its position inside the epoch in `last.pt`, with no collective (the other
        processes may have stopped anywhere), unless its losses since the last check hold a
        non-finite one (then `last.pt` stays as it was). A second Ctrl-C waits for the write."""
        if not self.env.main:
            return
        with self.interrupts.deferred(reraise=False):
            found = self.monitor.read() if self.monitor.count else None
            if found is not None and found.first_bad_step is not None:
                print(
                    f"interrupted: loss became {found.bad_value} at epoch {self.epoch + 1}, step "
                    f"{found.first_bad_step}; {self.folder.last} not updated"
                )
                return
            save_checkpoint(self.checkpoint(), self.folder.last)
            print(
                f"interrupted at epoch {self.epoch + 1}, step {self.step}: saved {self.folder.last}; "
                "continue with --resume",
                flush=True,
            )

    def close(self) -> None:
        """Stop the loaders' persistent workers and flush TensorBoard."""
        self.loader = self.val_loader = None
        if self.board is not None:
            self.board.close()


def _loader_generator(seed: int, offset: int) -> torch.Generator:
    """A DataLoader's own generator: without one, each loader draws its worker seed from the global
    RNG, which would shift the dropout stream of a run resumed mid-epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + offset)


def _format_row(row: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
