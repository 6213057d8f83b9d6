"""Training: slice cache -> augmented batches -> TransUNet -> deep-supervised loss -> checkpoints.

The recipe is the reference one (MicroSegNet): SGD with poly decay
lr_i = lr * (1 - i / max_iter)^0.9 (i = 0-based iteration; torch's PolynomialLR), the plain sum
of the loss at the four output scales. Each epoch appends a row to `history.csv`: the run's own
loss (total and per scale), a common-ruler BCE of the main output (the same yardstick whatever
the loss), validation DSC / HD95 when there is a validation split, the learning rate of the
epoch's last step and the seconds.

Reproducible and resumable: the data order of epoch e is a permutation seeded by (seed, e) and
each item's augmentation is seeded by (seed, e, index), so a run resumed from `last.pt`, even
one saved mid-epoch by Ctrl-C, ends with the same weights as an uninterrupted one (on the CPU).
Multi-GPU through `torchrun` (DistributedDataParallel; only rank 0 writes).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import PolynomialLR
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from microseg.atomic import write_text
from microseg.config import TrainConfig, save_config
from microseg.errors import MicrosegError
from microseg.run import Checkpoint, RunFolder, load_checkpoint, save_checkpoint
from microseg.runtime import Distributed, autocast_context


class NonFiniteLoss(MicrosegError):
    """The loss became NaN or Inf; training stops and keeps the last good checkpoint."""


@dataclass(frozen=True)
class StepLosses:
    """One optimisation step: each head's loss (coarsest first), their weighted total, the main
    output's BCE (the common ruler), and the learning rate the step used."""

    per_scale: tuple[float, ...]
    total: float
    bce: float
    lr: float = math.nan

    def as_tensor(self) -> torch.Tensor:
        """[per-scale..., total, bce] in float64: the layout of the epoch's running sums."""
        return torch.tensor([*self.per_scale, self.total, self.bce], dtype=torch.float64)


def train(config: TrainConfig, resume: bool = False, force: bool = False) -> Path:
    """Train one run as `config` says; returns the run folder."""
    env = Distributed(config.device)
    folder = RunFolder(config.run)
    if env.main:
        folder.prepare(resume, force)
    env.barrier()
    try:
        trainer = Trainer(config, env, resume)
        try:
            for epoch in range(trainer.epoch, config.epochs):
                trainer.run_epoch(epoch)
        except KeyboardInterrupt:
            trainer.save_interrupted()
            raise
    finally:
        env.close()
    return folder.path


def train_step(forward, criterion, optimizer, scaler, batch, device, config: TrainConfig) -> StepLosses:
    """One optimisation step on `batch` (forward, deep-supervised loss, backward, optimizer step)."""
    image = batch["image"].to(device, non_blocking=True)
    expert = batch["expert"].to(device, non_blocking=True)
    non_expert = batch["non_expert"].to(device, non_blocking=True)
    if config.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    lr = optimizer.param_groups[0]["lr"]
    with autocast_context(device, config.amp):
        out = forward(image)
        result = criterion(out.logits, out.aux, expert, non_expert)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(result.total).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(out.logits.float(), expert)
    values = torch.cat([result.per_scale.detach().float(), result.total.detach().float()[None], bce[None]]).tolist()
    return StepLosses(tuple(values[:-2]), values[-2], values[-1], lr)


class Trainer:
    """One run's model, loss, optimizer, schedule, data and position (epoch, step, history)."""

    def __init__(self, config: TrainConfig, env: Distributed, resume: bool):
        from microseg.data.cache import read_cache_info
        from microseg.data.dataset import SliceDataset, split_by_patient

        self.config, self.env, self.folder = config, env, RunFolder(config.run)
        self.device = env.device
        loaded = load_checkpoint(self.folder.last) if resume else None
        self.info = read_cache_info(Path(config.cache))
        if loaded is not None and loaded.preprocess.size != self.info.size:
            size = loaded.preprocess.size
            raise MicrosegError(f"cache {config.cache} holds {self.info.size} px slices but run {config.run} was "
                                f"trained at {size} px; prepare a cache with --size {size}")
        self.preprocess = loaded.preprocess if loaded is not None else config.preprocess(self.info.size)
        train_idx, val_idx = split_by_patient(Path(config.cache), config.val_fraction, config.seed)
        self._build(train_idx, fresh=loaded is None)
        self.dataset = SliceDataset(Path(config.cache), train_idx, augment=config.augment, seed=config.seed,
                                    intensity_max=self.preprocess.intensity_max)
        self.sampler = DistributedSampler(self.dataset, num_replicas=env.world, rank=env.rank, shuffle=True,
                                          seed=config.seed)
        self.steps_per_epoch = math.ceil(len(self.sampler) / config.batch_size)
        self.scheduler = PolynomialLR(self.optimizer, total_iters=config.epochs * self.steps_per_epoch,
                                      power=config.poly_power)
        self.epoch, self.step, self.history, self.best_dsc = 0, 0, [], -1.0
        self.accum = torch.zeros(self.preprocess.n_scales + 2, dtype=torch.float64)  # per scale, total, BCE
        if loaded is not None:
            self._restore(loaded)
        elif env.main:
            save_config(config, self.folder.config)
        net = self.model
        if env.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(net) if config.compile else net
        self.val_loader = None
        if val_idx and env.main:
            self.val_loader = DataLoader(
                SliceDataset(Path(config.cache), val_idx, augment=False, intensity_max=self.preprocess.intensity_max),
                batch_size=config.batch_size, num_workers=config.num_workers, generator=_loader_generator(config.seed, -1))

    def _build(self, train_idx: list[int], fresh: bool) -> None:
        """Model (seeded), pretrained weights, CALF moments, loss, optimizer and grad scaler."""
        from microseg.data.cache import foreground_areas
        from microseg.losses import DeepSupervision, calf_stats_for, parse_spec
        from microseg.models import build_model
        from microseg.models.weights import format_load_report, load_weights

        config, pre = self.config, self.preprocess
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, img_size=pre.size, deep_supervision=pre.n_scales > 1)
        if config.weights and fresh:
            report = load_weights(self.model, Path(config.weights))
            if self.env.main:
                print(f"weights {config.weights}: {format_load_report(report)}")
        self.calf_stats = None
        if any(term.name == "calf" for term in parse_spec(config.loss)):
            self.calf_stats = calf_stats_for(config.loss, foreground_areas(Path(config.cache))[np.asarray(train_idx)])
            if self.env.main:
                s = self.calf_stats
                print(f"calf: skewness {s.skewness:.3f}, excess kurtosis {s.kurtosis:.3f} -> branch {s.branch}")
                write_text(self.folder.calf_stats, json.dumps(asdict(s), indent=1))
        self.criterion = DeepSupervision(config.loss, kernel_sizes=pre.kernel_sizes, weights=config.ds_weights,
                                         calf_stats=self.calf_stats, target_resize=pre.target_resize)
        self.model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")

    def _restore(self, loaded: Checkpoint) -> None:
        """Continue from a checkpoint: weights, optimizer, scaler, schedule, position and the RNG stream."""
        self.model.load_state_dict(loaded.model)
        self.optimizer.load_state_dict(loaded.optimizer)
        self.scaler.load_state_dict(loaded.scaler)
        self.epoch, self.step = loaded.epoch, loaded.step
        self.history, self.best_dsc, self.accum = loaded.history, loaded.best_dsc, loaded.accum.clone()
        if loaded.scheduler is not None:
            self.scheduler.load_state_dict(loaded.scheduler)
        else:  # a first-release checkpoint: the closed form at its iteration
            iteration = self.epoch * self.steps_per_epoch + self.step
            self.scheduler.last_epoch = iteration
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * (1 - iteration / self.scheduler.total_iters) ** self.scheduler.power
        torch.set_rng_state(loaded.rng)  # dropout continues where it stopped
        if self.env.main:
            print(f"resuming {self.folder.path} at epoch {self.epoch + 1}, step {self.step}")

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch (from `self.step` when resumed mid-epoch), log it and save the checkpoints."""
        config, started = self.config, time.perf_counter()
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        order = list(self.sampler)[self.step * config.batch_size:]
        loader = DataLoader(self.dataset, batch_size=config.batch_size, sampler=order, num_workers=config.num_workers,
                            pin_memory=self.device.type == "cuda", generator=_loader_generator(config.seed, epoch))
        self.model.train()
        bar = tqdm(loader, total=self.steps_per_epoch, initial=self.step, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=None if self.env.main else True, leave=False, dynamic_ncols=True)
        lr = math.nan
        for batch in bar:
            losses = self.train_step(batch)
            if self.env.broadcast_flag(not math.isfinite(losses.total)):
                kept = f"{self.folder.last} keeps epoch {epoch}" if epoch else "no epoch had finished"
                raise NonFiniteLoss(f"loss became {losses.total} at epoch {epoch + 1}, step {self.step + 1}; "
                                    f"stopped ({kept})")
            self.accum += losses.as_tensor()
            self.step += 1
            lr = losses.lr
            bar.set_postfix(loss=f"{self.accum[-2].item() / self.step:.4f}")
        bar.close()
        row = self._epoch_row(epoch, lr, started)
        self.history.append(row)
        self.accum.zero_()
        self.epoch, self.step = epoch + 1, 0
        if self.env.main:
            improved = "val_dsc" in row and row["val_dsc"] > self.best_dsc
            self.best_dsc = max(self.best_dsc, row.get("val_dsc", -1.0))
            self.save(improved)
            self.folder.write_history(self.history)
            print(_format_row(row), flush=True)
        self.env.barrier()
        return row

    def train_step(self, batch: dict) -> StepLosses:
        """One optimisation step, then the schedule's next learning rate."""
        losses = train_step(self.forward, self.criterion, self.optimizer, self.scaler, batch, self.device, self.config)
        self.scheduler.step()
        return losses

    def _epoch_row(self, epoch: int, lr: float, started: float) -> dict[str, Any]:
        """The epoch's history row: mean losses over its steps and ranks, validation, lr, seconds."""
        totals = self.env.sum(self.accum.to(self.device)).cpu() / (self.step * self.env.world)
        n = self.preprocess.n_scales
        row = {"epoch": epoch + 1, "loss": float(totals[-2])}
        row.update({f"loss_{s}": float(v) for s, v in zip(self.preprocess.scale_sizes, totals[:n])})
        row["bce"] = float(totals[-1])
        if self.val_loader is not None:
            row["val_dsc"], row["val_hd95_mm"] = self.validate()
        row["lr"] = lr
        row["seconds"] = round(time.perf_counter() - started, 2)
        return row

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Mean over validation patients of per-slice DSC / HD95 at the cache's size.

        Protocol "all-slices": every slice where the expert or the prediction is non-empty counts, a
        one-sided slice with DSC 0 (so an untrained model that predicts nothing scores 0, not NaN).
        """
        from microseg.metrics import score_case

        self.model.eval()
        preds: dict[str, list[np.ndarray]] = {}
        refs: dict[str, list[np.ndarray]] = {}
        for batch in self.val_loader:
            with autocast_context(self.device, self.config.amp):
                logits = self.model(batch["image"].to(self.device)).logits
            pred = (logits.float() > 0).cpu().numpy()[:, 0]
            for case, p, r in zip(batch["case_id"], pred, batch["expert"].numpy()[:, 0] > 0.5):
                preds.setdefault(case, []).append(p)
                refs.setdefault(case, []).append(r)
        scores = [score_case(np.stack(preds[c]), np.stack(refs[c]), self.info.slice_spacing(c), "all-slices")
                  for c in preds]
        self.model.train()
        dsc = [s.dsc for s in scores if s.n_slices]
        hd = [s.hd95_mm for s in scores if s.n_slices]
        return (float(np.mean(dsc)) if dsc else math.nan, float(np.mean(hd)) if hd else math.nan)

    def checkpoint(self) -> Checkpoint:
        """The run at its current position (epoch, step inside it)."""
        return Checkpoint(
            model=self.model.state_dict(), model_config=asdict(self.model.config), preprocess=self.preprocess,
            train_config=self.config.to_dict(), optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(), scheduler=self.scheduler.state_dict(), epoch=self.epoch,
            step=self.step, accum=self.accum.clone(), history=self.history, best_dsc=self.best_dsc,
            calf_stats=asdict(self.calf_stats) if self.calf_stats is not None else None, rng=torch.get_rng_state(),
        )

    def save(self, improved: bool) -> None:
        checkpoint = self.checkpoint()
        save_checkpoint(checkpoint, self.folder.last)
        if improved:
            save_checkpoint(checkpoint, self.folder.best)

    def save_interrupted(self) -> None:
        """Ctrl-C: keep the position inside the epoch in `last.pt` (rank 0)."""
        if self.env.main:
            save_checkpoint(self.checkpoint(), self.folder.last)
            print(f"interrupted at epoch {self.epoch + 1}, step {self.step}: saved {self.folder.last}; "
                  "continue with --resume")


def _loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader's own generator: without one, each loader draws its worker seed from the global
    RNG, which would shift the dropout stream of a run resumed mid-epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _format_row(row: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
