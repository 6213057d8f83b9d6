"""Training helpers: the tiny run's settings, a tiny training, and Trainers whose hooks inject faults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from microseg.runs.config import resolve_train_config
from microseg.training.trainer import Trainer, train

TINY_TRAIN = dict(
    model="tiny", epochs=2, batch_size=4, optimizer="adam", lr=3e-3, val_fraction=0.34, num_workers=0, seed=7
)


def tiny_train_argv(cache: Path, run: Path, *options: str) -> list[str]:
    """`microseg train` arguments: the tiny model, one epoch, no loader workers, `cache` into `run`;
    `options` come last (argparse keeps the last of a repeated option)."""
    tiny = ["--model", "tiny", "--epochs", "1", "--num-workers", "0"]
    return ["train", "--cache", str(cache), "--run", str(run), *tiny, *options]


def train_tiny(cache: Path, run: Path, trainer: type[Trainer] | None = None, **options) -> Path:
    """Train the tiny run (TINY_TRAIN, `options` win) on `cache` into `run`, with `trainer` if given."""
    return train(
        resolve_train_config(None, dict(TINY_TRAIN, cache=str(cache), run=str(run), **options)), trainer=trainer
    )


class NaNAt(torch.nn.Module):
    """The run's deep-supervised loss, NaN (reported and back-propagated) at its `at`-th training step."""

    def __init__(self, loss: torch.nn.Module, at: int | None, seen: dict):
        super().__init__()
        self.loss, self.at, self.seen = loss, at, seen
        self.sample_stat_keys = loss.sample_stat_keys

    def forward(self, *args, **kwargs):
        result = self.loss(*args, **kwargs)
        self.seen["steps"] += 1
        if self.seen["steps"] != self.at:
            return result
        nan = torch.tensor(float("nan"))
        return dataclasses.replace(result, total=result.total * nan, per_scale=result.per_scale * nan)


class CtrlCAt:
    """The training loader, with Ctrl-C (KeyboardInterrupt) pressed instead of its `at`-th batch (over epochs)."""

    def __init__(self, loader, at: int | None, seen: dict):
        self.loader, self.at, self.seen = loader, at, seen

    def __iter__(self):
        for batch in self.loader:
            self.seen["batches"] += 1
            if self.seen["batches"] == self.at:
                raise KeyboardInterrupt
            yield batch


def faulty_trainer(nan_at: int | None = None, ctrl_c_at: int | None = None) -> tuple[type[Trainer], dict]:
    """A Trainer whose loss is NaN at training step `nan_at` and whose loader is interrupted before batch
    `ctrl_c_at` (both counted from 1 over the run); the dict counts the steps and batches seen."""
    seen = {"steps": 0, "batches": 0}

    class Faulty(Trainer):
        def build_loss(self, train_idx):
            return NaNAt(super().build_loss(train_idx), nan_at, seen)

        def build_loaders(self, train_idx, val_idx):
            super().build_loaders(train_idx, val_idx)
            self.loader = CtrlCAt(self.loader, ctrl_c_at, seen)

    return Faulty, seen


def train_until_ctrl_c(cache: Path, run: Path, at_call: int, **options) -> None:
    """Train the tiny run with Ctrl-C pressed before its `at_call`-th training step."""
    import pytest

    with pytest.raises(KeyboardInterrupt):
        train_tiny(cache, run, trainer=faulty_trainer(ctrl_c_at=at_call)[0], **options)
