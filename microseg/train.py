"""Training: slice cache -> augmented batches -> TransUNet -> deep-supervised loss -> checkpoints.

The recipe is the reference one (FACTS.md): SGD with poly decay
lr_i = lr * (1 - i / max_iter)^0.9 (i = 0-based iteration), the plain sum of the loss at the
four output scales. Each epoch appends a row to `history.csv`: the run's own loss (total and
per scale), a common-ruler BCE of the main output (the same yardstick whatever the loss),
validation DSC / HD95 when there is a validation split, the learning rate and the seconds.

Reproducible and resumable: the data order of epoch e is a permutation seeded by (seed, e) and
each item's augmentation is seeded by (seed, e, index), so a run resumed from `last.pt`, even
one saved mid-epoch by Ctrl-C, ends with the same weights as an uninterrupted one (on the CPU).
Multi-GPU through `torchrun` (DistributedDataParallel; only rank 0 writes).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from microseg.atomic import write_text
from microseg.checkpoint import load_checkpoint, save_checkpoint
from microseg.config import TrainConfig, load_config, save_config
from microseg.errors import MicrosegError

RUN_FILES = ("config.yaml", "calf_stats.json", "history.csv", "last.pt", "best.pt", "metrics", "predictions")


class NonFiniteLoss(MicrosegError):
    """The loss became NaN or Inf; training stops and keeps the last good checkpoint."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MicrosegError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MicrosegError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast_context(device: torch.device, amp: str | None):
    """bf16 autocast on CPU or GPU; fp16 on GPU only (with a grad scaler); none when amp is None."""
    if amp is None:
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise MicrosegError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float) -> float:
    """Poly decay of the reference: base_lr * (1 - iteration / max_iter) ** power."""
    return base_lr * (1.0 - iteration / max_iter) ** power


class Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_name)
        if self.device.type == "cuda" and self.device.index is None and self.world > 1:
            self.device = torch.device("cuda", local_rank)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(values)
        return values

    def broadcast_flag(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def prepare_run_folder(run: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run without --force; with --force, clear its outputs."""
    existing = [name for name in RUN_FILES if (run / name).exists()]
    if resume:
        if not (run / "last.pt").is_file():
            raise MicrosegError(f"cannot resume: {run / 'last.pt'} not found")
        return
    if existing and not force:
        raise MicrosegError(f"run {run} already exists ({', '.join(existing)}); use --resume or --force")
    for name in existing:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    run.mkdir(parents=True, exist_ok=True)


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def train(config: TrainConfig, resume: bool = False, force: bool = False) -> Path:
    """Train one run as `config` says; returns the run folder."""
    from microseg.data.cache import foreground_areas, read_cache_info
    from microseg.data.dataset import SliceDataset, split_by_patient
    from microseg.losses import DeepSupervision, calf_stats, parse_spec
    from microseg.models import build_model
    from microseg.models.weights import format_load_report, load_weights

    run = Path(config.run)
    env = Distributed(config.device)
    if env.main:
        prepare_run_folder(run, resume, force)
    env.barrier()
    state = load_checkpoint(run / "last.pt") if resume else None
    info = read_cache_info(Path(config.cache))
    if state is not None and state["model_config"]["img_size"] != info.size:
        raise MicrosegError(
            f"cache {config.cache} holds {info.size} px slices but run {run} was trained at "
            f"{state['model_config']['img_size']} px; prepare a cache with --size {state['model_config']['img_size']}"
        )
    train_idx, val_idx = split_by_patient(Path(config.cache), config.val_fraction, config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, img_size=info.size, deep_supervision=config.deep_supervision)
    if config.weights and state is None:
        report = load_weights(model, Path(config.weights))
        if env.main:
            print(f"weights {config.weights}: {format_load_report(report)}")

    stats = None
    if any(term.name == "calf" for term in parse_spec(config.loss)):
        stats = calf_stats(foreground_areas(Path(config.cache))[np.asarray(train_idx)])
    n_scales = len(config.ds_kernel_sizes) if config.deep_supervision else 1
    criterion = DeepSupervision(
        config.loss, kernel_sizes=config.ds_kernel_sizes[-n_scales:], weights=config.ds_weights[-n_scales:], calf_stats=stats
    )
    if stats is not None and env.main:
        print(f"calf: skewness {stats.skewness:.3f}, excess kurtosis {stats.kurtosis:.3f} -> branch {stats.branch}")
        write_text(run / "calf_stats.json", json.dumps(asdict(stats), indent=1))

    device = env.device
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")

    dataset = SliceDataset(Path(config.cache), train_idx, augment=config.augment, seed=config.seed)
    sampler = DistributedSampler(dataset, num_replicas=env.world, rank=env.rank, shuffle=True, seed=config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    max_iter = config.epochs * steps_per_epoch

    start_epoch, start_step, history, best_dsc = 0, 0, [], -1.0
    accum = torch.zeros(n_scales + 2, dtype=torch.float64)  # per-scale losses, total, common BCE
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = state["epoch"], state["step"]
        history, best_dsc = state["history"], state["best_dsc"]
        accum = state["accum"].clone()
        torch.set_rng_state(state["rng"])  # dropout continues where it stopped
        if env.main:
            print(f"resuming {run} at epoch {start_epoch + 1}, step {start_step}")
    elif env.main:
        save_config(config, run / "config.yaml")

    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(net) if config.compile else net
    val_loader = None
    if val_idx and env.main:
        val_loader = DataLoader(SliceDataset(Path(config.cache), val_idx, augment=False), batch_size=config.batch_size,
                                num_workers=config.num_workers, generator=_loader_generator(config.seed, -1))

    def checkpoint(epoch: int, step: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step, "accum": accum.clone(), "history": history, "best_dsc": best_dsc,
            "model_config": asdict(model.config), "train_config": config.to_dict(),
            "calf_stats": asdict(stats) if stats is not None else None, "rng": torch.get_rng_state(),
        }

    scale_names = [f"loss_{s}" for s in _scale_sizes(info.size, n_scales)]
    epoch, step = start_epoch, start_step
    try:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            order = list(sampler)[step * config.batch_size:]
            loader = DataLoader(dataset, batch_size=config.batch_size, sampler=order, num_workers=config.num_workers,
                                pin_memory=device.type == "cuda", generator=_loader_generator(config.seed, epoch))
            model.train()
            bar = tqdm(loader, total=steps_per_epoch, initial=step, desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=None if env.main else True, leave=False, dynamic_ncols=True)
            for batch in bar:
                lr = poly_lr(config.lr, epoch * steps_per_epoch + step, max_iter, config.poly_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                values = _train_step(forward, criterion, optimizer, scaler, batch, device, config)
                if not env.broadcast_flag(not math.isfinite(values[-2])):
                    accum += torch.tensor(values, dtype=torch.float64)
                    step += 1
                    bar.set_postfix(loss=f"{accum[-2].item() / step:.4f}")
                    continue
                kept = f"{run / 'last.pt'} keeps epoch {epoch}" if epoch else "no epoch had finished"
                raise NonFiniteLoss(f"loss became {values[-2]} at epoch {epoch + 1}, step {step + 1}; stopped ({kept})")
            bar.close()
            totals = env.sum(accum.to(device)).cpu() / (step * env.world)
            row = {"epoch": epoch + 1, "loss": float(totals[-2])}
            row.update({name: float(v) for name, v in zip(scale_names, totals[:n_scales])})
            row["bce"] = float(totals[-1])
            if val_loader is not None:
                row["val_dsc"], row["val_hd95_mm"] = validate(model, val_loader, device, info, config.amp)
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - started, 2)
            history.append(row)
            accum.zero_()
            step = 0
            if env.main:
                improved = "val_dsc" in row and row["val_dsc"] > best_dsc
                best_dsc = max(best_dsc, row.get("val_dsc", -1.0))
                state = checkpoint(epoch + 1, 0)
                save_checkpoint(state, run / "last.pt")
                if improved:
                    save_checkpoint(state, run / "best.pt")
                write_history(history, run / "history.csv")
                print(_format_row(row), flush=True)
            env.barrier()
    except KeyboardInterrupt:
        if env.main:
            save_checkpoint(checkpoint(epoch, step), run / "last.pt")
            print(f"interrupted at epoch {epoch + 1}, step {step}: saved {run / 'last.pt'}; continue with --resume")
        raise
    finally:
        env.close()
    return run


def _train_step(forward, criterion, optimizer, scaler, batch, device, config) -> list[float]:
    """One optimisation step; returns [per-scale losses..., total, common-ruler BCE] as floats."""
    image = batch["image"].to(device, non_blocking=True)
    expert = batch["expert"].to(device, non_blocking=True)
    non_expert = batch["non_expert"].to(device, non_blocking=True)
    if config.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    with autocast_context(device, config.amp):
        out = forward(image)
        result = criterion(out.logits, out.aux if config.deep_supervision else (), expert, non_expert)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(result.total).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(out.logits.float(), expert)
    return torch.cat([result.per_scale.detach().float(), result.total.detach().float()[None], bce[None]]).tolist()


@torch.no_grad()
def validate(model, loader, device, info, amp) -> tuple[float, float]:
    """Mean over validation patients of per-slice DSC / HD95 at the cache's size.

    Protocol "all-slices": every slice where the expert or the prediction is non-empty counts, a
    one-sided slice with DSC 0 (so an untrained model that predicts nothing scores 0, not NaN).
    """
    from microseg.metrics import score_case

    model.eval()
    preds: dict[str, list[np.ndarray]] = {}
    refs: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        with autocast_context(device, amp):
            logits = model(batch["image"].to(device)).logits
        pred = (logits.float() > 0).cpu().numpy()[:, 0]
        for case, p, r in zip(batch["case_id"], pred, batch["expert"].numpy()[:, 0] > 0.5):
            preds.setdefault(case, []).append(p)
            refs.setdefault(case, []).append(r)
    scores = [score_case(np.stack(preds[c]), np.stack(refs[c]), info.slice_spacing(c), "all-slices") for c in preds]
    model.train()
    dsc = [s.dsc for s in scores if s.n_slices]
    hd = [s.hd95_mm for s in scores if s.n_slices]
    return (float(np.mean(dsc)) if dsc else float("nan"), float(np.mean(hd)) if hd else float("nan"))


def _loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader's own generator: without one, each loader draws its worker seed from the global
    RNG, which would shift the dropout stream of a run resumed mid-epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _scale_sizes(size: int, n_scales: int) -> list[int]:
    """Output sizes coarsest first: size/8, size/4, size/2, size for four scales."""
    return [size // 2 ** (n_scales - 1 - i) for i in range(n_scales)]


def _format_row(row: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


RESUME_MAY_CHANGE = ("run", "device", "num_workers")


def resume_overrides(run: str, yaml_path: str | None, options: dict[str, Any]) -> TrainConfig:
    """The config a run was started with; options given again must agree with it (bar device, workers)."""
    from microseg.config import resolve_config

    saved = load_config(Path(run) / "config.yaml")
    explicit = {k: v for k, v in options.items() if v is not None}
    given = resolve_config(yaml_path, {"cache": saved.cache, **explicit}).to_dict()
    for key in sorted(set(explicit) - set(RESUME_MAY_CHANGE)):
        if given[key] != getattr(saved, key):
            raise MicrosegError(f"--{key.replace('_', '-')} {given[key]} differs from the run's config "
                                f"({getattr(saved, key)}); a resumed run keeps its config")
    return dataclasses.replace(saved, **{k: given[k] for k in RESUME_MAY_CHANGE if k in explicit})
