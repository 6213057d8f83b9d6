"""A run's inputs: the files its config names, read and checked once, before a run folder is created.

`train_inputs` opens the slice cache (its slice size must be one the model takes, a multiple of
the encoder stride; its sources unchanged since `prepare`, unless --no-source-check), splits its
patients into training and validation slices (`microseg.data.dataset.split_by_patient`) and
resolves a fresh run's `--weights` to a readable weights file; its loss spec is parsed once (a
`microseg.losses.LossSpec`: the loss and its training-set statistics are built from it). The result, a `TrainInputs`, is
what `train` checks and what the Trainer trains from: nothing of it is read or decided again.
Each refusal is one MicrosegError line naming the option; a batch larger than the training split
is legitimate but suspicious: one warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from microseg.core.errors import OptionError
from microseg.core.preprocess import SIZE_MULTIPLE
from microseg.runs.config import TrainConfig

if TYPE_CHECKING:
    from microseg.data.cache import CacheInfo
    from microseg.losses import LossSpec


@dataclass(frozen=True)
class TrainInputs:
    """What a run trains from: its config, whether it continues its `last.pt`, the cache's
    description, the slice indices of its training and validation patients, the weights file a
    fresh run starts from (None: none given, or resumed), its parsed loss spec, and the warnings
    to show."""

    config: TrainConfig
    resume: bool
    cache: CacheInfo
    train_idx: list[int]
    val_idx: list[int]
    weights: Path | None
    loss: LossSpec
    warnings: tuple[str, ...] = ()


def train_inputs(c: TrainConfig, resume: bool) -> TrainInputs:
    """The inputs `c` names, each checked (the cache, its split, a fresh run's weights); see the module."""
    from microseg.data.cache import check_sources, read_cache_info
    from microseg.data.dataset import split_by_patient
    from microseg.losses import LossSpec
    from microseg.models.pretrained import resolve_weights
    from microseg.models.weights import check_weights_file

    info = read_cache_info(Path(c.cache))
    if info.size % SIZE_MULTIPLE:
        lower = max(SIZE_MULTIPLE, info.size // SIZE_MULTIPLE * SIZE_MULTIPLE)
        raise OptionError(
            f"cache {c.cache} holds {info.size} px slices, which no model takes (a multiple of "
            f"{SIZE_MULTIPLE} is needed): prepare it again with `size` {lower} or "
            f"{lower + SIZE_MULTIPLE}"
        )
    if c.source_check:
        check_sources(c.cache)
    weights = check_weights_file(resolve_weights(c.weights)) if c.weights and not resume else None
    train_idx, val_idx = split_by_patient(Path(c.cache), c.val_fraction, c.seed, c.patients, c.val_patients)
    warnings: tuple[str, ...] = ()
    if c.batch_size > len(train_idx):
        warnings = (
            f"--batch-size {c.batch_size} is larger than the {len(train_idx)} training slices of {c.cache}: "
            f"every step sees the whole training split",
        )
    return TrainInputs(c, resume, info, train_idx, val_idx, weights, LossSpec.parse(c.loss), warnings)
