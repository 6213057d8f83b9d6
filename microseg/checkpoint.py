"""Run folders and checkpoints: atomic saves, clear errors, rebuilding the model they hold.

A run folder `runs/<name>/` holds `config.yaml`, `history.csv`, `last.pt`, `best.pt`,
`metrics/` and `predictions/`. A checkpoint is a dict with at least `model` (state dict)
and `model_config` (the resolved ModelConfig as a dict), so it rebuilds its own network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from microseg.atomic import atomic_path
from microseg.errors import MicrosegError


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; MicrosegError when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MicrosegError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt file
        raise MicrosegError(f"cannot read checkpoint {path}: {type(err).__name__}") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise MicrosegError(f"{path} is not a microseg checkpoint (no model / model_config)")
    return state


def run_checkpoint(run: Path, which: str = "best") -> Path:
    """The run's `best.pt` (falls back to `last.pt` when training had no validation) or `last.pt`."""
    run = Path(run)
    if not run.is_dir():
        raise MicrosegError(f"run folder not found: {run}")
    candidates = [run / "best.pt", run / "last.pt"] if which == "best" else [run / "last.pt"]
    for path in candidates:
        if path.is_file():
            return path
    raise MicrosegError(f"{run} holds no checkpoint (expected {' or '.join(p.name for p in candidates)})")


def model_from_checkpoint(state: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (strictly)."""
    from microseg.models import ModelConfig, build_model

    model = build_model(ModelConfig.from_dict(state["model_config"]))
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise MicrosegError(
            f"checkpoint does not fit its model config: {len(missing)} missing, {len(unexpected)} unexpected tensors"
        )
    return model.to(device).eval()
