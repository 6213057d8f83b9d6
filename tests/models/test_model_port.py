"""The `port` variant (the TransUNet PyTorch port MicroSegNet trains) against an independent
plain-torch implementation of the port's stem, downsampling unit and whole encoder
(model_helpers), each difference from the `google` default pinned on its own; the position-table
resize against scipy.ndimage.zoom(order=1); and weights loading into both variants alike."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from timm.layers import GroupNormAct

from microseg.models import CONFIGS, build_model
from microseg.models.weights import load_weights
from model_helpers import BACKBONE, GROUPS, bottleneck, fill_deterministic, google_npz, reference_encode, root

REFERENCE_PARAMS = 105_279_956  # the reference TransUNet + MicroSegNet heads, 1 class


@functools.lru_cache(maxsize=4)
def port_and_google(size: int, seed: int = 0):
    """The tiny config in both variants with the same deterministic weights, in eval mode (shared: never modify)."""
    models = [build_model("tiny", img_size=size, variant=v).eval() for v in ("port", "google")]
    for model in models:
        fill_deterministic(model, seed)
    return models


def assert_close(actual, expected, rtol=1e-5):
    """Agreement to float32 precision, relative to the expected tensor's largest magnitude."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rtol * scale + 1e-7


def test_port_configs_have_the_defaults_parameters():
    for name in ("R50-ViT-B_16", "R50-ViT-L_16"):
        port = CONFIGS[f"{name}-port"]
        assert port.variant == "port" and CONFIGS[name].variant == "google"
        assert dataclasses.replace(port, name=name, variant="google") == CONFIGS[name]
    with torch.device("meta"):  # the variant changes no parameter, so the ViT-B pair shows it for both
        ours, theirs = build_model("R50-ViT-B_16-port"), build_model("R50-ViT-B_16")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == REFERENCE_PARAMS


def test_port_root_conv_and_pool_sizes_and_padding():
    """Root 7x7/2 conv padded 3 on each side, GN + ReLU, max-pool without padding: 112 -> 55 at 224."""
    port, google = port_and_google(224)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    stem = port.encoder.patch_embed.backbone.stem
    assert stem.conv.padding == (3, 3) and stem.conv.stride == (2, 2)
    assert (stem.pool.kernel_size, stem.pool.stride, stem.pool.padding) == (3, 2, 0)
    with torch.no_grad():
        skip = stem.norm(stem.conv(x))
        pooled = stem.pool(skip)
        expected_skip, expected_pool = root(x, port.state_dict(), port=True)
        google_skip = google.encoder.patch_embed.backbone.stem.norm(google.encoder.patch_embed.backbone.stem.conv(x))
        google_pool = google.encoder.patch_embed.backbone.stem.pool(google_skip)
    assert skip.shape[-1] == 112 and pooled.shape[-1] == 55 and google_pool.shape[-1] == 56
    assert_close(skip, expected_skip)
    assert_close(pooled, expected_pool)
    # The port's root by hand: padding 3 on each side is SAME's window shifted by one input pixel.
    w = port.state_dict()[BACKBONE + "stem.conv.weight"]
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    conv = F.conv2d(F.pad(x, (3, 3, 3, 3)), (w - mean) / torch.sqrt(var + 1e-5), stride=2)
    state = port.state_dict()
    by_hand = F.relu(
        F.group_norm(conv, GROUPS, state[BACKBONE + "stem.norm.weight"], state[BACKBONE + "stem.norm.bias"], 1e-6)
    )
    assert_close(skip, by_hand)
    assert not torch.allclose(skip, google_skip, atol=1e-3)


def test_port_h4_skip_is_stage_one_zero_padded_to_56():
    port, _ = port_and_google(224)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    resnet = port.encoder.patch_embed.backbone
    with torch.no_grad():
        _, skips = port.encode(x)
        stage1 = resnet.stages[0](resnet.stem(x))
    assert [s.shape[-1] for s in skips] == [28, 56, 112]
    assert stage1.shape[-1] == 55
    h4 = skips[1]
    assert torch.equal(h4[..., :55, :55], stage1)
    assert h4[..., 55, :].abs().max() == 0 and h4[..., :, 55].abs().max() == 0  # bottom row, right column


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_port_downsampling_unit_matches_independent_unit(stage):
    """gn_proj is GroupNorm(C, C), eps 1e-5; the stride-2 3x3 conv pads 1 on each side (odd input: 55 -> 28)."""
    port, google = port_and_google(224)
    block = port.encoder.patch_embed.backbone.stages[stage].blocks[0]
    channels = block.downsample.conv.out_channels
    norm = block.downsample.norm
    assert isinstance(norm, GroupNormAct) and (norm.num_groups, norm.eps) == (channels, 1e-5)
    google_norm = google.encoder.patch_embed.backbone.stages[stage].blocks[0].downsample.norm
    assert (google_norm.num_groups, google_norm.eps) == (GROUPS, 1e-6)
    stride = 1 if stage == 0 else 2
    assert block.conv2.padding == (1, 1) and block.conv2.stride == (stride, stride)
    assert block.downsample.conv.padding == (0, 0)
    x = torch.randn(2, block.conv1.in_channels, 55, 55, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = block(x)
    expected = bottleneck(x, port.state_dict(), f"{BACKBONE}stages.{stage}.blocks.0.", stride, port=True)
    assert out.shape[-1] == (55 if stride == 1 else 28)
    assert_close(out, expected)


@pytest.mark.parametrize(("variant", "size"), [("port", 224), ("port", 96), ("google", 224)])
def test_whole_encoder_matches_independent_encoder(variant, size):
    port, google = port_and_google(size)
    model = port if variant == "port" else google
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(5)).expand(-1, 3, -1, -1)
    with torch.no_grad():
        tokens, skips = model.encode(x)
        expected_tokens, expected_skips = reference_encode(x, model.state_dict(), port=variant == "port")
    assert_close(tokens, expected_tokens)
    for skip, expected in zip(skips, expected_skips, strict=True):
        assert_close(skip, expected)


def test_variants_are_different_functions_of_the_same_weights():
    port, google = port_and_google(96)
    x = torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = port(x).logits.flatten(), google(x).logits.flatten()
    correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert not torch.allclose(a, b, atol=1e-3) and correlation < 0.999


def zoom_table(table: np.ndarray, old: int, new: int) -> torch.Tensor:
    """The port's resize: scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1)."""
    grid = table.reshape(old, old, -1)
    return torch.from_numpy(ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(1, new * new, -1))


@pytest.mark.parametrize("size", [96, 128, 48])
def test_port_position_table_resize_is_scipy_zoom(tmp_path, size):
    path = tmp_path / "grid4.npz"
    arrays = google_npz(path, grid=4)
    table = arrays["Transformer/posembed_input/pos_embedding"][0, 1:]  # the port drops the class token
    port = build_model("tiny", img_size=size, variant="port")
    google = build_model("tiny", img_size=size)
    load_weights(port, path)
    load_weights(google, path)
    expected = zoom_table(table, 4, size // 16)
    torch.testing.assert_close(port.encoder.pos_embed.detach(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(google.encoder.pos_embed, port.encoder.pos_embed, atol=1e-3)
    # A microseg checkpoint's table (no class token) is resized the same way.
    checkpoint = tmp_path / "port.pt"
    small = build_model("tiny", img_size=64, variant="port")
    fill_deterministic(small)
    torch.save({"model": small.state_dict(), "model_config": dataclasses.asdict(small.config)}, checkpoint)
    load_weights(port, checkpoint)
    expected = zoom_table(small.encoder.pos_embed.detach().numpy()[0], 4, size // 16)
    torch.testing.assert_close(port.encoder.pos_embed.detach(), expected, rtol=1e-6, atol=1e-6)


def test_weights_load_into_port_as_into_default(tmp_path):
    path = tmp_path / "R50+ViT-tiny.npz"
    google_npz(path, grid=4)
    port, google = (build_model("tiny", img_size=64, variant=v) for v in ("port", "google"))
    reports = [load_weights(m, path) for m in (port, google)]
    assert reports[0] == reports[1]
    encoder = {k: v for k, v in port.state_dict().items() if k.startswith("encoder.")}
    assert all(torch.equal(v, google.state_dict()[k]) for k, v in encoder.items())
    fill_deterministic(google, seed=8)
    checkpoint = tmp_path / "google.pt"
    torch.save({"model": google.state_dict(), "model_config": dataclasses.asdict(google.config)}, checkpoint)
    report = load_weights(port, checkpoint)
    assert (report.missing, report.unexpected) == ([], [])
    assert all(torch.equal(v, google.state_dict()[k]) for k, v in port.state_dict().items())
