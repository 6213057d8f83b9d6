"""The segmentation model: TransUNet (timm R50-ViT hybrid + CUP decoder + deep-supervision heads),
its named configs and local weight loading."""

from __future__ import annotations

from microseg.models.configs import CONFIGS, ModelConfig, resolve_config
from microseg.models.transunet import SegOutput, TransUNet, build_model

__all__ = ["CONFIGS", "ModelConfig", "SegOutput", "TransUNet", "build_model", "resolve_config"]
