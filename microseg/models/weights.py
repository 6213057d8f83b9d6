"""Load weights into a TransUNet from local files only (nothing is ever downloaded).

Formats, told apart by suffix and content:
- `npz`: Google's ViT/hybrid checkpoints (`R50+ViT-B_16.npz`, the file TransUNet and MicroSegNet
  start from). Names and layout as timm's `vision_transformer._load_weights` reads them:
  convs HWIO -> OIHW, dense (in, out) -> (out, in), query/key/value (D, heads, d) fused into
  timm's qkv, out (heads, d, D) -> (D, heads * d), GroupNorm/LayerNorm vectors flattened.
  timm's loader itself copies in place, cannot tell what a file lacks, and cannot fit the
  file's 1 + 14 * 14 position table (class token first) to our class-token-free encoder, so the
  name map is reproduced here and every tensor goes through the common checks below.
- `safetensors` / `state_dict`: a timm encoder state dict (keys `patch_embed.backbone...`,
  `blocks.N...`) or a whole TransUNet state dict.
- `checkpoint`: microseg's own checkpoint, `{"model": state_dict, "model_config": asdict(config)}`.

Every tensor's shape is checked before anything is copied (a mismatch raises MicrosegError naming
the key and both shapes). Position tables of another grid are resized bilinearly, a class-token
row dropped as the reference TransUNet does: the `google` variant with timm's
`resample_abs_pos_embed` (half-pixel centres, align_corners=False), the `port` variant as the
TransUNet port does, scipy.ndimage.zoom(order=1), which samples output i at input
i * (old - 1) / (new - 1): bilinear with align_corners=True.

The npz name map follows timm's module layout; before any npz is read it is checked against the
model (every mapped name exists, every encoder tensor is mapped), so a timm whose layout differs
fails with a clear error instead of loading partly.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from microseg.core.errors import MicrosegError
from microseg.core.torch_files import read_torch_file

if TYPE_CHECKING:
    from microseg.models.transunet import TransUNet

Source = dict[str, tuple[str, Tensor]]  # model key -> (name in the file, tensor in the model's layout)


@dataclass
class LoadReport:
    """What a load did: model tensors filled, model tensors left as they were, file tensors unused."""

    loaded: int
    missing: list[str]
    unexpected: list[str]
    source_format: str


def _groups(keys: list[str], limit: int = 4) -> str:
    """'decoder.*, seg_head.*' : the distinct first components of `keys`."""
    heads: dict[str, None] = {}
    for key in keys:
        for sep in "./":
            if sep in key:
                key = key.split(sep, 1)[0] + sep + "*"
                break
        heads[key] = None
    names = list(heads)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def format_load_report(report: LoadReport) -> str:
    """One line: 'loaded 123 tensors from npz, 4 missing (decoder.*), 0 unexpected'."""
    missing = f"{len(report.missing)} missing" + (f" ({_groups(report.missing)})" if report.missing else "")
    unexpected = f"{len(report.unexpected)} unexpected" + (
        f" ({_groups(report.unexpected)})" if report.unexpected else ""
    )
    return f"loaded {report.loaded} tensors from {report.source_format}, {missing}, {unexpected}"


def _google_names(model: TransUNet) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(model key, npz name(s), conversion) for every encoder tensor, in Google's naming."""
    vit = model.encoder
    p = "encoder.patch_embed.backbone."
    yield p + "stem.conv.weight", ("conv_root/kernel",), "conv"
    yield p + "stem.norm.weight", ("gn_root/scale",), "vector"
    yield p + "stem.norm.bias", ("gn_root/bias",), "vector"
    for i, stage in enumerate(vit.patch_embed.backbone.stages):
        for j, block in enumerate(stage.blocks):
            ours, theirs = f"{p}stages.{i}.blocks.{j}.", f"block{i + 1}/unit{j + 1}/"
            units = [(f"conv{r}", f"norm{r}", f"conv{r}", f"gn{r}") for r in (1, 2, 3)]
            if block.downsample is not None:
                units.append(("downsample.conv", "downsample.norm", "conv_proj", "gn_proj"))
            for conv, norm, npz_conv, npz_gn in units:
                yield ours + conv + ".weight", (theirs + npz_conv + "/kernel",), "conv"
                yield ours + norm + ".weight", (theirs + npz_gn + "/scale",), "vector"
                yield ours + norm + ".bias", (theirs + npz_gn + "/bias",), "vector"
    yield "encoder.patch_embed.proj.weight", ("embedding/kernel",), "conv"
    yield "encoder.patch_embed.proj.bias", ("embedding/bias",), "vector"
    yield "encoder.pos_embed", ("Transformer/posembed_input/pos_embedding",), "as_is"
    for i in range(len(vit.blocks)):
        ours, theirs = f"encoder.blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = theirs + "MultiHeadDotProductAttention_1/"
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            yield ours + norm + ".weight", (theirs + ln + "/scale",), "vector"
            yield ours + norm + ".bias", (theirs + ln + "/bias",), "vector"
        yield ours + "attn.qkv.weight", tuple(f"{mha}{n}/kernel" for n in ("query", "key", "value")), "qkv"
        yield ours + "attn.qkv.bias", tuple(f"{mha}{n}/bias" for n in ("query", "key", "value")), "vector"
        yield ours + "attn.proj.weight", (mha + "out/kernel",), "out"
        yield ours + "attn.proj.bias", (mha + "out/bias",), "vector"
        for r in (1, 2):
            yield ours + f"mlp.fc{r}.weight", (f"{theirs}MlpBlock_3/Dense_{r - 1}/kernel",), "dense"
            yield ours + f"mlp.fc{r}.bias", (f"{theirs}MlpBlock_3/Dense_{r - 1}/bias",), "vector"
    yield "encoder.norm.weight", ("Transformer/encoder_norm/scale",), "vector"
    yield "encoder.norm.bias", ("Transformer/encoder_norm/bias",), "vector"


_CONVERT: dict[str, Callable[..., np.ndarray]] = {
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # HWIO -> OIHW
    "vector": lambda *a: np.concatenate([x.reshape(-1) for x in a]),
    "dense": lambda a: a.T,  # (in, out) -> (out, in)
    "qkv": lambda *a: np.concatenate([x.reshape(x.shape[0], -1).T for x in a]),  # (D, heads, d) each
    "out": lambda a: a.reshape(-1, a.shape[-1]).T,  # (heads, d, D) -> (D, heads * d)
    "as_is": lambda a: a,
}


def check_npz_name_map(model: TransUNet) -> None:
    """Raise unless the npz name map covers exactly the model's encoder tensors (timm's layout)."""
    own = model.state_dict()
    try:
        mapped = {key for key, _, _ in _google_names(model)}
    except AttributeError as err:
        raise MicrosegError(
            f"the npz name map does not fit this timm's encoder layout ({err}); "
            "install a timm version that pyproject.toml allows"
        ) from None
    absent = sorted(key for key in mapped if key not in own)
    unmapped = [key for key in own if key.startswith("encoder.") and key not in mapped]
    if absent or unmapped:
        raise MicrosegError(
            f"the npz name map does not fit this timm's encoder layout: {len(absent)} mapped name(s) absent "
            f"({', '.join(absent[:3]) or '-'}), {len(unmapped)} encoder tensor(s) unmapped "
            f"({', '.join(unmapped[:3]) or '-'}); install a timm version that pyproject.toml allows"
        )


def _read_npz(model: TransUNet, path: Path) -> tuple[Source, list[str]]:
    check_npz_name_map(model)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise MicrosegError(f"cannot read weights file {path} as .npz: {err}") from None
    source: Source = {}
    used: set[str] = set()
    for key, names, kind in _google_names(model):
        if all(n in arrays for n in names):
            value = np.ascontiguousarray(_CONVERT[kind](*(arrays[n] for n in names)))
            source[key] = (names[0] if len(names) == 1 else "|".join(names), torch.from_numpy(value))
            used.update(names)
    return source, [n for n in arrays if n not in used]


def _torch_load(path: Path) -> Any:
    """The torch file's content, read without running code (`microseg.core.torch_files.read_torch_file`)."""
    return read_torch_file(path, "weights file", "not .npz, .safetensors, nor a torch state dict or checkpoint")


def _state_dict_of(obj: Any, path: Path) -> tuple[dict[str, Any], str]:
    """The state dict a loaded torch file holds, and its format (checkpoint or state_dict)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "model_config" in obj:
        return obj["model"], "checkpoint"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MicrosegError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    if not any(isinstance(value, Tensor) for value in obj.values()):
        raise MicrosegError(f"weights file {path} holds no tensor: it is not a state dict")
    return obj, "state_dict"


def check_weights_file(path: str | os.PathLike) -> Path:
    """``path``, once its content reads as weights (no model needed)."""
    path = Path(path)
    if not path.is_file():
        raise MicrosegError(f"weights file not found: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False):
                pass  # opening an .npz reads its zip directory: a file that is not one fails here
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise MicrosegError(f"cannot read weights file {path} as .npz: {err}") from None
    elif path.suffix == ".safetensors":
        _read_safetensors(path)
    else:
        _state_dict_of(_torch_load(path), path)
    return path


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # installed with timm

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types
        raise MicrosegError(f"cannot read weights file {path} as safetensors: {err}") from None


def _match_state_dict(model: TransUNet, state: dict[str, Any], path: Path) -> tuple[Source, list[str]]:
    """Map a TransUNet or timm-encoder state dict onto the model's keys."""
    own = model.state_dict()
    source: Source = {}
    unexpected = []
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise MicrosegError(f"weights file {path}: entry '{name}' is not a tensor")
        key = name.removeprefix("module.")
        key = key if key in own else f"encoder.{key}"
        if key in own:
            source[key] = (name, value)
        else:
            unexpected.append(name)
    return source, unexpected


def _fit_pos_embed(value: Tensor, grid: int, align_corners: bool, name: str, path: Path) -> Tensor:
    """A [1, N, D] position table for a grid x grid map: drop a class-token row, resize bilinearly
    (align_corners=True: the TransUNet port's linear zoom; False: timm's resample)."""
    value = value.reshape(1, -1, value.shape[-1])
    positions = tokens = value.shape[1]
    if math.isqrt(tokens) ** 2 != tokens:
        value, tokens = value[:, 1:], tokens - 1
    old = math.isqrt(tokens)
    if old * old != tokens or old == 0:
        raise MicrosegError(f"weights file {path}: '{name}' has {positions} positions, not a square grid")
    if old == grid:
        return value
    if align_corners:
        table = value.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid, grid), mode="bilinear", align_corners=True)
        return table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    from timm.layers import resample_abs_pos_embed  # timm here: `check_weights_file` needs no network

    return resample_abs_pos_embed(
        value,
        new_size=(grid, grid),
        old_size=(old, old),
        num_prefix_tokens=0,
        interpolation="bilinear",
        antialias=False,
    )


def _apply(model: TransUNet, source: Source, unexpected: list[str], source_format: str, path: Path) -> LoadReport:
    """Check every shape, then copy; the model is untouched if anything does not fit."""
    own = model.state_dict()
    if not source:
        raise MicrosegError(f"weights file {path}: no tensor in it matches the model ({source_format} format)")
    ready = {}
    for key, (name, value) in source.items():
        if key == "encoder.pos_embed":
            value = _fit_pos_embed(value, model.config.grid, model.config.variant == "port", name, path)
        if value.shape != own[key].shape:
            raise MicrosegError(
                f"weights file {path}: '{name}' has shape {tuple(value.shape)}, "
                f"the model's '{key}' has {tuple(own[key].shape)}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise MicrosegError(f"weights file {path}: '{name}' contains NaN or infinite values")
        ready[key] = value
    with torch.no_grad():
        for key, value in ready.items():
            own[key].copy_(value)
    missing = [key for key in own if key not in ready]
    return LoadReport(len(ready), missing, unexpected, source_format)


def load_weights(model: TransUNet, path: str | os.PathLike) -> LoadReport:
    """Load a local weights file (npz, safetensors, state dict or microseg checkpoint) into `model`.

    A partial load (e.g. an encoder-only file) is allowed and reported: print
    `format_load_report(report)`. Unreadable files, shape mismatches and non-finite values raise.
    A name (`R50-ViT-B_16`) is turned into its file by `microseg.models.pretrained.resolve_weights`.
    """
    path = Path(path)
    if not path.is_file():
        raise MicrosegError(f"weights file not found: {path}")
    if path.suffix == ".npz":
        return _apply(model, *_read_npz(model, path), "npz", path)
    if path.suffix == ".safetensors":
        return _apply(model, *_match_state_dict(model, _read_safetensors(path), path), "safetensors", path)
    state, source_format = _state_dict_of(_torch_load(path), path)
    return _apply(model, *_match_state_dict(model, state, path), source_format, path)
