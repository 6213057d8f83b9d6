"""Numerics of every loss: extreme logits, empty and full masks, bf16 autocast, and no host synchronisation."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_losses import branch_stats

from microseg.losses import LOSSES, SAMPLE_STAT_KEYS, DeepSupervision, build_loss
from microseg.losses.calf import BRANCHES

SPECS = (
    sorted(set(LOSSES) - {"calf"})
    + [
        "adaptive_focal:focusing=fixed,detach_gamma=false",
        "adaptive_focal:gamma_scope=batch,k=2",
        "afl:use_alpha_va=false,use_gamma_va=false",
        "afl:alpha_weighting=uniform",
        "afl:stats=slice",
        "focal:alpha=none,double_sigmoid=true",
        "dice_focal:alpha=0.25",
        "tversky:alpha=0,beta=1",
        "0.5*adaptive_focal+dice+afl",
    ]
    + [f"calf:{branch}" for branch in BRANCHES]
    + ["calf:ln,include_empty=false"]
)


def make(spec: str):
    """build_loss, with `calf:<branch>[,options]` meaning CALF with statistics that select that branch."""
    if spec.startswith("calf:"):
        branch, _, options = spec[5:].partition(",")
        include_empty = "include_empty=false" not in options
        return build_loss(f"calf:{options}" if options else "calf", dataset_stats=branch_stats(branch, include_empty))
    return build_loss(spec)


def sample_stats(batch: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Per-patient statistics for every sample (read by afl with stats=patient, ignored by the others)."""
    return {key: torch.full((batch,), 0.2, device=device) for key in SAMPLE_STAT_KEYS}


def masks(shape):
    g = torch.Generator().manual_seed(0)
    random = (torch.rand(shape, generator=g) > 0.5).float()
    return {"empty": torch.zeros(shape), "full": torch.ones(shape), "random": random}


@pytest.mark.parametrize("spec", SPECS)
def test_finite_loss_and_gradients_at_extremes(spec):
    shape = (2, 1, 8, 8)
    loss = make(spec)
    sign = torch.where(torch.arange(64).reshape(1, 1, 8, 8) % 3 == 0, 1.0, -1.0).expand(shape)
    logit_cases = [torch.full(shape, 1e4), torch.full(shape, -1e4), 1e4 * sign, torch.randn(shape)]
    mask_cases = masks(shape)
    for x, (t_name, target), (n_name, non_expert) in itertools.product(
        logit_cases, mask_cases.items(), [("empty", mask_cases["empty"]), ("random", mask_cases["random"])]
    ):
        x = x.clone().requires_grad_()
        value = loss(x, target, non_expert, sample_stats(2))
        value.backward()
        assert torch.isfinite(value), (spec, t_name, n_name, x.flatten()[0].item())
        assert torch.isfinite(x.grad).all(), (spec, t_name, n_name, x.flatten()[0].item())


@pytest.mark.parametrize("spec", SPECS)
def test_bf16_autocast_gives_finite_float32(spec):
    shape = (2, 1, 8, 8)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    target, non_expert = masks(shape)["random"], masks(shape)["random"].flip(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(torch.randn(shape)) * 1e3
        assert logits.dtype == torch.bfloat16
        value = make(spec)(logits, target, non_expert, sample_stats(2))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("spec", SPECS)
def test_meta_device_runs_without_host_sync(spec):
    """The meta device has no data: any .item(), .cpu(), NumPy or OpenCV call would fail."""
    shape = (2, 1, 8, 8)
    logits = torch.empty(shape, device="meta", requires_grad=True)
    target, non_expert = torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
    value = make(spec)(logits, target, non_expert, sample_stats(2, "meta"))
    value.backward()
    assert value.device.type == "meta" and value.shape == ()


@pytest.mark.parametrize("spec", ["adaptive_focal", "ag_bce+dice", "afl"])
def test_deep_supervision_meta_autocast_and_extremes(spec):
    aux_shapes = [(2, 1, s, s) for s in (2, 4, 8)]
    shape = (2, 1, 16, 16)
    ds = DeepSupervision(spec)
    meta = ds(
        torch.empty(shape, device="meta", requires_grad=True),
        [torch.empty(s, device="meta") for s in aux_shapes],
        torch.empty(shape, device="meta"),
        torch.empty(shape, device="meta"),
        sample_stats(2, "meta"),
    )
    assert meta.per_scale.device.type == "meta" and meta.per_scale.shape == (4,)
    meta.total.backward()
    for fill in (1e4, -1e4):
        logits = torch.full(shape, fill, requires_grad=True)
        aux = [torch.full(s, fill) for s in aux_shapes]
        out = ds(logits, aux, torch.ones(shape), torch.zeros(shape), sample_stats(2))
        out.total.backward()
        assert torch.isfinite(out.per_scale).all() and torch.isfinite(logits.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aux = [torch.randn(s).bfloat16() for s in aux_shapes]
        out = ds(torch.randn(shape).bfloat16(), aux, torch.ones(shape), torch.zeros(shape), sample_stats(2))
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
