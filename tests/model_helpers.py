"""Model-test helpers: a Google-format R50+ViT npz writer, deterministic weights, and an
independent plain-torch R50+ViT encoder in both paddings (the TransUNet port's and Google's SAME).

The encoder below is written from the two references' code, not from microseg's: the TransUNet
PyTorch port (networks/vit_seg_modeling_resnet_skip.py: StdConv2d with padding k // 2, root conv
+ GroupNorm + ReLU, MaxPool2d(3, 2, padding=0), PreActBottleneck with `gn_proj =
nn.GroupNorm(cout, cout)`, every skip smaller than in_size / 4 / (i + 1) copied into zeros) and
Google's JAX model (SAME padding everywhere, the max-pool padded with -inf, gn_proj like every
other GroupNorm). It reads weights from a TransUNet state dict by name.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The tiny config's numbers, written out: ResNet (1,1,1) units, width 8; ViT 64 hidden, 2 layers, 2 heads, MLP 128.
LAYERS, WIDTH, GROUPS, HIDDEN, DEPTH, HEADS, MLP = (1, 1, 1), 8, 4, 64, 2, 2, 128
BACKBONE = "encoder.patch_embed.backbone."


def google_npz(path, grid: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays under the names and layouts of Google's R50+ViT npz files (tiny numbers)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}

    def put(name, *shape):
        arrays[name] = rng.standard_normal(shape).astype(np.float32)

    put("conv_root/kernel", 7, 7, 3, WIDTH)
    put("gn_root/scale", 1, 1, 1, WIDTH)  # Google stores GroupNorm vectors as (1, 1, 1, C)
    put("gn_root/bias", 1, 1, 1, WIDTH)
    cin = WIDTH
    for b, units in enumerate(LAYERS, start=1):
        cout = 4 * WIDTH * 2 ** (b - 1)
        mid = cout // 4
        for u in range(1, units + 1):
            unit = f"block{b}/unit{u}/"
            put(unit + "conv1/kernel", 1, 1, cin, mid)
            put(unit + "conv2/kernel", 3, 3, mid, mid)
            put(unit + "conv3/kernel", 1, 1, mid, cout)
            for g, c in (("gn1", mid), ("gn2", mid), ("gn3", cout)):
                put(unit + f"{g}/scale", 1, 1, 1, c)
                put(unit + f"{g}/bias", 1, 1, 1, c)
            if u == 1:
                put(unit + "conv_proj/kernel", 1, 1, cin, cout)
                put(unit + "gn_proj/scale", 1, 1, 1, cout)
                put(unit + "gn_proj/bias", 1, 1, 1, cout)
            cin = cout
    put("embedding/kernel", 1, 1, cin, HIDDEN)
    put("embedding/bias", HIDDEN)
    put("cls", 1, 1, HIDDEN)
    put("Transformer/posembed_input/pos_embedding", 1, 1 + grid * grid, HIDDEN)
    for i in range(DEPTH):
        blk = f"Transformer/encoderblock_{i}/"
        mha = blk + "MultiHeadDotProductAttention_1/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            put(blk + ln + "/scale", HIDDEN)
            put(blk + ln + "/bias", HIDDEN)
        for n in ("query", "key", "value"):
            put(mha + n + "/kernel", HIDDEN, HEADS, HIDDEN // HEADS)
            put(mha + n + "/bias", HEADS, HIDDEN // HEADS)
        put(mha + "out/kernel", HEADS, HIDDEN // HEADS, HIDDEN)
        put(mha + "out/bias", HIDDEN)
        put(blk + "MlpBlock_3/Dense_0/kernel", HIDDEN, MLP)
        put(blk + "MlpBlock_3/Dense_0/bias", MLP)
        put(blk + "MlpBlock_3/Dense_1/kernel", MLP, HIDDEN)
        put(blk + "MlpBlock_3/Dense_1/bias", HIDDEN)
    put("Transformer/encoder_norm/scale", HIDDEN)
    put("Transformer/encoder_norm/bias", HIDDEN)
    put("head/kernel", HIDDEN, 10)
    put("head/bias", 10)
    np.savez(path, **arrays)
    return arrays


def fill_deterministic(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter from numpy's generator in sorted-name order (independent of timm's and
    torch's init): matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), biases and tables N(0, 0.2^2)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = rng.standard_normal(tuple(p.shape))
            if p.ndim >= 2 and name != "encoder.pos_embed":
                value = noise / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                value = 1 + 0.2 * noise
            else:
                value = 0.2 * noise
            p.copy_(torch.from_numpy(value))


def same_pad(x: Tensor, kernel: int, stride: int, value: float = 0.0) -> Tensor:
    """TensorFlow's SAME padding of a square map: total max((ceil(n/s) - 1) s + k - n, 0), the odd one after."""
    n = x.shape[-1]
    total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
    before, after = total // 2, total - total // 2
    return F.pad(x, (before, after, before, after), value=value)


def std_conv(x: Tensor, weight: Tensor, stride: int, port: bool) -> Tensor:
    """Weight-standardised conv, (w - mean) / sqrt(var + 1e-5); padding k // 2 (port) or SAME (Google)."""
    var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
    weight = (weight - mean) / torch.sqrt(var + 1e-5)
    k = weight.shape[-1]
    if port:
        return F.conv2d(x, weight, stride=stride, padding=k // 2)
    return F.conv2d(same_pad(x, k, stride), weight, stride=stride)


def group_norm(x: Tensor, state: dict[str, Tensor], name: str, groups: int, eps: float = 1e-6) -> Tensor:
    return F.group_norm(x, groups, state[name + ".weight"], state[name + ".bias"], eps)


def root(x: Tensor, state: dict[str, Tensor], port: bool) -> tuple[Tensor, Tensor]:
    """Root conv 7x7/2 + GN + ReLU (the H/2 skip) and the 3x3/2 max-pool after it."""
    x = std_conv(x, state[BACKBONE + "stem.conv.weight"], 2, port)
    x = F.relu(group_norm(x, state, BACKBONE + "stem.norm", GROUPS))
    pooled = F.max_pool2d(x, 3, 2) if port else F.max_pool2d(same_pad(x, 3, 2, -math.inf), 3, 2)
    return x, pooled


def bottleneck(x: Tensor, state: dict[str, Tensor], prefix: str, stride: int, port: bool) -> Tensor:
    """The port's PreActBottleneck forward (which is post-activation, like Google's):
    relu(gn_proj(conv_proj(x)) + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x)))))))))."""
    residual = x
    if prefix + "downsample.conv.weight" in state:
        residual = std_conv(x, state[prefix + "downsample.conv.weight"], stride, port)
        channels = residual.shape[1]
        residual = group_norm(
            residual, state, prefix + "downsample.norm", channels if port else GROUPS, 1e-5 if port else 1e-6
        )
    y = F.relu(group_norm(std_conv(x, state[prefix + "conv1.weight"], 1, port), state, prefix + "norm1", GROUPS))
    y = F.relu(group_norm(std_conv(y, state[prefix + "conv2.weight"], stride, port), state, prefix + "norm2", GROUPS))
    y = group_norm(std_conv(y, state[prefix + "conv3.weight"], 1, port), state, prefix + "norm3", GROUPS)
    return F.relu(residual + y)


def backbone(x: Tensor, state: dict[str, Tensor], port: bool) -> tuple[Tensor, list[Tensor]]:
    """The port's ResNetV2.forward: the stride-16 map and the skips at H/8, H/4, H/2."""
    batch, _, in_size, _ = x.shape
    skip, x = root(x, state, port)
    features = [skip]
    for i, units in enumerate(LAYERS):
        for j in range(units):
            x = bottleneck(x, state, f"{BACKBONE}stages.{i}.blocks.{j}.", 2 if i > 0 and j == 0 else 1, port)
        if i == len(LAYERS) - 1:
            break
        right_size = in_size // 4 // (i + 1)
        feat = x
        if x.shape[2] != right_size:
            feat = torch.zeros(batch, x.shape[1], right_size, right_size)
            feat[:, :, : x.shape[2], : x.shape[3]] = x
        features.append(feat)
    return x, features[::-1]


def transformer(x: Tensor, state: dict[str, Tensor]) -> Tensor:
    """1x1 patch embedding + position table, pre-norm blocks (LayerNorm eps 1e-6), final LayerNorm."""
    tokens = F.conv2d(x, state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"])
    tokens = tokens.flatten(2).transpose(1, 2) + state["encoder.pos_embed"]
    batch, n, dim = tokens.shape

    def norm(t, name):
        return F.layer_norm(t, (dim,), state[name + ".weight"], state[name + ".bias"], 1e-6)

    def heads(t):
        return t.reshape(batch, n, HEADS, dim // HEADS).transpose(1, 2)

    for i in range(DEPTH):
        p = f"encoder.blocks.{i}."
        q, k, v = F.linear(norm(tokens, p + "norm1"), state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"]).chunk(
            3, -1
        )
        weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dim // HEADS), dim=-1)
        context = (weights @ heads(v)).transpose(1, 2).reshape(batch, n, dim)
        tokens = tokens + F.linear(context, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(tokens, p + "norm2"), state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        tokens = tokens + F.linear(hidden, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return norm(tokens, "encoder.norm")


def reference_encode(x: Tensor, state: dict[str, Tensor], port: bool) -> tuple[Tensor, list[Tensor]]:
    """Token map [B, hidden, H/16, W/16] and skips (H/8, H/4, H/2), as TransUNet.encode returns them."""
    x, skips = backbone(x, state, port)
    tokens = transformer(x, state)
    grid = x.shape[-1]
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, grid, grid), skips
