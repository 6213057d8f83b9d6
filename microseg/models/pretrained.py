"""Pretrained encoder weights by name: the one command that fetches and verifies them.

``R50-ViT-B_16`` is the ImageNet-21k R50+ViT-B/16 hybrid that TransUNet and MicroSegNet start from:
- ``--source hub`` (default): timm's pretrained config of ``vit_base_r50_s16_224.orig_in21k`` names
  its Hugging Face Hub repo; huggingface_hub fetches ``model.safetensors`` (honouring
  HF_HUB_OFFLINE, HF_HOME and its local cache), and the file's sha256 is checked against the hub's
  LFS object id (the name of the cached blob). Written as ``weights/R50-ViT-B_16.safetensors``.
- ``--source npz``: Google's ``R50+ViT-B_16.npz`` from the ViT release by URL (resumable), written
  as ``weights/R50+ViT-B_16.npz``; no checksum is published for it.
Either file is then loaded into the model it is for (``microseg.models.weights.load_weights``): it
must fill every encoder tensor, or it is refused. Files are written under a temporary name and
renamed only once verified.

The files live in weights/ (or ``$MICROSEG_WEIGHTS``). ``resolve_weights`` turns ``train --weights
R50-ViT-B_16`` into the file in the weights folder, or says the command that fetches it; it never
touches the network. The loaders (``microseg.models.weights``) take the path it returns.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from microseg.core.atomic import atomic_path
from microseg.core.errors import MicrosegError, OptionError

WEIGHTS_DIR_ENV = "MICROSEG_WEIGHTS"
DEFAULT_WEIGHTS_DIR = "weights"
HUB_FILE = "model.safetensors"
SOURCES = ("hub", "npz")


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


def hub_repo(tag: str) -> str:
    """The Hugging Face Hub repo of a timm pretrained tag, from timm's own pretrained config."""
    import timm

    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None or not cfg.hf_hub_id:
        raise MicrosegError(f"timm {timm.__version__} has no hub weights for '{tag}'")
    return cfg.hf_hub_id


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def fetch_from_hub(tag: str) -> Path:
    """``model.safetensors`` of ``tag``'s hub repo in the local HF cache (downloaded unless offline), sha256-checked."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo = hub_repo(tag)
    try:
        cached = Path(hf_hub_download(repo, HUB_FILE))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "no network"
        raise MicrosegError(
            f"cannot reach the Hugging Face Hub for {repo} ({why}) and {HUB_FILE} is not in "
            f"the local cache {constants.HF_HUB_CACHE}"
        ) from None
    except HfHubHTTPError as err:
        raise MicrosegError(f"Hugging Face Hub, {repo}/{HUB_FILE}: {str(err).splitlines()[0]}") from None
    blob = cached.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):  # an LFS file: the blob is named by its sha256
        actual = sha256(blob)
        if actual != blob.name:
            raise MicrosegError(
                f"{cached}: sha256 {actual} does not match the hub's {blob.name}; "
                f"delete it from the cache and fetch again"
            )
        print(f"sha256 ok: {blob.name} ({repo})")
    return cached


def verify_weights(spec: PretrainedSpec, path: Path) -> str:
    """Load ``path`` into a fresh ``spec.model`` TransUNet; refuse it unless every encoder tensor is filled."""
    from microseg.models.transunet import build_model  # the network here: resolving a name needs no timm
    from microseg.models.weights import format_load_report, load_weights

    report = load_weights(build_model(spec.model), path)
    missing = [key for key in report.missing if key.startswith("encoder.")]
    if missing:
        raise MicrosegError(
            f"{path}: incomplete {spec.name} weights: {len(missing)} encoder tensors missing (first: {missing[0]})"
        )
    return format_load_report(report)


def download_weights(
    name: str, out: str | os.PathLike | None = None, source: str = "hub", progress: bool | None = None
) -> Path:
    """Fetch, verify and write the named weights into the weights folder; returns the file."""
    from microseg.core.http import ResumableDownloader, partial_path

    spec = SPECS.get(name)
    if spec is None:
        raise MicrosegError(f"unknown weights '{name}'; known: {', '.join(SPECS)}")
    if source not in SOURCES:
        raise OptionError(f"`source` {source!r} is not one of {', '.join(SOURCES)}")
    target = weights_dir(out) / (spec.hub_file if source == "hub" else spec.npz_file)
    if source == "hub":
        cached = fetch_from_hub(spec.hub_tag)
    with atomic_path(target) as tmp:
        if source == "hub":
            shutil.copyfile(cached, tmp)
        else:
            print(f"fetching {spec.npz_url}")
            ResumableDownloader(partial_path(target), progress=progress)(spec.npz_url, str(tmp), None)
        print(f"verified: {verify_weights(spec, tmp)}")
    print(f"wrote {target}")
    return target
