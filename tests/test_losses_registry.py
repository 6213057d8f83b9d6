"""Loss specs, input checks and the deep-supervision wrapper."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import yaml

from microseg.errors import MicrosegError
from microseg.losses import LOSSES, DeepSupervision, build_loss, describe_loss, parse_spec, resize_mask
from microseg.losses.ag_bce import AGBCE
from microseg.losses.focal import Focal
from microseg.losses.region import Dice


def case(seed: int, size: int = 32, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, size, size)
    logits = torch.randn(shape, generator=g)
    expert = torch.zeros(shape)
    expert[:, :, size // 4 : 3 * size // 4 + 1, size // 5 : 4 * size // 5] = 1  # a block with odd edges
    non_expert = expert.roll(shifts=(2, -3), dims=(2, 3))
    return logits, expert, non_expert


# ---------------------------------------------------------------- specs


def test_parse_spec_weights_options_and_values():
    terms = parse_spec("0.5*dice + focal:alpha=0.25,gamma=2 + 2*ag_bce:w=4,k=3,name=x,flag=true,eps=1e+0,a=none")
    assert [(t.weight, t.name) for t in terms] == [(0.5, "dice"), (1.0, "focal"), (2.0, "ag_bce")]
    assert terms[1].options == {"alpha": 0.25, "gamma": 2}
    assert terms[2].options == {"w": 4, "k": 3, "name": "x", "flag": True, "eps": 1.0, "a": None}
    assert isinstance(terms[2].options["w"], int) and isinstance(terms[1].options["alpha"], float)


def test_composite_is_the_weighted_sum_of_its_terms():
    logits, expert, non_expert = case(0)
    composite = build_loss("0.5*dice+focal:alpha=0.5,gamma=1+3*ag_bce:w=2,k=3")
    expected = (
        0.5 * Dice()(logits, expert)
        + Focal(alpha=0.5, gamma=1)(logits, expert)
        + 3 * AGBCE(hard_weight=2, kernel_size=3)(logits, expert, non_expert)
    )
    torch.testing.assert_close(composite(logits, expert, non_expert), expected)
    assert composite.needs_non_expert and not build_loss("dice+focal").needs_non_expert
    assert isinstance(build_loss("dice"), Dice) and not isinstance(build_loss("2*dice"), Dice)


def test_aliases_overrides_and_precedence():
    assert build_loss("ag_bce:w=2,k=3").hard_weight == 2.0
    assert build_loss("ag_bce", kernel_size=2).kernel_size == 2
    assert build_loss("ag_bce:k=3", kernel_size=2).kernel_size == 3  # spec options win
    assert build_loss("ag_bce:kernel_size=5", kernel_size=2).kernel_size == 5
    composite = build_loss("adaptive_focal+dice", kernel_size=1)  # dice takes no kernel_size: ignored
    assert composite.terms[0].kernel_size == 1


@pytest.mark.parametrize(
    "spec,message",
    [
        ("dcie", "valid names: adaptive_focal, afl, ag_bce"),
        ("dice+focsl", "'focsl'"),
        ("ag_bce:x=3", "hard_weight \\(w\\), kernel_size \\(k\\), beta, eps"),
        ("ag_bce:w=2,hard_weight=3", "repeated option 'hard_weight'"),
        ("focal:alpha=high", "option 'alpha' must be float"),
        ("ag_bce:k=2.5", "option 'k' must be int"),
        ("adaptive_focal:detach_gamma=1", "must be bool"),
        ("adaptive_focal:focusing=sometimes", "focusing must be"),
        ("ag_bce:k=0", "kernel_size must be an integer >= 1"),
        ("calf:stats=1", "unknown or repeated option 'stats'"),
    ],
)
def test_spec_errors_name_the_culprit(spec, message):
    with pytest.raises(MicrosegError, match=message):
        build_loss(spec)


@pytest.mark.parametrize(
    "spec", ["", "dice+", "+dice", "0.5*", "x*dice", "dice:", "dice:smooth", "dice:smooth=1,smooth=2", "di ce", "nan*dice"]
)
def test_malformed_specs_are_quoted(spec):
    with pytest.raises(MicrosegError, match="malformed loss spec"):
        build_loss(spec)


def test_describe_loss_is_plain_yaml_data():
    described = describe_loss(build_loss("0.5*dice+ag_bce:w=2"))
    assert described["terms"][1] == {
        "weight": 1.0, "name": "ag_bce", "options": {"hard_weight": 2, "kernel_size": 4, "beta": 0.5, "eps": 1e-6}
    }
    assert yaml.safe_load(yaml.safe_dump(described)) == described
    assert describe_loss(build_loss("bce")) == {"name": "bce", "options": {}}


# ---------------------------------------------------------------- input checks


def test_missing_non_expert_and_shape_errors():
    logits, expert, _ = case(1)
    with pytest.raises(MicrosegError, match="loss 'adaptive_focal' needs the non-expert mask"):
        build_loss("adaptive_focal")(logits, expert)
    with pytest.raises(MicrosegError, match="loss 'dice\\+ag_bce' needs the non-expert mask"):
        build_loss("dice+ag_bce")(logits, expert)
    with pytest.raises(MicrosegError, match=r"target shape \(2, 1, 16, 16\) does not match logits shape \(2, 1, 32"):
        build_loss("dice")(logits, expert[:, :, :16, :16])
    with pytest.raises(MicrosegError, match=r"non-expert shape \(2, 1, 32, 31\)"):
        build_loss("ag_bce")(logits, expert, expert[..., :31])
    with pytest.raises(MicrosegError, match=r"\[B,1,H,W\] single-channel logits, got shape \(2, 1, 2, 32, 32\)"):
        volume = torch.zeros(2, 1, 2, 32, 32)
        build_loss("ag_bce")(volume, volume, volume)
    with pytest.raises(MicrosegError, match="single-channel"):
        build_loss("dice")(logits.expand(2, 3, 32, 32), expert.expand(2, 3, 32, 32))


# ---------------------------------------------------------------- deep supervision


@pytest.mark.parametrize("size", [4, 8, 16, 12])
def test_bilinear_floor_resize_matches_reference_cv2_then_long(size):
    """MicroSegNet's dataset: cv2.resize (bilinear) of the float mask, then .long() truncation."""
    _, expert, _ = case(2)
    expert[0, 0, 3:9, 20:27] = 1 - expert[0, 0, 3:9, 20:27]
    ours = resize_mask(expert, (size, size))
    ref = [cv2.resize(m[0].numpy().astype(np.float64), (size, size)).astype(np.float32).astype(np.int64)
           for m in expert]
    np.testing.assert_array_equal(ours[:, 0].numpy(), np.stack(ref))


def test_nearest_and_area_resizes_stay_binary():
    _, expert, _ = case(3)
    nearest = resize_mask(expert, (8, 8), "nearest")[:, 0].numpy()
    ref = np.stack([cv2.resize(m[0].numpy(), (8, 8), interpolation=cv2.INTER_NEAREST_EXACT) for m in expert])
    np.testing.assert_array_equal(nearest, ref)
    area = resize_mask(expert, (8, 8), "area")[:, 0].numpy()
    ref = np.stack([cv2.resize(m[0].numpy(), (8, 8), interpolation=cv2.INTER_AREA) >= 0.5 for m in expert])
    np.testing.assert_array_equal(area, ref.astype(np.float32))
    assert set(np.unique(area)) <= {0.0, 1.0}


def test_deep_supervision_uses_per_scale_kernels_and_sums():
    logits, expert, non_expert = case(4)
    aux = [torch.randn(2, 1, s, s, generator=torch.Generator().manual_seed(s)) for s in (4, 8, 16)]
    weights = (0.5, 1.0, 2.0, 3.0)
    ds = DeepSupervision("ag_bce", weights=weights)
    out = ds(logits, aux, expert, non_expert)
    assert out.scales == (4, 8, 16, 32)
    for value, output, k in zip(out.per_scale, [*aux, logits], (1, 2, 3, 4)):
        size = output.shape[-1]
        resize = lambda m: torch.from_numpy(  # noqa: E731  (reference resize: cv2 + truncation)
            np.stack([cv2.resize(x[0].numpy().astype(np.float64), (size, size)) for x in m]).astype(np.float32)
        ).floor()[:, None]
        torch.testing.assert_close(value, AGBCE(kernel_size=k)(output, resize(expert), resize(non_expert)))
    torch.testing.assert_close(out.total, sum(w * v for w, v in zip(weights, out.per_scale)))
    assert [loss.kernel_size for loss in ds.losses] == [1, 2, 3, 4]
    assert [loss.kernel_size for loss in DeepSupervision("ag_bce:k=3").losses] == [3, 3, 3, 3]


def test_deep_supervision_without_aux_and_count_errors():
    logits, expert, non_expert = case(5)
    out = DeepSupervision("adaptive_focal")(logits, [], expert, non_expert)
    torch.testing.assert_close(out.total, build_loss("adaptive_focal:k=4")(logits, expert, non_expert))
    assert out.scales == (32,) and out.per_scale.shape == (1,)
    with pytest.raises(MicrosegError, match="4 kernel sizes/weights for 3 outputs"):
        DeepSupervision("dice")(logits, [logits[..., :8, :8]] * 2, expert)
    with pytest.raises(MicrosegError, match="one weight per kernel size"):
        DeepSupervision("dice", kernel_sizes=(1, 2), weights=(1.0,))
    with pytest.raises(MicrosegError, match="unknown target_resize"):
        DeepSupervision("dice", target_resize="cubic")
    with pytest.raises(MicrosegError, match="expert mask shape"):
        DeepSupervision("dice")(logits, [], expert[..., :16, :16])


def test_every_registered_loss_is_buildable_by_name():
    assert set(LOSSES) == {
        "focal", "bce", "ag_bce", "adaptive_focal", "afl", "calf", "dice", "iou", "tversky", "dice_ce", "dice_focal"
    }
