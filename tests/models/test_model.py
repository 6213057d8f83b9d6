"""TransUNet: parameter counts vs the reference, shapes, gradients, aux heads, errors, compile."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from microseg.core.errors import MicrosegError
from microseg.models import CONFIGS, ModelConfig, SegOutput, build_model

REFERENCE_PARAMS = 105_279_956  # reference TransUNet + MicroSegNet heads, 1 class
TIMM_ENCODER_PARAMS = 97_890_112  # timm vit_base_r50_s16_224, num_classes=0 ("97.89 M")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_config_matches_reference_parameter_count():
    with torch.device("meta"):
        model = build_model("R50-ViT-B_16")
        timm_encoder = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0)
    total = count(model)
    assert abs(total - REFERENCE_PARAMS) <= 0.002 * REFERENCE_PARAMS
    assert total == REFERENCE_PARAMS  # the count is explained exactly, see below
    # timm's encoder has a class token (768) and its position row (768); the reference has neither.
    assert count(timm_encoder) == TIMM_ENCODER_PARAMS
    assert count(model.encoder) == TIMM_ENCODER_PARAMS - 2 * 768
    # The encoder is timm's module for module: same state-dict names and shapes (but the class token).
    ours = {k: v.shape for k, v in model.encoder.state_dict().items()}
    theirs = {k: v.shape for k, v in timm_encoder.state_dict().items() if k != "cls_token"}
    theirs["pos_embed"] = torch.Size([1, 196, 768])
    assert ours == theirs
    # Decoder by hand: conv_more 768->512, blocks (512+512->256, 256+256->128, 128+64->64, 64->16),
    # 3x3 convs without bias + BN (2 per channel), 3x3 head 16->1 with bias, aux heads 3x3 (256,128,64)->1.
    convs = [(768, 512), (1024, 256), (256, 256), (512, 128), (128, 128), (192, 64), (64, 64), (64, 16), (16, 16)]
    decoder = sum(9 * i * o + 2 * o for i, o in convs) + (9 * 16 + 1) + (9 * (256 + 128 + 64) + 3)
    assert total - count(model.encoder) == decoder


def test_large_config_is_vit_large_on_r50():
    with torch.device("meta"):
        model = build_model("R50-ViT-L_16")
        vit_l = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
    assert count(model.encoder.blocks) + count(model.encoder.norm) == count(vit_l.blocks) + count(vit_l.norm)
    assert model.encoder.pos_embed.shape == (1, 196, 1024)


def test_small_configs_are_small():
    assert count(build_model("tiny")) < 2_000_000
    assert count(build_model("small")) < 5_000_000


@pytest.mark.parametrize("size", [224, 160])
def test_output_shapes_tiny(size):
    model = build_model("tiny", img_size=size).train()
    out = model(torch.rand(2, 1, size, size))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 1, size, size)
    assert [a.shape[-1] for a in out.aux] == [size // 8, size // 4, size // 2]
    assert all(a.shape[:2] == (2, 1) for a in out.aux)


def test_output_shapes_paper_config_on_meta():
    with torch.device("meta"):
        model = build_model("R50-ViT-B_16", num_classes=2).train()
        out = model(torch.zeros(1, 1, 224, 224))
    assert out.logits.shape == (1, 2, 224, 224)
    assert [tuple(a.shape) for a in out.aux] == [(1, 2, 28, 28), (1, 2, 56, 56), (1, 2, 112, 112)]


def test_three_channel_input_equals_repeated_single_channel():
    model = build_model("tiny", img_size=32).eval()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(model(x).logits, model(x.repeat(1, 3, 1, 1)).logits)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model("tiny", img_size=32).train()
    out = model(torch.rand(4, 1, 32, 32))
    (out.logits.square().mean() + sum(a.square().mean() for a in out.aux)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_aux_heads_follow_mode_and_flags():
    model = build_model("tiny", img_size=32)
    x = torch.rand(1, 1, 32, 32)
    assert len(model.train()(x).aux) == 3
    assert model.eval()(x).aux == ()
    assert len(model.eval()(x, with_aux=True).aux) == 3
    assert model.train()(x, with_aux=False).aux == ()
    plain = build_model("tiny", img_size=32, deep_supervision=False)
    assert plain.train()(x).aux == () and len(plain.aux_heads) == 0
    assert count(model) - count(plain) == 9 * (32 + 16 + 8) + 3


@pytest.mark.parametrize("n_skip", [0, 1, 3])
def test_n_skip(n_skip):
    model = build_model("tiny", img_size=64, n_skip=n_skip, decoder_channels=(16, 16, 8, 8))
    first = [block.conv1[0].in_channels for block in model.decoder]
    skips = [64, 32, 8, 0][:n_skip] + [0] * (4 - n_skip)
    assert first == [a + s for a, s in zip([64, 16, 16, 8], skips, strict=True)]
    assert model(torch.rand(1, 1, 64, 64)).logits.shape == (1, 1, 64, 64)


def test_config_is_serialisable_and_rebuilds():
    model = build_model("small", img_size=128)
    values = dataclasses.asdict(model.config)
    values["decoder_channels"] = list(values["decoder_channels"])  # as YAML gives it back
    again = build_model(values)
    assert again.config == model.config
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]


def test_bad_names_sizes_and_inputs_raise():
    with pytest.raises(MicrosegError, match="R50-ViT-B_16.*tiny"):
        build_model("R50-ViT-X")
    with pytest.raises(MicrosegError, match="img_size 100"):
        build_model("tiny", img_size=100)
    with pytest.raises(MicrosegError, match="hidden"):
        build_model("tiny", hidden=32)
    with pytest.raises(MicrosegError, match="n_skip"):
        build_model("tiny", n_skip=4)
    with pytest.raises(MicrosegError, match="unknown field"):
        ModelConfig.from_dict({"name": "x", "colour": 1})
    model = build_model("tiny", img_size=64)
    with pytest.raises(MicrosegError, match=r"expected \[B, 1, 64, 64\]"):
        model(torch.rand(1, 1, 96, 96))
    with pytest.raises(MicrosegError, match="shape"):
        model(torch.rand(1, 2, 64, 64))
    with pytest.raises(MicrosegError, match="variant 'jax' must be one of: google, port"):
        build_model("tiny", variant="jax")
    assert set(CONFIGS) == {"R50-ViT-B_16", "R50-ViT-B_16-port", "R50-ViT-L_16", "R50-ViT-L_16-port", "small", "tiny"}


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = build_model("tiny", img_size=32).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        reference = model(x).logits
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last)).logits
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x).logits
    assert half.dtype == torch.bfloat16
    assert torch.isfinite(half).all()
    assert (half.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.1
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    (out.logits.float().mean() + sum(a.float().mean() for a in out.aux)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_traces_as_one_graph(mode):
    """torch.compile sees no graph break (the eager backend checks tracing; inductor is benchmarked)."""
    torch._dynamo.reset()
    model = getattr(build_model("tiny", img_size=32), mode)()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.rand(2, 1, 32, 32)
    out = compiled(x)
    assert len(out.aux) == (3 if mode == "train" else 0)
    if mode == "eval":
        torch.testing.assert_close(out.logits, model(x).logits)
