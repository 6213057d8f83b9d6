"""A run's network as a predictor of native slices, in slabs, with the run's own preprocessing.

Each slab is predicted as the run was trained (its checkpoint's `Preprocess`): the slice is
resized as the cache resizes it, intensity / intensity_max; the probability map is brought back to
the native slice size on the device (the run's `prediction_resize`, bilinear by default, or the
reference's nearest when asked) and thresholded at 0.5 by `binary`. A run's models are loaded under
evaluate's checks (`checked_runs`: its lock held, its checkpoint trusted, its cache's sources
unchanged); several runs predict as their ensemble (`microseg.inference.ensemble`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from microseg.core.preprocess import Preprocess, resize_image, resize_prediction, scale_intensity
from microseg.core.runtime import autocast_context
from microseg.inference.ensemble import load_ensemble
from microseg.runs.checkpoint import RunModel, load_run_model
from microseg.runs.folder import RunFolder

SLAB = 4
"""Slices read, predicted (one forward) and scored at a time: 4 native 962 x 1372 slices are 5 MB per
uint8 volume and 21 MB of float32 probabilities; about three slabs are in flight."""


Predictor = Callable[[np.ndarray], torch.Tensor]
"""A uint8 slab [n,H,W] (0..intensity_max) -> its probabilities [n,H,W] at the native size (float32,
on the model's device); thresholded at 0.5 by the caller, so that several can be averaged first."""


def slab_predictor(model: torch.nn.Module, preprocess: Preprocess, amp: str | None = None) -> Predictor:
    """The run's network as a `Predictor`: each slice resized as the cache resizes it, intensity /
    intensity_max, one forward for the slab (under inference_mode and `amp` autocast),
    the probability map back to the native size on the device (the run's `prediction_resize`)."""
    device = next(model.parameters()).device
    size, resize = preprocess.size, preprocess.prediction_resize
    model.eval()

    @torch.inference_mode()
    def probabilities(slab: np.ndarray) -> torch.Tensor:
        chunk = np.stack([resize_image(s, size) for s in slab])
        x = scale_intensity(torch.from_numpy(chunk).to(device), preprocess.intensity_max)[:, None]
        with autocast_context(device, amp):
            logits = model(x).logits
        return resize_prediction(torch.sigmoid(logits.float()), slab.shape[1:], resize)[:, 0]

    return probabilities


def binary(predict: Predictor, slab: np.ndarray) -> np.ndarray:
    """The bool prediction [n,H,W] of a slab: probability > 0.5."""
    return (predict(slab) > 0.5).cpu().numpy()


def predict_volume(
    model: torch.nn.Module,
    volume: np.ndarray,
    device: torch.device,
    preprocess: Preprocess,
    batch_size: int = SLAB,
    amp: str | None = None,
) -> np.ndarray:
    """Binary prediction [Z,H,W] of a uint8 volume [Z,H,W] (0..intensity_max), `batch_size` slices at a time."""
    predict = slab_predictor(model.to(device), preprocess, amp)
    out = np.empty(volume.shape, dtype=bool)
    for start in range(0, len(volume), batch_size):
        out[start : start + batch_size] = binary(predict, volume[start : start + batch_size])
    return out


def run_predictor(run: str | Path | tuple[Path, ...], device: str, resize: str | None) -> tuple[Predictor, Preprocess]:
    """The `Predictor` of a run (or of a tuple of runs: their ensemble) on `device`, at the training's
    precision, and its preprocessing."""
    if isinstance(run, tuple):
        model, preprocess, members = load_ensemble(run, device, resize)
        return slab_predictor(model, preprocess, members[0].amp), preprocess
    loaded = load_run_model(run, device, resize)
    return slab_predictor(loaded.model, loaded.preprocess, loaded.amp), loaded.preprocess


@contextlib.contextmanager
def checked_runs(
    runs: Sequence[str | Path], device: str = "auto", resize: str | None = None, source_check: bool = True
) -> Iterator[list[RunModel]]:
    """The runs' models (a run, or an ensemble's members) loaded under evaluate's checks, each run's
    lock held for the block: its checkpoint (best.pt, else last.pt) exists; its lock is free
    (refused, naming the pid, while `train` or another evaluate writes it); the checkpoint passes
    `load_checkpoint`'s trust checks; with `source_check`, the source files of its training cache,
    when the cache is on disk, are unchanged since the cache was prepared (`check_sources`)."""
    from microseg.data.cache import check_sources

    folders = [RunFolder(r) for r in runs]
    for folder in folders:
        folder.checkpoint_path()  # the run folder and a checkpoint exist before its lock is taken
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(folder.locked())
        members = [load_run_model(folder.path, device, resize) for folder in folders]
        for member in members:
            cache = Path(str(member.checkpoint.train_config.get("cache", "")))
            if source_check and cache.is_file():
                check_sources(cache)
        yield members


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
