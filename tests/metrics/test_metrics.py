"""Metrics against medpy (the reference), a brute-force reading of the definition, and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from microseg.core.errors import MicrosegError
from microseg.metrics import PROTOCOLS, dice, hd95, score_case, summarize


def _blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3.0))
    return field > np.quantile(field, rng.uniform(0.3, 0.95))


def _ellipse(shape: tuple[int, ...], centre, radii) -> np.ndarray:
    grid = np.indices(shape)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1


def _mask_pairs():
    """(name, a, b, spacing): blobs, rings, several components, border-touching, single voxels, 1D-3D."""
    rng = np.random.default_rng(7)
    cases = []
    for i in range(40):
        shape = (
            tuple(int(n) for n in rng.integers(4, 40, 2)) if i % 2 else tuple(int(n) for n in rng.integers(3, 14, 3))
        )
        cases.append((f"blob{i}", _blob(rng, shape), _blob(rng, shape), rng.uniform(0.05, 3.0, len(shape))))
    ring = _ellipse((40, 50), (20, 25), (15, 20)) & ~_ellipse((40, 50), (20, 25), (8, 10))
    cases.append(("ring-vs-disk", ring, _ellipse((40, 50), (21, 23), (14, 19)), (0.5, 0.25)))
    comps = (
        _ellipse((40, 50), (8, 8), (5, 6)) | _ellipse((40, 50), (30, 40), (6, 5)) | _ellipse((40, 50), (30, 10), (3, 3))
    )
    cases.append(("components", comps, _ellipse((40, 50), (20, 25), (12, 18)), (0.033586, 0.033586)))
    edge = np.zeros((30, 40), bool)
    edge[:12, :] = True  # touches three image edges
    cases.append(("border-touching", edge, _ellipse((30, 40), (0, 39), (10, 14)), (1.0, 2.0)))
    cases.append(("full-image", np.ones((20, 25), bool), _ellipse((20, 25), (10, 12), (5, 5)), (0.7, 0.3)))
    px_a, px_b = np.zeros((15, 17), bool), np.zeros((15, 17), bool)
    px_a[0, 0], px_b[9, 14] = True, True
    cases.append(("single-pixels", px_a, px_b, (0.5, 1.5)))
    disk = _ellipse((30, 40), (15, 20), (10, 14))
    cases.append(("identical", disk, disk.copy(), (0.3, 0.6)))
    half = disk.copy()
    half[:, 20:] = False  # shares half of the disk's outline
    cases.append(("nested-shared-border", half, disk, (0.5, 0.5)))
    vol = np.zeros((8, 20, 22), bool)
    vol[:, 3:15, 0:10] = True  # 3D, touching the z and x edges
    cases.append(("3d-border-box", vol, _ellipse(vol.shape, (4, 10, 11), (5, 8, 9)), (2.0, 0.1, 0.1)))
    cases.append(("1d", np.arange(30) % 7 < 3, np.arange(30) % 5 == 0, (0.4,)))
    noise = [rng.random((60, 90)) < 0.4 for _ in range(2)]  # ragged borders on square pixels
    cases.append(("ragged-vs-ragged", noise[0], noise[1], (0.033586, 0.033586)))
    cases.append(("ragged-vs-smooth", noise[0], _ellipse((60, 90), (30, 40), (20, 30)), (0.5, 0.5)))
    far = np.zeros((300, 400), bool)
    far[290:, 390:] = rng.random((10, 10)) < 0.6
    cases.append(("ragged-far-apart", far, _ellipse((300, 400), (20, 30), (15, 25)), (0.1, 0.1)))
    return cases


CASES = _mask_pairs()


@pytest.mark.parametrize("name,a,b,spacing", CASES, ids=[c[0] for c in CASES])
def test_dice_and_hd95_match_medpy(name, a, b, spacing):
    assert a.any() and b.any()
    assert dice(a, b) == pytest.approx(medpy_binary.dc(a, b), abs=1e-12)
    assert hd95(a, b, spacing) == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=spacing), abs=1e-6)
    assert hd95(b, a, spacing) == pytest.approx(medpy_binary.hd95(b, a, voxelspacing=spacing), abs=1e-6)


def test_hd95_accepts_non_bool_masks_and_scalar_spacing():
    a = _ellipse((30, 30), (14, 15), (8, 10)).astype(np.uint8) * 255
    b = _ellipse((30, 30), (16, 13), (9, 7)).astype(np.float32)
    assert hd95(a, b, 0.3) == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=0.3), abs=1e-6)


def _brute_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """For each border voxel of a, the distance to the nearest border voxel of b, by all pairs."""

    def border(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(m.ndim, 1))) * spacing

    pa, pb = border(a), border(b)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


BRUTE_CASES = CASES[:12] + [c for c in CASES if not c[0].startswith("blob")]


@pytest.mark.parametrize("name,a,b,spacing", BRUTE_CASES, ids=[c[0] for c in BRUTE_CASES])
def test_hd95_combine_max_matches_brute_force(name, a, b, spacing):
    d_ab, d_ba = _brute_directed(a, b, np.asarray(spacing)), _brute_directed(b, a, np.asarray(spacing))
    expected = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assert hd95(a, b, spacing, combine="max") == pytest.approx(expected, abs=1e-9)


def test_hd95_two_squares_by_hand():
    # 6x6 squares, B shifted 3 columns right. Border distances A->B (px): top and bottom rows
    # 3,2,1,0,0,0 each; left column 3,3,3,3; right column 1,2,2,1. B->A mirrors them. Pooled
    # 40 values: 12 zeros, 8 ones, 8 twos, 12 threes -> the 95th percentile (index 37.05) is 3 px.
    a, b = np.zeros((12, 16), bool), np.zeros((12, 16), bool)
    a[2:8, 2:8], b[2:8, 5:11] = True, True
    assert hd95(a, b, (0.5, 0.5)) == pytest.approx(1.5, abs=1e-12)


def test_hd95_percentile_interpolation_by_hand():
    # A = one pixel, B = two pixels 3 and 4 columns away. d(A->B) = [3], d(B->A) = [3, 4].
    # Pooled [3, 3, 4]: position 0.95 * 2 = 1.9 -> 3 + 0.9 = 3.9 px; max of directed: 3.95 px.
    a, b = np.zeros((5, 8), bool), np.zeros((5, 8), bool)
    a[2, 1], b[2, 4:6] = True, True
    assert hd95(a, b, (0.5, 0.5)) == pytest.approx(1.95, abs=1e-12)
    assert hd95(a, b, (0.5, 0.5), combine="max") == pytest.approx(1.975, abs=1e-12)
    assert medpy_binary.hd95(a, b, voxelspacing=(0.5, 0.5)) == pytest.approx(1.95, abs=1e-12)


def test_hd95_and_dice_errors():
    a, empty = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    for args in ((empty, a), (a, empty)):
        with pytest.raises(ValueError, match="empty"):
            hd95(*args, 1.0)
    with pytest.raises(MicrosegError, match=r"\(4, 4\).*\(4, 5\)"):
        hd95(a, np.ones((4, 5), bool), 1.0)
    with pytest.raises(MicrosegError, match="spacing"):
        hd95(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(MicrosegError, match="spacing"):
        hd95(a, a, (1.0, 0.0))
    with pytest.raises(MicrosegError, match="NaN"):
        dice(np.full((4, 4), np.nan), a)
    with pytest.raises(MicrosegError, match="combine"):
        hd95(a, a, 1.0, combine="mean")


def test_dice_by_hand():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2, :2], b[:2, :1] = True, True
    assert dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    assert dice(a, np.zeros_like(a)) == 0.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))


# A tiny case, spacing (sz, sy, sx) = (2.0, 0.5, 0.25), slices 6 x 8:
#   z0 both empty; z1 identical squares (DSC 1, HD95 0); z2 single pixels 2 rows apart (DSC 0, HD95 2 * 0.5 = 1.0);
#   z3 prediction only (one-sided); z4 2x2 vs its left 2x1 column (DSC 2/3; distances A->B [0,0,1,1],
#   B->A [0,0] in columns -> pooled 95th percentile at index 4.75 of [0,0,0,0,1,1] = 1 px = 0.25 mm).
SPACING = (2.0, 0.5, 0.25)


def _tiny_case() -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.zeros((5, 6, 8), bool), np.zeros((5, 6, 8), bool)
    pred[1, 1:4, 2:6] = ref[1, 1:4, 2:6] = True
    pred[2, 1, 3], ref[2, 3, 3] = True, True
    pred[3, 2:4, 2:4] = True
    pred[4, 2:4, 4:6], ref[4, 2:4, 4:5] = True, True
    return pred, ref


def test_score_case_microsegnet_by_hand():
    s = score_case(*_tiny_case(), SPACING, "microsegnet")
    assert [p.z for p in s.per_slice] == [1, 2, 4]
    assert s.dsc == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert s.hd95_mm == pytest.approx((0 + 1.0 + 0.25) / 3)
    assert (s.n_slices, s.n_one_sided, s.n_both_empty) == (3, 1, 1)


def test_score_case_all_slices_by_hand():
    skip = score_case(*_tiny_case(), SPACING, "all-slices")
    assert [p.z for p in skip.per_slice] == [1, 2, 3, 4]
    assert skip.per_slice[2].dsc == 0.0 and math.isnan(skip.per_slice[2].hd95_mm)
    assert skip.dsc == pytest.approx((1 + 0 + 0 + 2 / 3) / 4)
    assert skip.hd95_mm == pytest.approx((0 + 1.0 + 0.25) / 3)
    assert (skip.n_slices, skip.n_one_sided, skip.n_both_empty) == (4, 1, 1)
    diag = score_case(*_tiny_case(), SPACING, "all-slices", one_sided_hd95="diagonal")
    assert diag.hd95_mm == pytest.approx((0 + 1.0 + math.hypot(6 * 0.5, 8 * 0.25) + 0.25) / 4)


def test_score_case_volume_by_hand_and_medpy():
    pred, ref = _tiny_case()
    s = score_case(pred, ref, SPACING, "volume")
    # |A| = 12 + 1 + 4 + 4 = 21, |B| = 12 + 1 + 2 = 15, |A n B| = 12 + 2 = 14.
    assert s.dsc == pytest.approx(2 * 14 / (21 + 15))
    assert s.hd95_mm == pytest.approx(medpy_binary.hd95(pred, ref, voxelspacing=SPACING), abs=1e-6)
    assert (s.n_slices, s.per_slice) == (4, [])


def test_score_case_nothing_qualifies():
    pred, ref = np.zeros((3, 5, 5), bool), np.zeros((3, 5, 5), bool)
    pred[0, 2, 2] = True  # one-sided only
    ms = score_case(pred, ref, SPACING, "microsegnet")
    assert math.isnan(ms.dsc) and math.isnan(ms.hd95_mm) and ms.n_slices == 0 and ms.n_one_sided == 1
    alls = score_case(pred, ref, SPACING, "all-slices")
    assert alls.dsc == 0.0 and math.isnan(alls.hd95_mm) and alls.n_slices == 1
    vol = score_case(pred, ref, SPACING, "volume")
    assert vol.dsc == 0.0 and math.isnan(vol.hd95_mm)
    vol_diag = score_case(pred, ref, SPACING, "volume", one_sided_hd95="diagonal")
    assert vol_diag.hd95_mm == pytest.approx(math.sqrt((3 * 2.0) ** 2 + (5 * 0.5) ** 2 + (5 * 0.25) ** 2))
    for protocol in PROTOCOLS:
        both_empty = score_case(ref, ref, SPACING, protocol)
        assert math.isnan(both_empty.dsc) and math.isnan(both_empty.hd95_mm) and both_empty.n_both_empty == 3


def test_score_case_errors():
    pred, ref = _tiny_case()
    with pytest.raises(MicrosegError, match="microsegnet, all-slices, volume"):
        score_case(pred, ref, SPACING, "per-slice")
    with pytest.raises(MicrosegError, match=r"\(5, 6, 8\).*\(5, 6, 7\)"):
        score_case(pred, ref[..., :7], SPACING, "microsegnet")
    with pytest.raises(MicrosegError, match="Z,H,W"):
        score_case(pred[0], ref[0], SPACING, "microsegnet")
    with pytest.raises(MicrosegError, match="one_sided_hd95"):
        score_case(pred, ref, SPACING, "all-slices", one_sided_hd95="max")


def test_summarize_ignores_nan():
    s = summarize([1.0, 2.0, math.nan, 6.0])
    assert s["mean"] == pytest.approx(3.0)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3))
    assert s["median"] == 2.0 and s["n"] == 3
    empty = summarize([math.nan])
    assert math.isnan(empty["mean"]) and math.isnan(empty["std"]) and math.isnan(empty["median"]) and empty["n"] == 0


def test_per_sample_dice_matches_medpy_and_nan_when_both_empty():
    """What validation and the hard-region figures need of `dice` per sample: medpy's value, 0 when
    one-sided, NaN when both masks are empty; non-bool masks; a shape mismatch is refused."""
    rng = np.random.default_rng(3)
    pred = np.stack([_blob(rng, (1, 16, 16)) for _ in range(4)])
    target = np.stack([_blob(rng, (1, 16, 16)) for _ in range(4)])
    pred[3], target[3] = False, False
    target[2] = False  # one-sided: 0
    got = torch.tensor([dice(p.astype(np.float32), t) for p, t in zip(pred, target, strict=True)])
    expected = [medpy_binary.dc(p, t) for p, t in zip(pred[:3], target[:3], strict=True)]
    assert got[:3].tolist() == pytest.approx(expected, abs=1e-6)
    assert got[2] == 0.0 and torch.isnan(got[3])
    with pytest.raises(MicrosegError, match="shape"):
        dice(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
