"""Named pretrained encoders, and where their files live: weights/ (or ``$MICROSEG_WEIGHTS``).

``resolve_weights`` turns ``train --weights R50-ViT-B_16`` into the file in the weights folder,
or says the command that fetches it (``microseg.pretrained``); it never touches the network.
The loaders (``microseg.models.weights``) take the path it returns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from microseg.errors import MicrosegError

WEIGHTS_DIR_ENV = "MICROSEG_WEIGHTS"
DEFAULT_WEIGHTS_DIR = "weights"


@dataclass(frozen=True)
class PretrainedSpec:
    """A named pretrained encoder: the model config it initialises and where each source keeps it."""

    name: str
    model: str  # microseg model config
    hub_tag: str  # timm pretrained tag
    hub_file: str  # file name in weights/ for the hub source
    npz_url: str
    npz_file: str  # file name in weights/ for the npz source


SPECS = {
    "R50-ViT-B_16": PretrainedSpec(
        "R50-ViT-B_16",
        "R50-ViT-B_16",
        "vit_base_r50_s16_224.orig_in21k",
        "R50-ViT-B_16.safetensors",
        "https://storage.googleapis.com/vit_models/imagenet21k/R50%2BViT-B_16.npz",
        "R50+ViT-B_16.npz",
    ),
}


def weights_dir(folder: str | os.PathLike | None = None) -> Path:
    """The weights folder: ``folder``, else $MICROSEG_WEIGHTS, else ./weights."""
    return Path(folder or os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)


def resolve_weights(name_or_path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """An existing file as given, or a known name's file in the weights folder; else one clear error."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    spec = SPECS.get(str(name_or_path))
    if spec is None:
        raise MicrosegError(f"weights file not found: {path} (or a name: {', '.join(SPECS)})")
    folder = weights_dir(folder)
    for file in (spec.hub_file, spec.npz_file):
        if (folder / file).is_file():
            return folder / file
    raise MicrosegError(
        f"weights '{spec.name}' not found in {folder}/; fetch them with: "
        f"microseg download weights {spec.name} --out {folder}"
    )
