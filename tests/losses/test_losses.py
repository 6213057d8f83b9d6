"""Loss values against independent references: torchvision, OpenCV + NumPy, scipy, and numbers worked by hand."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from microseg.core.errors import MicrosegError
from microseg.core.patient_stats import patient_statistics
from microseg.losses import CalfStats, build_loss, calf_stats, dataset_statistics, hard_region
from microseg.losses.adaptive_focal import AdaptiveFocal
from microseg.losses.afl import AFL
from microseg.losses.calf import CALF, choose_branch

LN3 = math.log(3.0)


def t(values, shape=None) -> torch.Tensor:
    x = torch.tensor(values, dtype=torch.float64)
    return x.reshape(shape) if shape else x


def random_case(seed: int, shape=(3, 1, 13, 17)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    expert = (torch.rand(shape, generator=g) > 0.6).double()
    non_expert = expert.clone()
    flip = torch.rand(shape, generator=g) > 0.9  # annotations disagree on ~10% of pixels
    non_expert[flip] = 1 - non_expert[flip]
    return logits, expert, non_expert


def cv2_hard(expert: np.ndarray, non_expert: np.ndarray, k: int) -> np.ndarray:
    """The reference: per-sample cv2.dilate of the XOR with a k x k rectangle."""
    xor = np.logical_xor(expert > 0.5, non_expert > 0.5).astype(np.uint8)
    kernel = np.ones((k, k), np.uint8)
    return np.stack([cv2.dilate(xor[i, 0], kernel)[None] for i in range(len(xor))]).astype(np.float64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- hard region


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_hard_region_matches_cv2_dilate(k):
    _, expert, non_expert = random_case(k)
    ours = hard_region(expert, non_expert, k).numpy()
    np.testing.assert_array_equal(ours, cv2_hard(expert.numpy(), non_expert.numpy(), k))


def test_even_kernel_grows_down_and_right():
    """OpenCV's anchor k // 2: k = 2 grows 0 pixels up/left and 1 down/right; k = 4 grows 1 and 2."""
    expert = torch.zeros(1, 1, 7, 7)
    expert[0, 0, 3, 3] = 1
    k2 = hard_region(expert, torch.zeros_like(expert), 2)[0, 0]
    assert k2.nonzero().tolist() == [[3, 3], [3, 4], [4, 3], [4, 4]]
    k4 = hard_region(expert, torch.zeros_like(expert), 4)[0, 0]
    assert k4[2:6, 2:6].sum() == 16 and k4.sum() == 16


@pytest.mark.parametrize("k", [2, 3])
def test_hard_region_3d_is_a_box_dilation_with_the_same_anchor(k):
    _, expert, non_expert = random_case(10 + k, shape=(2, 1, 5, 6, 7))
    ours = hard_region(expert, non_expert, k, spatial_dims=3).numpy()
    xor = np.logical_xor(expert.numpy() > 0.5, non_expert.numpy() > 0.5).astype(np.uint8)
    for b in range(2):
        slices = np.stack([cv2.dilate(s, np.ones((k, k), np.uint8)) for s in xor[b, 0]])  # in-plane
        depth = cv2.dilate(slices.reshape(5, -1), np.ones((k, 1), np.uint8)).reshape(slices.shape)  # along D
        np.testing.assert_array_equal(ours[b, 0], depth)


# ---------------------------------------------------------------- focal


@pytest.mark.parametrize("shape", [(2, 1, 7, 9), (1, 1, 3, 4, 5)])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.6, 0.0), (None, 3.5), (0.25, 1.0)])
@pytest.mark.parametrize("double_sigmoid", [False, True])
def test_focal_equals_torchvision(shape, alpha, gamma, double_sigmoid):
    """alpha=none is torchvision's alpha < 0; double_sigmoid is torchvision's loss of sigmoid(logits)."""
    logits, target, _ = random_case(1, shape)
    ours_x = logits.clone().requires_grad_()
    ref_x = logits.clone().requires_grad_()
    alpha_text = "none" if alpha is None else alpha
    spec = f"focal:alpha={alpha_text},gamma={gamma},double_sigmoid={str(double_sigmoid).lower()}"
    ours = build_loss(spec)(ours_x, target)
    ref_input = torch.sigmoid(ref_x) if double_sigmoid else ref_x
    ref = sigmoid_focal_loss(ref_input, target, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="mean")
    torch.testing.assert_close(ours, ref)
    ours.backward(), ref.backward()
    torch.testing.assert_close(ours_x.grad, ref_x.grad)


def test_double_sigmoid_focal_has_the_floor_of_the_paper_baseline():
    """FL(sigmoid(x)): a background pixel costs at least 0.75 * 0.5^2 * ln 2 however negative its logit."""
    target = torch.zeros(1, 1, 2, 2)
    floor = build_loss("focal:double_sigmoid=true")(torch.full((1, 1, 2, 2), -30.0), target)
    assert floor.item() == pytest.approx(0.75 * 0.25 * math.log(2.0), rel=1e-6)
    assert build_loss("focal")(torch.full((1, 1, 2, 2), -30.0), target).item() < 1e-20


# ---------------------------------------------------------------- AG-BCE


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("w", [1.0, 4.0, 10.0])
def test_ag_bce_matches_facts_formula_with_cv2(k, w):
    logits, expert, non_expert = random_case(20 + k)
    x, y = logits.numpy(), expert.numpy()
    hard = cv2_hard(y, non_expert.numpy(), k)
    p, beta, eps = sigmoid(x), 0.5, 1e-6
    bce = -(beta * y * np.log(p + eps) + (1 - beta) * (1 - y) * np.log(1 - p + eps))
    expected = (np.sum(bce * (1 - hard)) / (1 + w) + w * np.sum(bce * hard) / (1 + w)) / y.size
    ours = build_loss(f"ag_bce:w={w},k={k}")(logits, expert, non_expert)
    assert ours.item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- adaptive focal

# 1x1x2x2 case worked by hand: p = sigmoid(x) = [[0.5, 0.75], [0.25, sigmoid(2)]],
# y = [[1, 1], [0, 0]], non-expert = [[1, 0], [0, 0]]  ->  hard (k = 1) = XOR = [[0, 1], [0, 0]].
AF_X = t([0.0, LN3, -LN3, 2.0], (1, 1, 2, 2))
AF_Y = t([1, 1, 0, 0.0], (1, 1, 2, 2))
AF_NE = t([1, 0, 0, 0.0], (1, 1, 2, 2))


def hand_adaptive_focal(focusing="adaptive"):
    s2 = 1 / (1 + math.exp(-2))
    gamma = (1 - (0.5 + 0.75 + 0.25 + s2) / 4) + 1 / 4
    p_t = [0.5, 0.75, 0.75, 1 - s2]
    exponent = gamma if focusing == "adaptive" else 2.0
    focal = [-0.5 * (1 - q) ** exponent * math.log(q + 1e-6) for q in p_t]
    hard = [0, 1, 0, 0]
    return sum(f * (gamma if h else 1 / gamma) for f, h in zip(focal, hard, strict=True)) / 4


@pytest.mark.parametrize("focusing", ["adaptive", "fixed"])
def test_adaptive_focal_by_hand(focusing):
    ours = build_loss(f"adaptive_focal:k=1,focusing={focusing}")(AF_X, AF_Y, AF_NE)
    assert ours.item() == pytest.approx(hand_adaptive_focal(focusing), rel=1e-9)


def reference_adaptive_focal(x, y, ne, k):
    """The public code's algorithm on a batch (NumPy + cv2): batch-wide gamma, N = B*H*W, p clamped."""
    hard = cv2_hard(y, ne, k)
    eps, beta = 1e-6, 0.5
    gamma = (1 - sigmoid(x).mean()) + ne.mean()
    p = np.clip(sigmoid(x), eps, 1 - eps)
    p_t = np.where(y == 1, p, 1 - p)
    focal = -beta * (1 - p_t) ** gamma * np.log(p_t + eps)
    return (gamma * np.sum(focal * hard) + np.sum(focal * (1 - hard)) / gamma) / y.size


@pytest.mark.parametrize("k", [2, 4])
def test_adaptive_focal_batch_scope_matches_public_algorithm(k):
    logits, expert, non_expert = random_case(30 + k)
    x, y, ne = logits.numpy(), expert.numpy(), non_expert.numpy()
    batch = build_loss(f"adaptive_focal:k={k},gamma_scope=batch")(logits, expert, non_expert)
    assert batch.item() == pytest.approx(reference_adaptive_focal(x, y, ne, k), rel=1e-6)
    per_sample = build_loss(f"adaptive_focal:k={k}")(logits, expert, non_expert)
    expected = np.mean([reference_adaptive_focal(x[i : i + 1], y[i : i + 1], ne[i : i + 1], k) for i in range(len(x))])
    assert per_sample.item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_focal_gamma_gradient_switch_and_clamp():
    x = AF_X.clone().requires_grad_()
    build_loss("adaptive_focal:k=1,detach_gamma=false")(x, AF_Y, AF_NE).backward()
    with_gamma_grad = x.grad.clone()
    x.grad = None
    build_loss("adaptive_focal:k=1")(x, AF_Y, AF_NE).backward()
    assert not torch.allclose(with_gamma_grad, x.grad)
    # mean(p) -> 1 and an empty non-expert mask: gamma -> 0 is clamped at gamma_min = 0.1
    loss = AdaptiveFocal(kernel_size=1)
    gamma = loss.adaptive_gamma(torch.full((1, 1, 2, 2), 50.0), torch.zeros(1, 1, 2, 2))
    assert gamma.item() == pytest.approx(0.1)


# ---------------------------------------------------------------- A-FL


def test_afl_2d_by_hand():
    """y = [[1, 0], [0, 0]]: numpy.gradient (one-sided on 2 points) gives |grad| = [[sqrt 2, 1], [1, 0]]."""
    x, y = t([0.0, LN3, -LN3, 2.0], (1, 1, 2, 2)), t([1, 0, 0, 0.0], (1, 1, 2, 2))
    alpha_va, gamma = 3 / 4, 1 / 4 + (math.sqrt(2) + 2) / 4
    p = [0.5, 0.75, 0.25, 1 / (1 + math.exp(-2))]
    p_t = [p[0], 1 - p[1], 1 - p[2], 1 - p[3]]
    alpha_t = [alpha_va, 1 - alpha_va, 1 - alpha_va, 1 - alpha_va]
    expected = sum(-a * (1 - q) ** gamma * math.log(q) for a, q in zip(alpha_t, p_t, strict=True)) / 4
    assert build_loss("afl:stats=slice")(x, y).item() == pytest.approx(expected, rel=1e-9)
    uniform = sum(-alpha_va * (1 - q) ** gamma * math.log(q) for q in p_t) / 4
    assert build_loss("afl:alpha_weighting=uniform,stats=slice")(x, y).item() == pytest.approx(uniform, rel=1e-9)


def test_patient_statistics_by_hand():
    """One foreground voxel in a zero volume. At the centre of 5^3 the six face neighbours have central
    differences 1/2 along one axis: gamma_mSa = 6 * 0.5 / 125. In 3^3 they lie on the border, where the
    one-sided difference is 1: 6 / 27; with a z spacing of 2 the two z neighbours count 1/2: 5 / 27."""
    five = np.zeros((5, 5, 5))
    five[2, 2, 2] = 1
    assert patient_statistics(five) == pytest.approx((1 / 125, 3 / 125), rel=1e-12)
    three = np.zeros((3, 3, 3), np.uint8)
    three[1, 1, 1] = 255  # non-zero is foreground
    assert patient_statistics(three) == pytest.approx((1 / 27, 6 / 27), rel=1e-12)
    assert patient_statistics(three, (2.0, 1.0, 1.0)) == pytest.approx((1 / 27, 5 / 27), rel=1e-12)
    # a single slice: z is skipped (length 1); y = [[1, 0]] -> |grad| = [1, 1] along x
    assert patient_statistics(np.array([[[1, 0]]])) == pytest.approx((0.5, 1.0), rel=1e-12)
    for bad, spacing in [(np.zeros((2, 2)), None), (np.full((2, 2, 2), np.nan), None), (five, (1.0, 0.0, 1.0))]:
        with pytest.raises(MicrosegError):
            patient_statistics(bad, spacing)


def test_afl_slices_get_their_patients_parameters():
    """Slices of one volume with stats=patient: alpha_va and gamma from the whole volume (Eqs. 1-6), not the slice."""
    logits, _, _ = random_case(42, shape=(1, 1, 4, 6, 7))
    target = torch.zeros_like(logits)  # slice 0 empty, 1 and 2 growing blocks, 3 full
    target[0, 0, 1, 2:4, 2:5], target[0, 0, 2, 1:5, 1:6], target[0, 0, 3] = 1, 1, 1
    fg, gamma_msa = patient_statistics(target[0, 0].numpy())
    x, y = logits[0, 0].numpy(), target[0, 0].numpy()  # the volume's 4 slices [4, 6, 7]
    p_t = np.where(y == 1, sigmoid(x), 1 - sigmoid(x))
    alpha_t = np.where(y == 1, 1 - fg, fg)
    expected = np.mean(-alpha_t * (1 - p_t) ** (fg + gamma_msa) * np.log(p_t))
    slices, slice_targets = logits[0].transpose(0, 1), target[0].transpose(0, 1)  # [4, 1, 6, 7]
    stats = {
        "afl_fg_fraction": torch.full((4,), fg, dtype=torch.float64),
        "afl_gamma_msa": torch.full((4,), gamma_msa, dtype=torch.float64),
    }
    per_patient = build_loss("afl")(slices, slice_targets, sample_stats=stats)
    assert per_patient.item() == pytest.approx(expected, rel=1e-9)
    per_slice = build_loss("afl:stats=slice")(slices, slice_targets, sample_stats=stats)  # stats=slice ignores them
    assert per_slice.item() == pytest.approx(build_loss("afl:stats=slice")(slices, slice_targets).item(), rel=1e-12)
    assert abs(per_slice.item() - expected) > 1e-2
    # per slice, the empty and the full slice get zero class weight on all their pixels; per patient they count
    empty_and_full = [0, 3]
    slice_only = build_loss("afl:stats=slice")(slices[empty_and_full], slice_targets[empty_and_full])
    patient = build_loss("afl")(
        slices[empty_and_full], slice_targets[empty_and_full], sample_stats={k: v[:2] for k, v in stats.items()}
    )
    assert slice_only.item() == 0.0 and patient.item() > 0.01
    # a volume is its own patient: no statistics needed, and the same numbers as the host-side ones
    volume = build_loss("afl")(logits, target).item()
    given = {k: v[:1] for k, v in stats.items()}
    assert volume == pytest.approx(build_loss("afl")(logits, target, sample_stats=given).item(), rel=1e-9)
    with pytest.raises(MicrosegError, match="stats=patient.*or use afl:stats=slice"):
        build_loss("afl")(slices, slice_targets)
    with pytest.raises(MicrosegError, match="afl_gamma_msa"):
        build_loss("afl")(slices, slice_targets, sample_stats={"afl_fg_fraction": stats["afl_fg_fraction"]})
    only_fg = {"afl_fg_fraction": stats["afl_fg_fraction"]}  # gamma_mSa switched off: P_fg is enough
    assert torch.isfinite(build_loss("afl:use_gamma_msa=false")(slices, slice_targets, sample_stats=only_fg))


def test_afl_3d_against_numpy_gradient():
    logits, target, _ = random_case(40, shape=(2, 1, 4, 5, 6))
    x, y = logits.numpy(), target.numpy()
    expected = []
    for b in range(2):
        fg = y[b, 0].mean()
        gamma = fg + np.mean(np.sqrt(sum(g**2 for g in np.gradient(y[b, 0]))))
        p_t = np.where(y[b, 0] == 1, sigmoid(x[b, 0]), 1 - sigmoid(x[b, 0]))
        alpha_t = np.where(y[b, 0] == 1, 1 - fg, fg)
        expected.append(np.mean(-alpha_t * (1 - p_t) ** gamma * np.log(p_t)))
    assert build_loss("afl")(logits, target).item() == pytest.approx(np.mean(expected), rel=1e-9)


def test_afl_ablation_switches():
    logits, target, _ = random_case(41, shape=(2, 1, 6, 7))
    off = build_loss("afl:use_alpha_va=false,use_gamma_va=false,use_gamma_msa=false,stats=slice")(logits, target)
    torch.testing.assert_close(off, sigmoid_focal_loss(logits, target, 0.25, 2.0, "mean"))  # Table 5, row 1
    alpha_only = build_loss("afl:use_gamma_va=false,use_gamma_msa=false,stats=slice")(logits, target)
    per_sample = [sigmoid_focal_loss(logits[i], target[i], 1 - target[i].mean().item(), 2.0, "mean") for i in range(2)]
    torch.testing.assert_close(alpha_only, torch.stack(per_sample).mean())
    assert AFL(use_gamma_va=False, stats="slice")(logits, target) != AFL(stats="slice")(logits, target)


# ---------------------------------------------------------------- CALF


def two_point(n_high: int, n: int) -> list[float]:
    """Areas 1 and 2, a share q = n_high / n of 2s: S = (1 - 2q) / sqrt(q(1 - q)), K = (1 - 6q(1 - q)) / (q(1 - q))."""
    return [2.0] * n_high + [1.0] * (n - n_high)


@pytest.mark.parametrize(
    "n_high,n,branch",
    [
        (5, 10, "log10"),
        (2, 5, "log10"),
        (3, 5, "arcsine"),
        (3, 10, "ln"),
        (7, 10, "logit"),
        (1, 5, "log10"),
        (4, 5, "fisher"),
    ],
)
def test_calf_branch_on_two_point_sets(n_high, n, branch):
    q = n_high / n
    stats = calf_stats(two_point(n_high, n))
    assert stats.skewness == pytest.approx((1 - 2 * q) / math.sqrt(q * (1 - q)), abs=1e-12)
    assert stats.kurtosis == pytest.approx((1 - 6 * q * (1 - q)) / (q * (1 - q)), abs=1e-12)
    assert (stats.n, stats.branch) == (n, branch)


def hand_moments(a: np.ndarray) -> tuple[float, float]:
    """Table 1 written out: population skewness and excess kurtosis (sigma with 1/N)."""
    d = a - a.mean()
    sigma = np.sqrt(np.mean(d**2))
    return float(np.mean(d**3) / sigma**3), float(np.mean(d**4) / sigma**4 - 3)


def test_calf_stats_match_table_1_with_and_without_empty_images():
    areas = np.random.default_rng(0).exponential(1000.0, size=200)
    with_empty = np.concatenate([areas, np.zeros(50)])
    stats = calf_stats(with_empty)  # default: every image counts, A_i = 0 without foreground
    assert (stats.skewness, stats.kurtosis) == pytest.approx(hand_moments(with_empty), rel=1e-12)
    assert (stats.n, stats.include_empty) == (250, True)
    skipped = calf_stats(with_empty, include_empty=False)
    assert (skipped.skewness, skipped.kurtosis) == pytest.approx(hand_moments(areas), rel=1e-12)
    assert (skipped.n, skipped.branch, skipped.include_empty) == (200, "log10", False)
    # the reading changes the branch: areas 10 (x8) and 1 (x2), q = 0.8, S = (1 - 2q) / sqrt(q(1 - q)) = -1.5;
    # with 10 empty images the zeros make the long tail the right one (S = 0.398, K = -1.83)
    areas_1_10 = [10.0] * 8 + [1.0] * 2
    assert calf_stats(areas_1_10 + [0.0] * 10, include_empty=False).skewness == pytest.approx(-1.5, rel=1e-12)
    assert calf_stats(areas_1_10 + [0.0] * 10, include_empty=False).branch == "fisher"
    assert calf_stats(areas_1_10 + [0.0] * 10).branch == "log10"
    assert dataset_statistics("dice+calf:include_empty=false", lambda: with_empty) == skipped
    assert dataset_statistics("calf", lambda: with_empty) == stats
    assert dataset_statistics("dice+afl", lambda: with_empty) is None
    with pytest.raises(MicrosegError, match="2 different training-set statistics"):
        dataset_statistics("calf+calf:include_empty=false", lambda: with_empty)
    # symmetric, heavy-tailed (K = 64 / 16 - 3 = 1): BCE-Dice; reversed exponential: Fisher
    assert calf_stats([1.0] + [5.0] * 6 + [9.0]).branch == "bce_dice"
    assert calf_stats(areas.max() + 1 - areas).branch == "fisher"


BRANCH_MOMENTS = {
    "fisher": (-2.0, 0.0),
    "logit": (-0.7, 0.0),
    "arcsine": (-0.2, 0.0),
    "log10": (2.0, 0.0),
    "ln": (0.7, 0.0),
    "bce_dice": (0.2, 1.0),
}


def branch_stats(branch: str, include_empty: bool = True) -> CalfStats:
    """Statistics whose skewness and kurtosis select `branch` (Table 2)."""
    return CalfStats(*BRANCH_MOMENTS[branch], 10, branch, include_empty)


def test_calf_stats_must_be_consistent():
    with pytest.raises(MicrosegError, match="branch 'arcsine' contradicts skewness 2 and kurtosis 0, which select"):
        CalfStats(2.0, 0.0, 10, "arcsine", True)
    for bad in [(float("nan"), 0.0, 10, "log10", True), (2.0, 0.0, 1, "log10", True), (2.0, 0.0, 10, "log10", "no")]:
        with pytest.raises(MicrosegError):
            CalfStats(*bad)
    with pytest.raises(MicrosegError, match="include_empty=False but the statistics were computed with include_emp"):
        build_loss("calf:include_empty=false", dataset_stats=branch_stats("ln"))
    with pytest.raises(MicrosegError, match="given twice"):
        build_loss("calf", dataset_stats=branch_stats("ln"), stats=branch_stats("ln"))
    with pytest.raises(MicrosegError, match="has no term that takes them \\(calf\\)"):
        build_loss("dice", dataset_stats=branch_stats("ln"))
    for spec in ("calf:clamp_eps=0", "calf:clamp_eps=0.6", "calf:include_empty=1"):
        with pytest.raises(MicrosegError, match="calf: option"):
            build_loss(spec, dataset_stats=branch_stats("ln"))


def test_calf_branch_boundaries():
    assert [choose_branch(s, 0.0) for s in (-1.0, -0.5, -0.1, 0.0, 0.5, 1.0)] == [
        "fisher",
        "logit",
        "arcsine",
        "bce_dice",
        "ln",
        "log10",
    ]
    assert choose_branch(0.0, -0.1) == "log10"


@pytest.mark.parametrize("areas", [[5.0], [3.0, 3.0, 3.0], [1.0, float("nan")], [1.0, -2.0, 3.0]])
def test_calf_stats_errors(areas):
    with pytest.raises(MicrosegError):
        calf_stats(areas)


# logits [0, ln 3] -> p = [0.5, 0.75], y = [1, 0]: the y = 0 pixel has 1 - p = 0.25
CALF_BY_HAND = {
    "fisher": -(math.atanh(0.5) + math.atanh(0.25)) / 2,
    "logit": -(math.log(0.5 / 0.5) + math.log(0.25 / 0.75)) / 2,
    "arcsine": -(math.asin(math.sqrt(0.5)) + math.asin(math.sqrt(0.25))) / 2,
    "log10": -(math.log10(0.5) + math.log10(0.25)) / 2,
    "ln": -(math.log(0.5) + math.log(0.25)) / 2,
    "bce_dice": -(math.log(0.5) + math.log(0.25)) / 2 + 1 - (2 * 0.5 + 1e-5) / (1 + 1.25 + 1e-5),
}


@pytest.mark.parametrize("branch", sorted(CALF_BY_HAND))
def test_calf_branch_values_by_hand(branch):
    loss = build_loss("calf", dataset_stats=branch_stats(branch))
    assert loss.branch == branch
    value = loss(t([0.0, LN3], (1, 1, 1, 2)), t([1.0, 0.0], (1, 1, 1, 2)))
    assert value.item() == pytest.approx(CALF_BY_HAND[branch], rel=1e-6)


def test_calf_clamps_unbounded_transforms_on_the_rewarded_side_only():
    y = torch.ones(1, 1, 1, 1)
    logit = build_loss("calf", dataset_stats=branch_stats("logit"))(torch.full((1, 1, 1, 1), 80.0), y)
    assert logit.item() == pytest.approx(-math.log((1 - 1e-6) / 1e-6), rel=1e-5)
    fisher = build_loss("calf", dataset_stats=branch_stats("fisher"))(torch.full((1, 1, 1, 1), 80.0), y)
    assert fisher.item() == pytest.approx(-math.atanh(1 - 1e-6), rel=1e-5)
    # confidently wrong: the paper's value, no clamp (logit: -(-20); fisher: -atanh(sigmoid(-20)))
    wrong = torch.full((1, 1, 1, 1), -20.0)
    assert build_loss("calf", dataset_stats=branch_stats("logit"))(wrong, y).item() == pytest.approx(20.0, rel=1e-6)
    fisher_wrong = build_loss("calf", dataset_stats=branch_stats("fisher"))(wrong, y).item()
    assert fisher_wrong == pytest.approx(-math.atanh(1 / (1 + math.exp(20))), rel=1e-5)


# d/dx of -R(sigmoid(x)) for y = 1, N = 1 pixel, p = sigmoid(x): logit -1, fisher -p / (1 + p), arcsine -sqrt(p(1-p))/2
CALF_GRADIENT = {
    "logit": lambda p: -1.0,
    "fisher": lambda p: -p / (1 + p),
    "arcsine": lambda p: -0.5 * math.sqrt(p * (1 - p)),
}


@pytest.mark.parametrize("branch", sorted(CALF_GRADIENT))
@pytest.mark.parametrize("x,y", [(-20.0, 1.0), (20.0, 0.0), (-3.0, 1.0), (0.5, 1.0)])
def test_calf_bounded_branches_keep_the_gradient_of_wrong_pixels(branch, x, y):
    """Against the analytic gradient (y = 0 mirrors y = 1 with -x): confidently wrong pixels are not clamped away."""
    logits = torch.tensor([[[[x]]]], requires_grad=True)  # float32
    build_loss("calf", dataset_stats=branch_stats(branch))(logits, torch.full_like(logits, y)).backward()
    sign = 1.0 if y == 1.0 else -1.0
    p = 1 / (1 + math.exp(-sign * x))
    assert logits.grad.item() == pytest.approx(sign * CALF_GRADIENT[branch](p), rel=1e-5)
    assert logits.grad.item() != 0.0


def test_calf_arcsine_keeps_float32_precision_near_p_one():
    """asin(sqrt(sigmoid x)) = atan(exp(x / 2)) in float64 is the reference; float32 to a few ulp of pi/2."""
    x = torch.linspace(-30.0, 30.0, 601, dtype=torch.float64)
    loss = build_loss("calf", dataset_stats=branch_stats("arcsine"))
    values = torch.stack([loss(v.float().reshape(1, 1, 1, 1), torch.ones(1, 1, 1, 1)) for v in x]).double()
    reference = -torch.atan(torch.exp(x.float().double() / 2))
    assert (values - reference).abs().max().item() < 4e-7  # float32 ulp at pi/2 is 1.2e-7


def test_calf_needs_stats_and_takes_them_from_yaml():
    with pytest.raises(MicrosegError, match="dataset statistics"):
        build_loss("calf")
    yaml = pytest.importorskip("yaml")
    from dataclasses import asdict

    stats = calf_stats([1.0, 2.0, 2.0, 7.0])
    loaded = yaml.safe_load(yaml.safe_dump(asdict(stats)))
    assert CALF(loaded).stats == stats
    assert build_loss("calf", stats=stats).branch == stats.branch  # the other spelling
    with pytest.raises(MicrosegError):
        CALF({"skewness": 1.0})


# ---------------------------------------------------------------- region and compound losses


def test_region_losses_by_hand():
    """p = [0.5, 0.75], y = [1, 0]: TP = 0.5, sum p = 1.25, sum y = 1, FP = 0.75, FN = 0.5."""
    x, y, s = t([0.0, LN3], (1, 1, 1, 2)), t([1.0, 0.0], (1, 1, 1, 2)), 1e-5
    assert build_loss("dice")(x, y).item() == pytest.approx(1 - (1 + s) / (2.25 + s), rel=1e-9)
    assert build_loss("iou")(x, y).item() == pytest.approx(1 - (0.5 + s) / (1.75 + s), rel=1e-9)
    tversky = 1 - (0.5 + s) / (0.5 + 0.3 * 0.75 + 0.7 * 0.5 + s)
    assert build_loss("tversky")(x, y).item() == pytest.approx(tversky, rel=1e-9)
    swapped = 1 - (0.5 + s) / (0.5 + 0.7 * 0.75 + 0.3 * 0.5 + s)
    assert build_loss("tversky:alpha=0.7,beta=0.3")(x, y).item() == pytest.approx(swapped, rel=1e-9)


def test_dice_per_sample_versus_batch():
    """Sample 1 as above; sample 2: p = [0.25, 0.5] on y = [0, 1] -> TP = 0.5, sum p = 0.75, sum y = 1."""
    x, y, s = t([0.0, LN3, -LN3, 0.0], (2, 1, 1, 2)), t([1.0, 0.0, 0.0, 1.0], (2, 1, 1, 2)), 1e-5
    per_sample = ((1 - (1 + s) / (2.25 + s)) + (1 - (1 + s) / (1.75 + s))) / 2
    assert build_loss("dice")(x, y).item() == pytest.approx(per_sample, rel=1e-9)
    assert build_loss("dice:batch=true")(x, y).item() == pytest.approx(1 - (2 + s) / (4 + s), rel=1e-9)


def test_region_losses_take_3d_and_compounds_add_up():
    logits, target, _ = random_case(50, shape=(2, 1, 3, 4, 5))
    dice = build_loss("dice")(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(build_loss("bce")(logits, target), bce)
    torch.testing.assert_close(build_loss("dice_ce")(logits, target), dice + bce)
    focal = sigmoid_focal_loss(logits, target, alpha=-1, gamma=2.0, reduction="mean")  # MONAI: no alpha
    torch.testing.assert_close(build_loss("dice_focal")(logits, target), dice + focal)
    for name in ("iou", "tversky", "afl"):
        assert build_loss(name)(logits, target).shape == ()
