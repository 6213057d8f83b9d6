"""Named TransUNet configurations: one dataclass, numbers only; every config runs the same code.

`R50-ViT-B_16` is the paper's model (TransUNet, Chen et al. 2021, as used by MicroSegNet and
the micro-US adaptive focal paper): BiT ResNet-50 stem + stages (3, 4, 9), ViT-B/16 (768 hidden, 12 layers, 12 heads,
MLP 3072) on the stride-16 map, CUP decoder (256, 128, 64, 16), 3 skips, 3x3 deep-supervision
heads. `R50-ViT-L_16` swaps in ViT-L/16 (1024, 24, 16, 4096). `small` (demo on a laptop CPU) and
`tiny` (tests) shrink the same structure.

Each config comes in two variants with the same parameters (names, shapes, count): `google`
(default), faithful to Google's pretrained R50+ViT model as timm builds it, and `port`, the
original TransUNet PyTorch port that MicroSegNet trains (`R50-ViT-B_16-port`, `R50-ViT-L_16-port`,
or `variant="port"` on any config); transunet.py lists what differs and why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from microseg.core.errors import MicrosegError
from microseg.core.preprocess import SIZE_MULTIPLE

VARIANTS = ("google", "port")


@dataclass(frozen=True)
class ModelConfig:
    """A TransUNet's numbers. The encoder spec is `resnet_*` (backbone) + `hidden`..`mlp_dim` (ViT).

    resnet_layers: bottleneck units in the 3 ResNetV2 stages (strides 4, 8, 16).
    resnet_width: stem channels w; the stages output 4w, 8w, 16w (skips: 8w at H/8, 4w at H/4,
        w at H/2); GroupNorm with `gn_groups` groups throughout (but the port variant's projection GroupNorms).
    hidden, depth, heads, mlp_dim: the ViT on the stride-16 map (one token per position).
    dropout: after the position embedding and inside the MLPs; attn_dropout: on the attention
        weights and its output projection (the reference's `attention_dropout_rate`).
    head_channels: the decoder's first 3x3 conv ("conv_more") after the tokens are reshaped.
    decoder_channels: the 4 upsampling blocks; the first `n_skip` take a skip connection.
    deep_supervision, aux_kernel: a `aux_kernel` x `aux_kernel` conv head after each of the first
        three decoder blocks (H/8, H/4, H/2). The seed-002 paper's text says 1x1, but the reference
        parameter count (105,279,956) holds exactly 9 * (256 + 128 + 64) + 3 = 4,035 head
        parameters, i.e. 3x3 convs with bias: 3 is the default, 1 the paper-text reading.
    variant: `google` (SAME padding, Google's and timm's model) or `port` (the TransUNet PyTorch
        port's forward pass, which produced MicroSegNet's published numbers); see transunet.py.
    """

    name: str = "R50-ViT-B_16"
    resnet_layers: tuple[int, ...] = (3, 4, 9)
    resnet_width: int = 64
    gn_groups: int = 32
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.0
    head_channels: int = 512
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    n_skip: int = 3
    deep_supervision: bool = True
    aux_kernel: int = 3
    img_size: int = 224
    num_classes: int = 1
    variant: str = "google"

    def __post_init__(self) -> None:
        for field in ("resnet_layers", "decoder_channels"):  # YAML/JSON give lists
            object.__setattr__(self, field, tuple(int(v) for v in getattr(self, field)))
        checks = (
            (
                self.img_size > 0 and self.img_size % SIZE_MULTIPLE == 0,
                f"img_size {self.img_size} is not a positive multiple of {SIZE_MULTIPLE} (the encoder stride)",
            ),
            (len(self.resnet_layers) == 3, f"resnet_layers {self.resnet_layers} must name 3 stages"),
            (
                self.resnet_width > 0 and self.resnet_width % self.gn_groups == 0,
                f"resnet_width {self.resnet_width} is not a multiple of gn_groups {self.gn_groups}",
            ),
            (self.hidden % self.heads == 0, f"hidden {self.hidden} is not a multiple of heads {self.heads}"),
            (len(self.decoder_channels) == 4, f"decoder_channels {self.decoder_channels} must have 4 entries"),
            (0 <= self.n_skip <= 3, f"n_skip {self.n_skip} must be 0..3"),
            (self.num_classes >= 1, f"num_classes {self.num_classes} must be >= 1"),
            (self.aux_kernel % 2 == 1, f"aux_kernel {self.aux_kernel} must be odd"),
            (self.variant in VARIANTS, f"variant '{self.variant}' must be one of: {', '.join(VARIANTS)}"),
        )
        for ok, message in checks:
            if not ok:
                raise MicrosegError(f"model config '{self.name}': {message}")

    @property
    def grid(self) -> int:
        """Token grid side: img_size / 16."""
        return self.img_size // SIZE_MULTIPLE

    @property
    def skip_channels(self) -> tuple[int, int, int]:
        """Encoder features at strides 8, 4, 2 (the order the decoder consumes them)."""
        w = self.resnet_width
        return (8 * w, 4 * w, w)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Rebuild a config stored with `dataclasses.asdict` (checkpoints, YAML)."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise MicrosegError(f"model config has unknown field(s): {', '.join(unknown)}")
        return cls(**values)


_R50_VIT_B_16 = ModelConfig(name="R50-ViT-B_16")
_R50_VIT_L_16 = ModelConfig(name="R50-ViT-L_16", hidden=1024, depth=24, heads=16, mlp_dim=4096)

CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _R50_VIT_B_16,
        dataclasses.replace(_R50_VIT_B_16, name="R50-ViT-B_16-port", variant="port"),
        _R50_VIT_L_16,
        dataclasses.replace(_R50_VIT_L_16, name="R50-ViT-L_16-port", variant="port"),
        ModelConfig(
            name="small",
            resnet_layers=(1, 2, 2),
            resnet_width=16,
            gn_groups=8,
            hidden=192,
            depth=4,
            heads=3,
            mlp_dim=768,
            head_channels=128,
            decoder_channels=(64, 32, 16, 16),
        ),
        ModelConfig(
            name="tiny",
            resnet_layers=(1, 1, 1),
            resnet_width=8,
            gn_groups=4,
            hidden=64,
            depth=2,
            heads=2,
            mlp_dim=128,
            head_channels=64,
            decoder_channels=(32, 16, 8, 8),
        ),
    )
}

OVERRIDABLE = ("img_size", "num_classes", "deep_supervision", "n_skip", "decoder_channels", "variant")


def resolve_config(name_or_config: str | ModelConfig | dict[str, Any], **overrides: Any) -> ModelConfig:
    """A named config, a ModelConfig or its dict, with `overrides` (fields in OVERRIDABLE) applied."""
    if isinstance(name_or_config, ModelConfig):
        config = name_or_config
    elif isinstance(name_or_config, dict):
        config = ModelConfig.from_dict(name_or_config)
    elif name_or_config in CONFIGS:
        config = CONFIGS[name_or_config]
    else:
        raise MicrosegError(f"unknown model '{name_or_config}'; choose one of: {', '.join(CONFIGS)}")
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise MicrosegError(f"cannot override model field(s) {', '.join(bad)}; allowed: {', '.join(OVERRIDABLE)}")
    return dataclasses.replace(config, **overrides)
