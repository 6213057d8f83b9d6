"""TransUNet (Chen et al. 2021) with MicroSegNet's multi-scale deep supervision (Jiang et al. 2024).

Encoder: timm's hybrid ViT (ResNetV2 with GroupNorm + weight-standardised convs, then a ViT on
the stride-16 map), built from timm modules, with no class token (the reference has none):

    x [B,1,H,W] -> repeat to 3 channels -> root conv+GN+ReLU (H/2, skip) -> max-pool
      -> stage 1 (H/4, skip) -> stage 2 (H/8, skip) -> stage 3 (H/16)
      -> 1x1 projection -> tokens + position embedding -> transformer blocks -> LayerNorm
Decoder ("CUP"): tokens -> [B, hidden, H/16, W/16] -> 3x3 conv-BN-ReLU -> 4 blocks of
    (x2 bilinear upsampling, align_corners=True as the reference's UpsamplingBilinear2d;
     concat skip; two 3x3 conv-BN-ReLU) -> 3x3 segmentation head (logits at H).
Deep supervision: a conv head (num_classes outputs) after each of the first three decoder blocks:
    logits at H/8, H/4, H/2, returned coarsest first in `SegOutput.aux`.

Two variants, one set of parameters (same names, shapes and count, so Google's npz, timm state
dicts and microseg checkpoints load into either; `ModelConfig.variant`):

- `google` (default): faithful to Google's pretrained R50+ViT (JAX, SAME padding), which is what
  timm's `vit_base_r50_s16_224` computes: the pretrained weights meet the padding they were
  trained with.
- `port`: the original TransUNet PyTorch port, which MicroSegNet trains and which produced its
  published numbers. It differs from `google` in exactly these places (each because the port's
  code does it; at 224 px):
  1. every backbone conv is padded symmetrically by k // 2 (nn.Conv2d's padding=k//2): the root
     7x7/2 conv by 3 on each side (SAME: 2 before, 3 after) and the 3x3/2 convs that open stages
     2 and 3 by 1 on each side (SAME: 0 before, 1 after); 1x1 and 3x3/1 convs pad alike in both;
  2. the 3x3/2 max-pool has no padding, so the pooled map is 55 x 55 (SAME pads 0/1 with -inf:
     56 x 56); stages 1 and 2 run on the 55 map (stage 2 ends at 28 x 28 all the same);
  3. the H/4 skip (stage 1's output, 55 x 55) is zero-padded at the bottom and right to 56 x 56
     for the decoder, as the port does with every skip smaller than in_size / 4 / (i + 1);
  4. `gn_proj`, the GroupNorm after the 1x1 projection of each stage's first unit, is
     GroupNorm(C, C) with eps 1e-5 (one group per channel: the port writes nn.GroupNorm(cout,
     cout) with PyTorch's default eps) instead of `gn_groups` groups with eps 1e-6;
  5. position tables of another grid are resized with the port's scipy.ndimage.zoom(order=1),
     i.e. bilinear with align_corners=True (`google`: timm's bilinear, align_corners=False); see
     weights.py.
  Everything else (weight standardisation eps 1e-5, GroupNorm eps 1e-6 elsewhere, the ViT, the
  decoder, the heads) is shared.

Weight standardisation (w - mean) / sqrt(var + 1e-5) and GroupNorm eps 1e-6 follow the
reference and Google's code in both variants (timm's hybrid uses 1e-8 and 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, HybridEmbed, StdConv2d, StdConv2dSame
from timm.models.resnetv2 import DownsampleConv, ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from microseg.core.errors import MicrosegError
from microseg.models.configs import ModelConfig, resolve_config

STD_CONV_EPS = 1e-5
GROUP_NORM_EPS = 1e-6
PORT_PROJ_NORM_EPS = 1e-5  # the port's gn_proj: nn.GroupNorm(C, C), PyTorch's default eps


@dataclass
class SegOutput:
    """Main logits [B,C,H,W] and deep-supervision logits, coarsest first (H/8, H/4, H/2)."""

    logits: Tensor
    aux: tuple[Tensor, ...] = ()


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """The reference's Conv2dReLU: 3x3 conv (no bias), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """x2 bilinear upsampling, optional skip concatenation, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


def build_backbone(config: ModelConfig) -> ResNetV2:
    """timm's ResNetV2 (3 stages, GroupNorm, weight-standardised convs) in `config.variant`'s padding."""
    port = config.variant == "port"
    w = config.resnet_width
    backbone = ResNetV2(
        layers=list(config.resnet_layers),
        channels=(4 * w, 8 * w, 16 * w),
        stem_chs=w,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="" if port else "same",
        conv_layer=partial(StdConv2d if port else StdConv2dSame, eps=STD_CONV_EPS),
        norm_layer=partial(GroupNormAct, num_groups=config.gn_groups, eps=GROUP_NORM_EPS),
    )
    if port:
        backbone.stem.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
        for downsample in backbone.stages.modules():  # each block's projection shortcut
            if isinstance(downsample, DownsampleConv):
                channels = downsample.conv.out_channels
                downsample.norm = GroupNormAct(channels, num_groups=channels, eps=PORT_PROJ_NORM_EPS, apply_act=False)
    return backbone


def build_encoder(config: ModelConfig) -> VisionTransformer:
    """timm's hybrid ViT for `config`: ResNetV2 (3 stages) + VisionTransformer without class token."""
    backbone = build_backbone(config)
    encoder = VisionTransformer(
        img_size=config.img_size,
        patch_size=1,
        num_classes=0,
        global_pool="",
        class_token=False,
        embed_dim=config.hidden,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=config.mlp_dim / config.hidden,
        pos_drop_rate=config.dropout,
        proj_drop_rate=config.dropout,
        attn_drop_rate=config.attn_dropout,
        embed_layer=partial(HybridEmbed, backbone=backbone),
    )
    for block in encoder.blocks:  # timm drops the attention output at the MLP rate; the reference does not
        block.get_submodule("attn").proj_drop = nn.Dropout(config.attn_dropout)
    # The ViT's init re-initialises the backbone with zero last-GN gammas (a timm recipe that stalls
    # every residual branch's first step); the reference starts them at 1.
    backbone.init_weights(zero_init_last=False)
    return encoder


class TransUNet(nn.Module):
    """TransUNet with deep-supervision heads; `forward(x [B,1|3,H,W]) -> SegOutput`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.conv_more = conv_bn_relu(config.hidden, config.head_channels)
        channels = config.decoder_channels
        skips = config.skip_channels[: config.n_skip] + (0,) * (4 - config.n_skip)
        inputs = (config.head_channels, *channels[:-1])
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(inputs, skips, channels, strict=True))
        self.seg_head = nn.Conv2d(channels[-1], config.num_classes, 3, padding=1)
        k = config.aux_kernel
        self.aux_heads = nn.ModuleList(
            nn.Conv2d(c, config.num_classes, k, padding=k // 2) for c in channels[:3] if config.deep_supervision
        )

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Token map [B, hidden, H/16, W/16] and skips at H/8, H/4, H/2 (input already 3 channels)."""
        vit = self.encoder
        resnet = vit.patch_embed.backbone
        x = resnet.stem.norm(resnet.stem.conv(x))  # root conv + GN + ReLU, stride 2
        features = [x]
        x = resnet.stem.pool(x)
        for stage in resnet.stages:
            x = stage(x)
            features.append(x)
        if self.config.variant == "port":  # the port's zero padding of the H/4 skip (55 -> 56 at 224)
            missing = self.config.img_size // 4 - features[1].shape[-1]
            features[1] = F.pad(features[1], (0, missing, 0, missing))
        tokens = vit.patch_embed.proj(features.pop()).flatten(2).transpose(1, 2)
        tokens = vit.pos_drop(tokens + vit.pos_embed)
        tokens = vit.norm(vit.blocks(vit.norm_pre(tokens)))
        grid = self.config.grid
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, grid, grid), features[::-1]

    def forward(self, x: Tensor, with_aux: bool | None = None) -> SegOutput:
        """Logits at the input size, and the aux heads' logits when `with_aux` (default: training)."""
        size = self.config.img_size
        if x.ndim != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[-2:]) != (size, size):
            raise MicrosegError(f"model input has shape {tuple(x.shape)}; expected [B, 1, {size}, {size}]")
        x, skips = self.encode(x.expand(-1, 3, -1, -1))
        x = self.conv_more(x)
        use_aux = self.training if with_aux is None else with_aux
        aux = []
        for i, block in enumerate(self.decoder):
            x = block(x, skips[i] if i < self.config.n_skip else None)
            if use_aux and i < len(self.aux_heads):
                aux.append(self.aux_heads[i](x))
        return SegOutput(self.seg_head(x), tuple(aux))


def build_model(name_or_config: str | ModelConfig | dict[str, Any] = "R50-ViT-B_16", **overrides: Any) -> TransUNet:
    """A randomly initialised TransUNet from a named config (see CONFIGS), a ModelConfig or its dict.

    `overrides`: img_size, num_classes, deep_supervision, n_skip, decoder_channels.
    """
    return TransUNet(resolve_config(name_or_config, **overrides))
