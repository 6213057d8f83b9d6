"""Weight loading: Google's npz (checked against timm's own npz loader), timm state dicts,
microseg checkpoints, position-table resizing, partial-load reports and errors."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer, _load_weights

from microseg.core.errors import MicrosegError
from microseg.models import ModelConfig, build_model
from microseg.models.weights import LoadReport, format_load_report, load_weights
from model_helpers import DEPTH, HEADS, HIDDEN, LAYERS, MLP, WIDTH, google_npz


def timm_reference_encoder(img_size: int) -> VisionTransformer:
    """timm's hybrid ViT with the tiny numbers and a class token, as timm's npz loader expects."""
    backbone = ResNetV2(
        layers=LAYERS,
        channels=(4 * WIDTH, 8 * WIDTH, 16 * WIDTH),
        stem_chs=WIDTH,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=StdConv2dSame,
        norm_layer=partial(GroupNormAct, num_groups=4),
    )
    return VisionTransformer(
        img_size=img_size,
        patch_size=1,
        num_classes=0,
        embed_dim=HIDDEN,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / HIDDEN,
        embed_layer=partial(HybridEmbed, backbone=backbone),
    )


def bilinear_grid(table: np.ndarray, old: int, new: int) -> torch.Tensor:
    """[1, old*old, D] -> [1, new*new, D], bilinear with half-pixel centres (timm's resample, by hand)."""
    grid = torch.from_numpy(table).reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)


def test_google_npz_loads_every_encoder_tensor(tmp_path):
    path = tmp_path / "R50+ViT-tiny.npz"
    arrays = google_npz(path, grid=4)
    model = build_model("tiny", img_size=64)
    report = load_weights(model, path)
    encoder_keys = [k for k in model.state_dict() if k.startswith("encoder.")]
    assert report.source_format == "npz"
    assert [k for k in report.missing if k.startswith("encoder.")] == []
    assert report.loaded == len(encoder_keys)
    assert sorted(report.unexpected) == ["cls", "head/bias", "head/kernel"]
    assert all(not k.startswith("encoder.") for k in report.missing) and "seg_head.weight" in report.missing

    # Independent reference 1: timm's own npz loader, into timm's model (with class token).
    reference = timm_reference_encoder(img_size=64)
    _load_weights(reference, str(path))
    theirs = reference.state_dict()
    for key, value in model.encoder.state_dict().items():
        expected = theirs[key][:, 1:] if key == "pos_embed" else theirs[key]  # drop the class-token row
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)

    # Independent reference 2: a few layouts by hand.
    enc = model.encoder
    root = torch.from_numpy(arrays["conv_root/kernel"]).permute(3, 2, 0, 1)
    assert torch.equal(enc.patch_embed.backbone.stem.conv.weight, root)
    assert torch.equal(enc.patch_embed.backbone.stem.norm.weight, torch.from_numpy(arrays["gn_root/scale"]).flatten())
    q = arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"]
    assert torch.equal(enc.blocks[1].attn.qkv.weight[:HIDDEN], torch.from_numpy(q.reshape(HIDDEN, HIDDEN).T.copy()))
    v_bias = arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/bias"]
    assert torch.equal(enc.blocks[0].attn.qkv.bias[2 * HIDDEN :], torch.from_numpy(v_bias.ravel()))
    out = arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"]  # (heads, d, D)
    assert torch.equal(enc.blocks[0].attn.proj.weight[5, :], torch.from_numpy(out[:, :, 5].ravel()))
    fc2 = arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"]
    assert torch.equal(enc.blocks[0].mlp.fc2.weight, torch.from_numpy(fc2.T.copy()))
    pos = arrays["Transformer/posembed_input/pos_embedding"]
    assert torch.equal(enc.pos_embed, torch.from_numpy(pos[:, 1:]))
    text = format_load_report(report)
    assert text.startswith(f"loaded {len(encoder_keys)} tensors from npz, {len(report.missing)} missing (conv_more.*")
    assert text.endswith("3 unexpected (cls, head/*)")


def test_npz_position_table_of_another_grid_is_resized(tmp_path):
    path = tmp_path / "grid4.npz"
    arrays = google_npz(path, grid=4)
    model = build_model("tiny", img_size=128)  # grid 8
    load_weights(model, path)
    expected = bilinear_grid(arrays["Transformer/posembed_input/pos_embedding"][:, 1:], 4, 8)
    torch.testing.assert_close(model.encoder.pos_embed.detach(), expected)


def test_npz_shape_mismatch_names_key_and_shapes_and_changes_nothing(tmp_path):
    path = tmp_path / "wide.npz"
    google_npz(path, grid=4)
    arrays = dict(np.load(path))
    arrays["Transformer/encoder_norm/scale"] = np.ones(HIDDEN + 1, np.float32)
    np.savez(path, **arrays)
    model = build_model("tiny", img_size=64)
    before = model.encoder.patch_embed.backbone.stem.conv.weight.clone()
    with pytest.raises(MicrosegError, match=r"'Transformer/encoder_norm/scale' has shape \(65,\).*\(64,\)"):
        load_weights(model, path)
    assert torch.equal(model.encoder.patch_embed.backbone.stem.conv.weight, before)


def test_timm_state_dict_as_safetensors(tmp_path):
    reference = timm_reference_encoder(img_size=64)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = build_model("tiny", img_size=64)
    report = load_weights(model, path)
    assert (report.source_format, report.unexpected) == ("safetensors", ["cls_token"])
    assert not [k for k in report.missing if k.startswith("encoder.")]
    torch.testing.assert_close(model.encoder.blocks[1].mlp.fc1.weight, reference.blocks[1].mlp.fc1.weight)
    torch.testing.assert_close(model.encoder.pos_embed, reference.pos_embed[:, 1:])


def checkpoint(model) -> dict:
    """A microseg checkpoint as microseg.runs.folder writes it: state dict + config dict (+ anything else)."""
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "epoch": 3}


def test_checkpoint_round_trip_and_rebuild(tmp_path):
    torch.manual_seed(1)
    model = build_model("tiny", img_size=64, num_classes=2).eval()
    path = tmp_path / "last.pt"
    torch.save(checkpoint(model), path)
    x = torch.rand(2, 1, 64, 64)

    stored = torch.load(path, weights_only=True)["model_config"]
    rebuilt = build_model(ModelConfig.from_dict(stored))
    report = load_weights(rebuilt, path)
    assert rebuilt.config == model.config
    assert report == LoadReport(len(model.state_dict()), [], [], "checkpoint")
    assert format_load_report(report) == f"loaded {report.loaded} tensors from checkpoint, 0 missing, 0 unexpected"
    torch.testing.assert_close(rebuilt.eval()(x).logits, model(x).logits, rtol=0, atol=0)

    bigger = build_model(stored, img_size=96)  # position table resized 4x4 -> 6x6
    load_weights(bigger, path)
    expected = bilinear_grid(model.encoder.pos_embed.detach().numpy(), 4, 6)
    torch.testing.assert_close(bigger.encoder.pos_embed.detach(), expected)


def test_checkpoint_with_other_head_raises(tmp_path):
    path = tmp_path / "two.pt"
    torch.save(checkpoint(build_model("tiny", img_size=64, num_classes=2)), path)
    model = build_model("tiny", img_size=64)
    with pytest.raises(MicrosegError, match=r"'seg_head.weight' has shape \(2, 8, 3, 3\).*\(1, 8, 3, 3\)"):
        load_weights(model, path)


def test_bad_files_raise(tmp_path):
    model = build_model("tiny", img_size=64)
    with pytest.raises(MicrosegError, match="not found"):
        load_weights(model, tmp_path / "absent.npz")
    for name in ("junk.npz", "junk.pt", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"not a weights file")
        with pytest.raises(MicrosegError, match="cannot read weights file"):
            load_weights(model, tmp_path / name)
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(MicrosegError, match="no tensor in it matches"):
        load_weights(model, tmp_path / "other.npz")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(MicrosegError, match="holds a list, not a state dict"):
        load_weights(model, tmp_path / "list.pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["seg_head.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(MicrosegError, match="NaN"):
        load_weights(model, tmp_path / "nan.pt")
