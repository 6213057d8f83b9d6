"""An ensemble of runs: their probability maps averaged before thresholding.

p(x) = (1 / n) sum_i sigmoid(f_i(x)), as nnU-Net ensembles its cross-validation folds (Isensee et
al., "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation",
2021). `Ensemble` is a network like any run's: its output logits are logit(p) (in float64, so
that the sigmoid evaluation applies gives p back), so every prediction path (resize back to
native size, threshold at 0.5, scoring) treats it as a single run. The members must share their
preprocessing (size, intensity scale, resize rules, kernels): their maps must be on one grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from microseg.core.errors import MicrosegError
from microseg.core.preprocess import Preprocess
from microseg.models.transunet import SegOutput
from microseg.runs.checkpoint import RunModel, load_run_model


class Ensemble(torch.nn.Module):
    """Several networks, one output: the logit of their mean probability."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> SegOutput:
        p = torch.stack([torch.sigmoid(m(x).logits.double()) for m in self.members]).mean(0)
        return SegOutput(torch.logit(p))


def check_members(runs: Sequence[str | Path]) -> None:
    """MicrosegError unless `runs` are at least two distinct runs."""
    if len(runs) < 2:
        raise MicrosegError("--ensemble needs at least two runs")
    if len({Path(r).resolve() for r in runs}) < len(runs):
        raise MicrosegError("--ensemble names a run twice")


def ensemble_of(runs: Sequence[str | Path], members: Sequence[RunModel]) -> tuple[torch.nn.Module, Preprocess]:
    """The loaded `members` of `runs` as one Ensemble and their common Preprocess; refuses members
    trained on other grids."""
    for run, member in zip(runs, members, strict=True):
        if member.preprocess != members[0].preprocess:
            first, this = dataclasses.asdict(members[0].preprocess), dataclasses.asdict(member.preprocess)
            key = next(k for k in first if first[k] != this[k])
            raise MicrosegError(
                f"--ensemble: {run} was trained with {key} {this[key]}, {runs[0]} with "
                f"{first[key]}: ensemble members must share their preprocessing"
            )
    return Ensemble([m.model for m in members]).eval(), members[0].preprocess


def load_ensemble(
    runs: Sequence[str | Path], device: str = "auto", resize: str | None = None
) -> tuple[torch.nn.Module, Preprocess, list[RunModel]]:
    """The runs' networks (best.pt, else last.pt, each) as one Ensemble on `device`, their common
    Preprocess (`resize` replacing the prediction resize), and each member (`ensemble_of`)."""
    check_members(runs)
    members = [load_run_model(run, device, resize) for run in runs]
    return *ensemble_of(runs, members), members
