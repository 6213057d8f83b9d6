"""What `TransUNet.encode` and the npz name map take from timm, pinned so that a timm upgrade that
changes the model fails here, loudly: the modules `encode` reaches (stem, stages, patch_embed.proj,
pos_drop, norm_pre, blocks, norm), their types, settings and output shapes, the encoder's
state-dict layout written out by hand, and a fixed-input fingerprint of both variants' encoder.
The versions that pass are the range pyproject.toml allows for timm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.layers import GroupNormAct, HybridEmbed, StdConv2d, StdConv2dSame
from timm.layers.pool2d_same import MaxPool2dSame
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from microseg.core.errors import MicrosegError
from microseg.models import CONFIGS, build_model
from microseg.models.weights import check_npz_name_map, load_weights
from model_helpers import DEPTH, GROUPS, HEADS, HIDDEN, MLP, WIDTH, fill_deterministic, google_npz

# mean, std and ramp-weighted mean (sum of x_i * i / (n - 1) over n) of the tokens and the H/8, H/4,
# H/2 skips: tiny config at 64 px, weights fill_deterministic(seed 0), input numpy default_rng(0).random.
# Measured with timm 1.0.31 and torch 2.14 (float32 on the CPU).
FINGERPRINTS = {
    "google": (
        (0.04571553, 1.096675, 0.02897406),
        (0.5739749, 0.8694542, 0.285556),
        (0.5252456, 0.8212789, 0.2608326),
        (0.423048, 0.6363989, 0.2019025),
    ),
    "port": (
        (0.04914347, 1.095976, 0.02811963),
        (0.5778287, 0.8679242, 0.2910721),
        (0.4603774, 0.7896884, 0.2288549),
        (0.4236081, 0.6382874, 0.2011402),
    ),
}


def tiny(variant: str = "google", size: int = 64):
    return build_model("tiny", img_size=size, variant=variant).eval()


@pytest.mark.parametrize("variant", ["google", "port"])
def test_encode_reaches_these_timm_modules(variant):
    vit = tiny(variant).encoder
    assert isinstance(vit, VisionTransformer) and isinstance(vit.patch_embed, HybridEmbed)
    resnet = vit.patch_embed.backbone
    assert isinstance(resnet, ResNetV2) and list(resnet.stem._modules) == ["conv", "norm", "pool"]
    port = variant == "port"
    conv_type = StdConv2d if port else StdConv2dSame
    assert type(resnet.stem.conv) is conv_type and resnet.stem.conv.eps == 1e-5
    assert isinstance(resnet.stem.norm, GroupNormAct) and isinstance(resnet.stem.norm.act, nn.ReLU)
    assert (resnet.stem.norm.num_groups, resnet.stem.norm.eps) == (GROUPS, 1e-6)
    assert type(resnet.stem.pool) is (nn.MaxPool2d if port else MaxPool2dSame)
    assert len(resnet.stages) == 3
    for stage in resnet.stages:
        first = stage.blocks[0]
        assert all(type(getattr(first, f"conv{i}")) is conv_type for i in (1, 2, 3))
        assert isinstance(first.norm3.act, nn.Identity) and isinstance(first.downsample.norm.act, nn.Identity)
    assert isinstance(vit.patch_embed.proj, nn.Conv2d) and vit.patch_embed.proj.kernel_size == (1, 1)
    assert isinstance(vit.pos_drop, nn.Dropout) and vit.pos_drop.p == CONFIGS["tiny"].dropout
    assert isinstance(vit.norm_pre, nn.Identity)
    assert isinstance(vit.norm, nn.LayerNorm) and vit.norm.eps == 1e-6
    assert vit.cls_token is None and vit.pos_embed.shape == (1, 16, HIDDEN)
    assert len(vit.blocks) == DEPTH and all(type(b) is Block for b in vit.blocks)
    block = vit.blocks[0]
    assert (block.attn.num_heads, block.norm1.eps, block.norm2.eps) == (HEADS, 1e-6, 1e-6)
    assert isinstance(block.ls1, nn.Identity) and isinstance(block.drop_path1, nn.Identity)
    assert isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"


@pytest.mark.parametrize("variant", ["google", "port"])
def test_encode_output_shapes_module_by_module(variant):
    model = tiny(variant)
    resnet = model.encoder.patch_embed.backbone
    shapes = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
        for name, module in [
            ("root", resnet.stem.norm),
            ("pool", resnet.stem.pool),
            *((f"stage{i}", s) for i, s in enumerate(resnet.stages)),
            ("proj", model.encoder.patch_embed.proj),
            ("blocks", model.encoder.blocks),
        ]
    ]
    with torch.no_grad():
        tokens, skips = model.encode(torch.rand(2, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    pooled = 15 if variant == "port" else 16  # no padding (port) or SAME: 32 -> 15 or 16
    assert shapes == {
        "root": (2, WIDTH, 32, 32),
        "pool": (2, WIDTH, pooled, pooled),
        "stage0": (2, 4 * WIDTH, pooled, pooled),
        "stage1": (2, 8 * WIDTH, 8, 8),
        "stage2": (2, 16 * WIDTH, 4, 4),
        "proj": (2, HIDDEN, 4, 4),
        "blocks": (2, 16, HIDDEN),
    }
    assert tokens.shape == (2, HIDDEN, 4, 4)
    assert [tuple(s.shape) for s in skips] == [(2, 8 * WIDTH, 8, 8), (2, 4 * WIDTH, 16, 16), (2, WIDTH, 32, 32)]


def expected_encoder_layout() -> dict[str, tuple[int, ...]]:
    """The tiny encoder's state dict, written out from the architecture (timm's names)."""
    layout = {"stem.conv.weight": (WIDTH, 3, 7, 7), "stem.norm.weight": (WIDTH,), "stem.norm.bias": (WIDTH,)}
    cin = WIDTH
    for i, cout in enumerate((4 * WIDTH, 8 * WIDTH, 16 * WIDTH)):
        p, mid = f"stages.{i}.blocks.0.", cout // 4
        layout |= {
            p + "downsample.conv.weight": (cout, cin, 1, 1),
            p + "conv1.weight": (mid, cin, 1, 1),
            p + "conv2.weight": (mid, mid, 3, 3),
            p + "conv3.weight": (cout, mid, 1, 1),
        }
        for norm, c in (("downsample.norm", cout), ("norm1", mid), ("norm2", mid), ("norm3", cout)):
            layout |= {p + norm + ".weight": (c,), p + norm + ".bias": (c,)}
        cin = cout
    layout = {"patch_embed.backbone." + k: v for k, v in layout.items()}
    layout |= {
        "pos_embed": (1, 16, HIDDEN),
        "patch_embed.proj.weight": (HIDDEN, cin, 1, 1),
        "patch_embed.proj.bias": (HIDDEN,),
        "norm.weight": (HIDDEN,),
        "norm.bias": (HIDDEN,),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        for name, shape in (
            ("norm1", (HIDDEN,)),
            ("attn.qkv", (3 * HIDDEN, HIDDEN)),
            ("attn.proj", (HIDDEN, HIDDEN)),
            ("norm2", (HIDDEN,)),
            ("mlp.fc1", (MLP, HIDDEN)),
            ("mlp.fc2", (HIDDEN, MLP)),
        ):
            layout |= {p + name + ".weight": shape, p + name + ".bias": (shape[0],)}
    return layout


@pytest.mark.parametrize("variant", ["google", "port"])
def test_encoder_state_dict_layout(variant):
    state = tiny(variant).encoder.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_encoder_layout()


def summary(t: torch.Tensor) -> tuple[float, float, float]:
    t = t.double().flatten()
    return t.mean().item(), t.std().item(), (t * torch.linspace(0, 1, t.numel(), dtype=torch.float64)).mean().item()


@pytest.mark.parametrize("variant", ["google", "port"])
def test_encoder_fingerprint(variant):
    model = tiny(variant)
    fill_deterministic(model, seed=0)
    x = torch.from_numpy(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    with torch.no_grad():
        tokens, skips = model.encode(x)
    measured = [summary(t) for t in (tokens, *skips)]
    np.testing.assert_allclose(
        measured,
        FINGERPRINTS[variant],
        rtol=1e-4,
        atol=1e-6,
        err_msg=f"the {variant} encoder's output changed (a timm or torch upgrade?)",
    )


def test_npz_name_map_fits_the_configs():
    for name in ("tiny", "small", "R50-ViT-B_16", "R50-ViT-B_16-port"):  # ViT-L: ViT-B's layout, 24 blocks
        with torch.device("meta"):
            check_npz_name_map(build_model(name))  # raises on a mismatch


def test_npz_name_map_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.npz"
    google_npz(path, grid=4)
    model = tiny()
    model.encoder.register_parameter("extra_table", nn.Parameter(torch.zeros(3)))
    with pytest.raises(
        MicrosegError,
        match=r"0 mapped name\(s\) absent \(-\), 1 encoder tensor\(s\) unmapped "
        r"\(encoder.extra_table\); install a timm version",
    ):
        load_weights(model, path)
    model = tiny()
    model.encoder.patch_embed.backbone.stem.add_module("conv_root", model.encoder.patch_embed.backbone.stem.conv)
    del model.encoder.patch_embed.backbone.stem.conv
    with pytest.raises(MicrosegError, match="npz name map does not fit this timm's encoder layout"):
        load_weights(model, path)
    model = tiny()
    del model.encoder.patch_embed.backbone.stages[0].blocks[0].downsample
    with pytest.raises(MicrosegError, match="npz name map does not fit.*downsample"):
        load_weights(model, path)
