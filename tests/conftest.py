"""Shared fixtures: a small phantom dataset, its slice cache and a trained tiny run (built once)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TRAIN = dict(model="tiny", epochs=2, batch_size=4, optimizer="adam", lr=3e-3, val_fraction=0.34, num_workers=0, seed=7)


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> Path:
    from microseg.data.phantom import simulate_dataset

    return simulate_dataset(tmp_path_factory.mktemp("phantom"), n_train=3, n_test=2, n_slices=6, size=(64, 96), seed=3)


@pytest.fixture(scope="session")
def cache(phantom, tmp_path_factory) -> Path:
    from microseg.prepare import prepare_cache

    return prepare_cache(phantom, tmp_path_factory.mktemp("cache") / "cache.h5", size=32)


def train_tiny(cache: Path, run: Path, **options) -> Path:
    from microseg.config import resolve_train_config
    from microseg.train import train

    return train(resolve_train_config(None, dict(TINY_TRAIN, cache=str(cache), run=str(run), **options)))


def train_until_ctrl_c(cache: Path, run: Path, monkeypatch, at_call: int, **options) -> None:
    """Train the tiny run with Ctrl-C pressed at the `at_call`-th training step, then restore the step."""
    from microseg.train import Trainer

    real_step, calls = Trainer.train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(cache, run, **options)
    monkeypatch.setattr(Trainer, "train_step", real_step)


@pytest.fixture(scope="session")
def trained_run(cache, tmp_path_factory) -> Path:
    return train_tiny(cache, tmp_path_factory.mktemp("runs") / "tiny_af")
