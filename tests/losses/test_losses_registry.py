"""Loss specs, input checks and the deep-supervision wrapper."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
import yaml

from microseg.core.errors import MicrosegError
from microseg.core.preprocess import resize_target
from microseg.losses import (
    LOSSES,
    DeepSupervision,
    LossSpec,
    build_loss,
    calf_stats,
    canonical_spec,
    check_spec,
    dataset_statistics,
    parse_spec,
)
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


def test_aliases_keywords_and_the_scale_kernel():
    assert build_loss("ag_bce:w=2,k=3").hard_weight == 2.0
    assert build_loss("ag_bce", kernel_size=2).kernel_size == 2
    assert (build_loss("ag_bce", w=10).hard_weight, build_loss("ag_bce", k=2).kernel_size) == (10.0, 2)  # short names
    composite = build_loss("adaptive_focal+dice", kernel_size=1)  # goes to the term that takes it
    assert composite.terms[0].kernel_size == 1
    assert build_loss("ag_bce+adaptive_focal", beta=0.25).terms[1].beta == 0.25 == composite.terms[0].beta / 2
    scaled = build_loss("ag_bce+dice+adaptive_focal:beta=1", scale_kernel_size=2)  # only the terms with a kernel
    assert [getattr(t, "kernel_size", None) for t in scaled.terms] == [2, None, 2]
    for spec, keywords in [
        ("ag_bce:k=3", {"kernel_size": 2}),
        ("ag_bce:kernel_size=5", {"k": 2}),
        ("ag_bce", {"w": 3, "hard_weight": 4}),
    ]:
        with pytest.raises(MicrosegError, match="given twice"):
            build_loss(spec, **keywords)
    with pytest.raises(MicrosegError, match="deep supervision sets the dilation kernel"):
        build_loss("ag_bce:k=3", scale_kernel_size=2)


@pytest.mark.parametrize(
    "spec,keywords,message",
    [
        ("ag_bce", {"hard_wieght": 3}, "unknown option 'hard_wieght' for loss 'ag_bce'; its options: hard_weight"),
        ("adaptive_focal", {"gamma": 2}, "unknown option 'gamma' .*focal_gamma"),
        ("dice+focal", {"k": 3}, "unknown option 'k' for loss 'dice\\+focal'; its options: dice: smooth, batch; focal"),
        ("adaptive_focal", {"detach_gamma": "false"}, "detach_gamma='false' must be true or false"),
        ("ag_bce", {"w": "10"}, "w='10' must be > 0"),
        ("focal", {"alpha": float("nan")}, "alpha=nan must be in \\[0, 1\\] or none"),
        ("dice", {"dataset_stats": None, "batch": 1}, "batch=1 must be true or false"),
    ],
)
def test_keyword_options_are_checked_like_spec_options(spec, keywords, message):
    with pytest.raises(MicrosegError, match=message):
        build_loss(spec, **keywords)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("dcie", "valid names: adaptive_focal, afl, ag_bce"),
        ("dice+focsl", "'focsl'"),
        ("ag_bce:x=3", "hard_weight \\(w\\), kernel_size \\(k\\), beta, eps"),
        ("ag_bce:w=2,hard_weight=3", "repeated option 'hard_weight'"),
        ("focal:alpha=high", "option alpha='high' must be in \\[0, 1\\] or none"),
        ("ag_bce:k=2.5", "option k=2.5 must be an integer >= 1"),
        ("adaptive_focal:detach_gamma=1", "must be true or false"),
        ("adaptive_focal:focusing=sometimes", "focusing='sometimes' must be one of adaptive, fixed"),
        ("ag_bce:k=0", "option k=0 must be an integer >= 1"),
        ("calf:stats=1", "unknown option 'stats' for loss 'calf'"),
        ("-1*dice", "term weight -1 of 'dice' must be > 0"),
        ("0*dice", "term weight 0 of 'dice' must be > 0"),
    ],
)
def test_spec_errors_name_the_culprit(spec, message):
    with pytest.raises(MicrosegError, match=message):
        build_loss(spec)


@pytest.mark.parametrize(
    "spec",
    ["", "dice+", "+dice", "0.5*", "x*dice", "dice:", "dice:smooth", "dice:smooth=1,smooth=2", "di ce", "nan*dice"],
)
def test_malformed_specs_are_quoted(spec):
    with pytest.raises(MicrosegError, match="malformed loss spec"):
        build_loss(spec)


def test_built_composite_holds_its_weights_and_resolved_options():
    built = build_loss("0.5*dice+ag_bce:w=2")
    assert built.weights == [0.5, 1.0] and [t.name for t in built.terms] == ["dice", "ag_bce"]
    ag_bce = built.terms[1]
    resolved = {k: getattr(ag_bce, k) for k in ag_bce.option_rules}
    assert resolved == {"hard_weight": 2, "kernel_size": 4, "beta": 0.5, "eps": 1e-6}
    assert yaml.safe_load(yaml.safe_dump(resolved)) == resolved  # plain data
    assert build_loss("bce").option_rules == {}


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
    ours = resize_target(expert, (size, size))
    ref = [
        cv2.resize(m[0].numpy().astype(np.float64), (size, size)).astype(np.float32).astype(np.int64) for m in expert
    ]
    np.testing.assert_array_equal(ours[:, 0].numpy(), np.stack(ref))


def test_nearest_and_area_resizes_stay_binary():
    _, expert, _ = case(3)
    nearest = resize_target(expert, (8, 8), "nearest")[:, 0].numpy()
    ref = np.stack([cv2.resize(m[0].numpy(), (8, 8), interpolation=cv2.INTER_NEAREST_EXACT) for m in expert])
    np.testing.assert_array_equal(nearest, ref)
    area = resize_target(expert, (8, 8), "area")[:, 0].numpy()
    ref = np.stack([cv2.resize(m[0].numpy(), (8, 8), interpolation=cv2.INTER_AREA) >= 0.5 for m in expert])
    np.testing.assert_array_equal(area, ref.astype(np.float32))
    assert set(np.unique(area)) <= {0.0, 1.0}


def cv2_floor(masks: torch.Tensor, size: int) -> torch.Tensor:
    """The reference resize of [N, 1, H, W] masks to size x size: cv2 (bilinear), then truncation."""
    resized = [cv2.resize(m[0].numpy().astype(np.float64), (size, size)) for m in masks]
    return torch.from_numpy(np.stack(resized).astype(np.float32)).floor()[:, None]


def test_deep_supervision_uses_per_scale_kernels_and_sums():
    logits, expert, non_expert = case(4)
    aux = [torch.randn(2, 1, s, s, generator=torch.Generator().manual_seed(s)) for s in (4, 8, 16)]
    weights = (0.5, 1.0, 2.0, 3.0)
    ds = DeepSupervision("ag_bce", weights=weights)
    out = ds(logits, aux, expert, non_expert)
    assert out.scales == (4, 8, 16, 32)
    for value, output, k in zip(out.per_scale, [*aux, logits], (1, 2, 3, 4), strict=True):
        size = output.shape[-1]
        want = AGBCE(kernel_size=k)(output, cv2_floor(expert, size), cv2_floor(non_expert, size))
        torch.testing.assert_close(value, want)
    torch.testing.assert_close(out.total, sum(w * v for w, v in zip(weights, out.per_scale, strict=True)))
    assert [loss.kernel_size for loss in ds.losses] == [1, 2, 3, 4]
    with pytest.raises(MicrosegError, match="deep supervision sets the dilation kernel of each scale"):
        DeepSupervision("ag_bce:k=3")  # would otherwise be k = 3 at every scale
    assert [t.kernel_size for t in DeepSupervision("dice+ag_bce", kernel_sizes=(1, 5)).losses[1].terms[1:]] == [5]


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


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weights": (1.0, -1.0, 1.0, 1.0)}, "weights\\[1\\]=-1.0 must be >= 0"),
        ({"weights": (1.0, float("nan"), 1.0, 1.0)}, "weights\\[1\\]=nan must be >= 0"),
        ({"weights": (0, 0, 0, 0)}, "are all 0"),
        ({"kernel_sizes": (0, 2, 3, 4)}, "kernel_sizes\\[0\\]=0 must be an integer >= 1"),
        ({"kernel_sizes": (1, 2.5, 3, 4)}, "kernel_sizes\\[1\\]=2.5 must be an integer >= 1"),
    ],
)
def test_deep_supervision_weights_and_kernels_are_checked(kwargs, message):
    with pytest.raises(MicrosegError, match=message):
        DeepSupervision("ag_bce", **kwargs)


def test_deep_supervision_refuses_aux_outputs_finest_first():
    logits, expert, non_expert = case(6)
    ds = DeepSupervision("ag_bce")
    aux = [torch.zeros(2, 1, s, s) for s in (4, 8, 16)]
    assert ds(logits, aux, expert, non_expert).scales == (4, 8, 16, 32)
    for wrong in (aux[::-1], [aux[0], aux[0], aux[2]], [aux[0], aux[1], torch.zeros(2, 1, 32, 32)]):
        with pytest.raises(MicrosegError, match="coarsest first"):
            ds(logits, wrong, expert, non_expert)


def test_deep_supervision_hands_sample_stats_to_every_scale():
    """A-FL with per-patient statistics: every scale's loss uses the same given P_fg and gamma_mSa."""
    logits, expert, _ = case(7)
    aux = [torch.randn(2, 1, s, s, generator=torch.Generator().manual_seed(s)) for s in (8, 16)]
    stats = {"afl_fg_fraction": torch.tensor([0.1, 0.3]), "afl_gamma_msa": torch.tensor([0.05, 0.2])}
    out = DeepSupervision("afl", kernel_sizes=(1, 2, 3))(logits, aux, expert, sample_stats=stats)
    for value, output in zip(out.per_scale, [*aux, logits], strict=True):
        target = resize_target(expert, output.shape[2:])
        torch.testing.assert_close(value, build_loss("afl")(output, target, sample_stats=stats))
    with pytest.raises(MicrosegError, match="needs each slice's patient statistics"):
        DeepSupervision("afl")(logits, [], expert)
    with pytest.raises(MicrosegError, match="unknown sample statistics \\['fg'\\]"):
        DeepSupervision("dice")(logits, [], expert, sample_stats={"fg": torch.zeros(2)})
    with pytest.raises(MicrosegError, match="must be a \\[B\\] = \\[2\\] tensor"):
        bad = {"afl_fg_fraction": torch.zeros(2, 1), "afl_gamma_msa": torch.zeros(2)}
        build_loss("afl")(logits, expert, sample_stats=bad)


def test_every_registered_loss_is_buildable_by_name():
    assert set(LOSSES) == {
        "focal",
        "bce",
        "ag_bce",
        "adaptive_focal",
        "afl",
        "calf",
        "dice",
        "iou",
        "tversky",
        "dice_ce",
        "dice_focal",
    }


# ---------------------------------------------------------------- option ranges


def test_every_option_of_every_loss_has_a_rule_and_its_default_satisfies_it():
    import inspect

    for name, cls in LOSSES.items():
        named = [p for p in inspect.signature(cls).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        params = {p.name: p.default for p in named if p.name != cls.dataset_stats_param}
        assert set(params) == set(cls.option_rules), name
        for key, default in params.items():
            assert cls.option_rules[key].accepts(default), (name, key, default)
            with pytest.raises(MicrosegError, match=f"option {key}=<object"):
                build_loss(name, **{key: object()})  # no type slips through


@pytest.mark.parametrize(
    "spec,message",
    [
        ("ag_bce:w=-4", "ag_bce: option w=-4 must be > 0"),
        ("ag_bce:w=-1", "ag_bce: option w=-1 must be > 0"),
        ("ag_bce:w=0", "ag_bce: option w=0 must be > 0"),
        ("ag_bce:beta=2", "ag_bce: option beta=2 must be in \\(0, 1\\)"),
        ("ag_bce:beta=-0.5", "ag_bce: option beta=-0.5 must be in \\(0, 1\\)"),
        ("ag_bce:eps=-1", "ag_bce: option eps=-1 must be in \\(0, 0.01\\]"),
        ("ag_bce:eps=0.6", "ag_bce: option eps=0.6 must be in \\(0, 0.01\\]"),
        ("ag_bce:eps=0", "ag_bce: option eps=0 must be in"),
        ("adaptive_focal:beta=-1", "adaptive_focal: option beta=-1 must be > 0"),
        ("adaptive_focal:eps=0.6", "adaptive_focal: option eps=0.6 must be in"),
        ("adaptive_focal:focal_gamma=-1", "option focal_gamma=-1 must be >= 0"),
        ("adaptive_focal:gamma_min=0", "option gamma_min=0 must be in \\(0, 2\\]"),
        ("adaptive_focal:k=0", "adaptive_focal: option k=0 must be an integer >= 1"),
        ("focal:gamma=-1", "focal: option gamma=-1 must be >= 0"),
        ("focal:alpha=1.5", "focal: option alpha=1.5 must be in \\[0, 1\\] or none"),
        ("focal:alpha=-1", "focal: option alpha=-1 must be in \\[0, 1\\] or none"),
        ("focal:double_sigmoid=yes", "double_sigmoid='yes' must be true or false"),
        ("dice:smooth=-1", "dice: option smooth=-1 must be > 0"),
        ("iou:smooth=0", "iou: option smooth=0 must be > 0"),
        ("tversky:alpha=-0.1", "tversky: option alpha=-0.1 must be >= 0"),
        ("tversky:alpha=0,beta=0", "alpha \\+ beta must be > 0"),
        ("dice_focal:gamma=-3", "dice_focal: option gamma=-3 must be >= 0"),
        ("dice_ce:lambda_ce=0", "dice_ce: option lambda_ce=0 must be > 0"),
        ("dice_focal:lambda_dice=-1", "dice_focal: option lambda_dice=-1 must be > 0"),
        ("afl:alpha=2", "afl: option alpha=2 must be in \\[0, 1\\]"),
        ("afl:gamma=-2", "afl: option gamma=-2 must be >= 0"),
        ("afl:stats=volume", "afl: option stats='volume' must be one of patient, slice"),
        ("afl:use_gamma_msa=0", "afl: option use_gamma_msa=0 must be true or false"),
        ("calf:clamp_eps=0", "calf: option clamp_eps=0 must be in \\(0, 0.01\\]"),
    ],
)
def test_out_of_range_options_are_refused_naming_loss_and_option(spec, message):
    with pytest.raises(MicrosegError, match=message):
        build_loss(spec)


def _terms(loss) -> list:
    """A built loss as (weight, name, every option's value) per term."""
    pairs = zip(getattr(loss, "weights", [1.0]), getattr(loss, "terms", [loss]), strict=True)
    return [(w, t.name, sorted((k, getattr(t, k)) for k in t.option_rules)) for w, t in pairs]


@pytest.mark.parametrize(
    "spellings, canonical",
    [
        (["dice", " dice ", "1*dice", "dice:smooth=1e-5", "dice:smooth=0.00001", "dice:batch=false"], "dice"),
        (
            [
                "dice:smooth=1,batch=true",
                "dice:smooth=1, batch=true",
                "dice:batch=true,smooth=1",
                "dice:smooth=1.0,batch=TRUE",
            ],
            "dice:batch=true,smooth=1",
        ),
        (["ag_bce:w=2", "ag_bce:hard_weight=2.0", " ag_bce : hard_weight = 2 "], "ag_bce:hard_weight=2"),
        (["focal+0.5*dice", "0.5 * dice + focal:gamma=2,alpha=0.25", "5e-1*dice+1.0*focal"], "0.5*dice+focal"),
        (["focal:alpha=none", "focal:gamma=2.0,alpha=none"], "focal:alpha=none"),
        (["calf", "calf:include_empty=true"], "calf"),
    ],
)
def test_equivalent_spellings_have_one_canonical_spec(spellings, canonical):
    assert {canonical_spec(spec) for spec in spellings} == {canonical}
    assert canonical_spec(canonical) == canonical
    for spec in spellings:  # the canonical spec builds the loss the spelling builds (same terms, weights, options)
        if "calf" in spec:
            continue  # needs training-set statistics to build
        assert sorted(_terms(build_loss(spec)), key=str) == sorted(_terms(build_loss(canonical)), key=str)


def test_different_losses_keep_different_canonical_specs_and_bad_ones_are_refused():
    specs = ["dice", "dice:batch=true", "dice:smooth=1", "2*dice", "dice+focal", "focal:alpha=none", "iou"]
    assert len({canonical_spec(spec) for spec in specs}) == len(specs)
    for spec, message in [("dice:smooth=-1", "smooth=-1"), ("ag_bce:k=3", "deep supervision"), ("dcie", "unknown")]:
        with pytest.raises(MicrosegError, match=message):
            canonical_spec(spec)


def test_check_spec_refuses_what_deep_supervision_would_before_any_statistics():
    check_spec("0.5*dice+ag_bce:w=2")
    check_spec("calf:include_empty=false")  # no statistics needed to check the options
    for spec, message in [
        ("ag_bce:w=-4", "w=-4 must be > 0"),
        ("ag_bce:k=3", "deep supervision sets"),
        ("calf:clamp_eps=0", "clamp_eps=0 must be"),
        ("calf:x=1", "unknown option 'x'"),
        ("tversky:alpha=0,beta=0", "alpha \\+ beta"),
        ("dcie", "unknown loss"),
    ]:
        with pytest.raises(MicrosegError, match=message):
            check_spec(spec)


# ---------------------------------------------------------------- the parsed spec


def test_a_loss_spec_is_parsed_once_into_an_immutable_value():
    spec = LossSpec.parse(" 0.5*dice + ag_bce:w=3,k=2 ")
    assert spec.text == " 0.5*dice + ag_bce:w=3,k=2 "  # as written
    assert [(t.weight, t.name, t.options) for t in spec.terms] == [
        (0.5, "dice", {}),
        (1.0, "ag_bce", {"hard_weight": 3.0, "kernel_size": 2}),  # constructor names, converted by their rules
    ]
    assert isinstance(spec.terms[1].options["hard_weight"], float)
    assert str(spec) == spec.canonical == "0.5*dice+ag_bce:hard_weight=3,kernel_size=2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.terms = ()  # type: ignore[misc]
    spec.terms[1].options["hard_weight"] = 9.0  # a copy: the term keeps its value
    assert spec.terms[1].options["hard_weight"] == 3.0
    same = LossSpec.parse("ag_bce:kernel_size=2,hard_weight=3.0+0.5*dice:smooth=1e-5")
    assert same == spec and hash(same) == hash(spec) and len({spec, same}) == 1
    assert spec != LossSpec.parse("0.5*dice+ag_bce:w=3,k=3") and spec != str(spec)
    for text, message in [("dcie", "unknown loss"), ("ag_bce:w=-4", "w=-4 must be > 0"), ("dice+", "malformed")]:
        with pytest.raises(MicrosegError, match=message):
            LossSpec.parse(text)


def test_the_parsed_spec_builds_what_its_text_builds():
    logits, expert, non_expert = case(3)
    for text, keywords in [("0.5*dice+ag_bce:w=2", {}), ("adaptive_focal", {"kernel_size": 4}), ("ag_bce", {"w": 3})]:
        from_text = build_loss(text, **keywords)(logits, expert, non_expert)
        torch.testing.assert_close(build_loss(LossSpec.parse(text), **keywords)(logits, expert, non_expert), from_text)
    assert build_loss(LossSpec.parse("0.5 * dice+focal")).name == "0.5*dice+focal"  # named as written
    assert check_spec("ag_bce:w=2") == LossSpec.parse("ag_bce:hard_weight=2")
    assert canonical_spec(LossSpec.parse("ag_bce:w=2")) == "ag_bce:hard_weight=2"
    fractions = np.array([0.0, 0.1, 0.3])
    assert dataset_statistics(LossSpec.parse("calf"), lambda: fractions) == dataset_statistics(
        "calf", lambda: fractions
    )


def test_deep_supervision_and_build_loss_parse_a_text_spec_once(monkeypatch):
    from microseg.losses import registry

    calls = []
    parse = registry.parse_spec

    def counted(text):
        calls.append(text)
        return parse(text)

    monkeypatch.setattr(registry, "parse_spec", counted)
    ds = DeepSupervision("dice+ag_bce:w=2", kernel_sizes=(1, 2, 3, 4))
    assert calls == ["dice+ag_bce:w=2"] and len(ds.losses) == 4 and ds.spec == LossSpec.parse("dice+ag_bce:w=2")
    calls.clear()
    spec = LossSpec.parse("calf")
    calls.clear()
    DeepSupervision(spec, dataset_stats=calf_stats(np.array([0.1, 0.2]), True))
    dataset_statistics(spec, lambda: np.array([0.1, 0.2]))
    check_spec(spec)
    assert calls == []  # the parsed value travels: nothing parses it again
