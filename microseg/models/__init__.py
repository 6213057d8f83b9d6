"""The segmentation model: TransUNet (timm R50-ViT hybrid + CUP decoder + deep-supervision heads),
its named configs, local weight loading and the pretrained encoders (names -> files, fetch and
verify). Imports losses/, metrics/ and core/ (the layers below); data/ is independent of it."""

from __future__ import annotations

from microseg.models.configs import CONFIGS, ModelConfig, resolve_config
from microseg.models.transunet import SegOutput, TransUNet, build_model

__all__ = ["CONFIGS", "ModelConfig", "SegOutput", "TransUNet", "build_model", "resolve_config"]
