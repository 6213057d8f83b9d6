"""The segmentation model: TransUNet (timm R50-ViT hybrid + CUP decoder + deep-supervision heads),
its named configs, local weight loading and the pretrained encoders (names -> files, fetch and
verify). Imports losses/, metrics/ and core/ (the layers below); data/ is independent of it.

The network's names (`TransUNet`, `SegOutput`, `build_model`) are imported from transunet.py when
first asked for: importing timm takes a second or two, which a command that only reads the configs
(`experiment status`, the experiment runner's plan checks) does not pay."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microseg.models.configs import CONFIGS, ModelConfig, resolve_config

if TYPE_CHECKING:
    from microseg.models.transunet import SegOutput, TransUNet, build_model

__all__ = ["CONFIGS", "ModelConfig", "SegOutput", "TransUNet", "build_model", "resolve_config"]

NETWORK = ("SegOutput", "TransUNet", "build_model")


def __getattr__(name: str) -> Any:
    if name in NETWORK:
        from microseg.models import transunet

        return getattr(transunet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
