"""Analysis functions against OpenCV, numpy, closed-form geometry and counts worked by hand."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from microseg.core.errors import MicrosegError
from microseg.evaluation.analysis import (
    ROUGHNESS_LABELS,
    SMOOTHNESS_LABELS,
    disagreement_slices,
    hard_region_kernel,
    hard_region_mask,
    hard_region_score,
    patient_descriptors,
    patient_stratified_table,
    slice_descriptors,
    stratified_table,
    stratum,
    stratum_edges,
    tertile_edges,
)
from microseg.losses import hard_region
from microseg.reporting.figures import EXPERT_COLOUR, RUN_COLOURS, plot_overlays, plot_stratified, run_colours


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _blobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape) > 0.85


# --- hard region -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_hard_region_mask_is_the_union_of_cv2_dilations(k):
    rng = np.random.default_rng(k)
    expert, a, b = (_blobs(rng, (3, 17, 22)) for _ in range(3))
    want = np.zeros_like(expert)
    for other in (a, b):
        for z in range(3):
            xor = (expert[z] ^ other[z]).astype(np.uint8)
            want[z] |= cv2.dilate(xor, np.ones((k, k), np.uint8)) > 0
    got = hard_region_mask(expert.astype(np.uint8), [a, b.astype(np.float32)], k)
    assert got.dtype == bool and got.shape == expert.shape
    np.testing.assert_array_equal(got, want)
    # the same region as training's tensor hard region, [Z,1,H,W] per other, united
    tensors = [torch.from_numpy(m[:, None].astype(np.float32)) for m in (expert, a, b)]
    training = (hard_region(tensors[0], tensors[1], k) + hard_region(tensors[0], tensors[2], k))[:, 0].numpy() > 0
    np.testing.assert_array_equal(got, training)


def test_hard_region_mask_even_kernel_grows_down_right():
    expert = np.zeros((1, 9, 9), bool)
    other = expert.copy()
    other[0, 4, 4] = True
    rows, cols = np.nonzero(hard_region_mask(expert, [other], 4)[0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 6, 3, 6)  # 1 up/left, 2 down/right


def test_hard_region_mask_rejects_bad_inputs():
    e = np.zeros((2, 5, 5), bool)
    with pytest.raises(MicrosegError, match="annotation 1"):
        hard_region_mask(e, [np.zeros((2, 5, 6), bool)], 3)
    with pytest.raises(MicrosegError, match="kernel_size"):
        hard_region_mask(e, [e], 0)
    with pytest.raises(MicrosegError, match="at least one"):
        hard_region_mask(e, [], 3)
    with pytest.raises(MicrosegError, match="NaN"):
        hard_region_mask(e, [np.full((2, 5, 5), np.nan)], 3)


def test_hard_region_kernel_scales_to_native_rows():
    assert hard_region_kernel(4, 224, 962) == 17  # 4 * 962 / 224 = 17.18
    assert hard_region_kernel(4, 224, 1372) == 25  # 24.5, half-up
    assert hard_region_kernel(1, 224, 100) == 1  # 0.45 -> at least 1
    assert hard_region_kernel(4, 224, 224) == 4
    with pytest.raises(MicrosegError, match="train_size"):
        hard_region_kernel(4, 0, 962)


def test_hard_region_score_by_hand():
    # Two slices of 1 x 8 pixels, counts pooled over both.
    e = np.array([[[1, 1, 1, 1, 0, 0, 0, 0]], [[0, 0, 0, 0, 0, 0, 0, 0]]])
    p = np.array([[[0, 1, 1, 1, 1, 1, 0, 0]], [[1, 0, 0, 0, 0, 0, 0, 0]]])
    r = np.array([[[0, 0, 1, 1, 1, 1, 1, 0]], [[1, 1, 0, 0, 0, 0, 0, 0]]])
    # |P n R| = 4 + 1 = 5, |E n R| = 2 + 0 = 2, |P n E n R| = 2 -> DSC 4/7;
    # |(P xor E) n R| = 2 (cols 4, 5) + 1 (slice 1 col 0) = 3, |R| = 5 + 2 = 7 -> error 3/7.
    got = hard_region_score(p, e, r)
    assert got["dsc"] == pytest.approx(4 / 7)
    assert got["error_rate"] == pytest.approx(3 / 7)
    assert got["region_px"] == 7
    empty = hard_region_score(p, e, np.zeros_like(r))
    assert math.isnan(empty["dsc"]) and math.isnan(empty["error_rate"]) and empty["region_px"] == 0
    background = np.zeros_like(r)
    background[0, 0, 7] = 1  # R holds neither P nor E: DSC undefined, no errors
    got = hard_region_score(p, e, background)
    assert math.isnan(got["dsc"]) and got["error_rate"] == 0.0
    with pytest.raises(MicrosegError, match="region shape"):
        hard_region_score(p, e, r[:1])


# --- descriptors -------------------------------------------------------------------------------


def _star(shape: tuple[int, int], centre: tuple[float, float], outer: float, inner: float, points: int = 5):
    angles = np.arange(2 * points) * np.pi / points
    radius = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    vertices = np.stack([centre[1] + radius * np.sin(angles), centre[0] - radius * np.cos(angles)], 1)
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(vertices).astype(np.int32)], 1)
    return mask.astype(bool), vertices


def _polygon_ratio(v: np.ndarray) -> float:
    """P^2 / (4 pi A) of a polygon: edge lengths and the shoelace formula."""
    edges = np.roll(v, -1, 0) - v
    perimeter = np.hypot(edges[:, 0], edges[:, 1]).sum()
    area = 0.5 * abs(np.sum(v[:, 0] * np.roll(v[:, 1], -1) - np.roll(v[:, 0], -1) * v[:, 1]))
    return perimeter**2 / (4 * math.pi * area)


def test_roughness_of_disk_square_and_star():
    shape = (100, 100)
    star, vertices = _star(shape, (50, 50), 45, 18)
    square = np.zeros(shape, bool)
    square[20:60, 30:70] = True
    line = np.zeros(shape, bool)
    line[10, 10:40] = True
    volume = np.stack([np.zeros(shape, bool), _disk(shape, (50, 50), 30), square, star, line])
    got = slice_descriptors(volume, (1.0, 1.0))
    assert [d["z"] for d in got] == [1, 2, 3, 4]  # the empty slice 0 is skipped
    disk, sq, st, ln = (d["roughness"] for d in got)
    assert math.isnan(ln)  # a zero-area outline has no ratio
    assert disk == pytest.approx(1.0, rel=0.03)
    assert sq == pytest.approx(4 / math.pi, rel=0.02)
    assert st == pytest.approx(_polygon_ratio(vertices), rel=0.05)
    assert st > 1.5 * sq


def test_area_and_roughness_with_anisotropic_spacing():
    mask = np.zeros((1, 20, 30), bool)
    mask[0, 5:15, 5:25] = True  # 10 rows x 20 columns = 200 pixels
    (got,) = slice_descriptors(mask, (0.5, 0.2))
    assert got["area_mm2"] == pytest.approx(200 * 0.5 * 0.2)  # 20 mm^2
    # outline through pixel centres: 9 * 0.5 = 4.5 mm by 19 * 0.2 = 3.8 mm
    # P = 16.6 mm, A = 17.1 mm^2 -> P^2 / (4 pi A) = 275.56 / 214.885 = 1.28236
    assert got["roughness"] == pytest.approx(16.6**2 / (4 * math.pi * 17.1), rel=1e-5)


@pytest.mark.parametrize("where", ["borders", "inside"])
def test_gamma_msa_is_the_mean_numpy_gradient_magnitude(where):
    rng = np.random.default_rng(3)
    if where == "borders":
        volume = _blobs(rng, (3, 30, 35))
    else:  # small objects far from the borders: gamma_mSa is computed on a crop
        volume = np.zeros((2, 30, 35), bool)
        volume[0, 12:15, 20:22] = True
        volume[1, 9:13, 16:17] = True
    got = [d["gamma_msa"] for d in slice_descriptors(volume, (1.0, 1.0))]
    want = [np.hypot(*np.gradient(s.astype(np.float64))).mean() for s in volume]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_slice_descriptors_rejects_bad_spacing():
    with pytest.raises(MicrosegError, match="spacing"):
        slice_descriptors(np.ones((1, 4, 4), bool), (0.0, 1.0))


# --- strata ------------------------------------------------------------------------------------


def test_tertiles_and_strata():
    lo, hi = tertile_edges([6, 1, 5, 2, 4, 3, math.nan])  # positions 5/3 and 10/3 of 1..6
    assert (lo, hi) == pytest.approx((1 + 5 / 3, 1 + 10 / 3))
    assert [stratum(v, (lo, hi)) for v in (1, lo, 3, hi, 5)] == ["small", "small", "medium", "medium", "large"]
    assert stratum(6, (lo, hi), ROUGHNESS_LABELS) == "rough"
    with pytest.raises(MicrosegError):
        tertile_edges([math.nan])


def test_stratified_table_by_hand():
    areas = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    rough = [1.5, 1.4, 1.3, 1.2, 1.1, 1.0]  # the smallest slice is the roughest

    def slices(dscs):
        return [dict(case_id="01", z=z, dsc=d, area_mm2=areas[z], roughness=rough[z]) for z, d in enumerate(dscs)]

    per_slice = {"a": slices([0.5, 0.7, 0.8, 0.9, 0.9, 1.0]), "b": slices([0.4, 0.6, math.nan, 0.8, 0.9])}
    per_slice["a"].append(dict(case_id="02", z=0, dsc=0.0, area_mm2=math.nan, roughness=math.nan))  # undefined
    edges = stratum_edges(per_slice)  # b lacks slice 5: the edges still come from all six slices
    assert edges["size"] == pytest.approx((1 + 5 / 3, 1 + 10 / 3))
    assert edges["roughness"] == pytest.approx((1.0 + 0.5 / 3, 1.0 + 1.0 / 3))
    header, rows = stratified_table(per_slice)
    assert header == ["run", "factor", "stratum", "mean_dsc", "std_dsc", "n_slices"]
    table = {tuple(r[:3]): r[3:] for r in rows}
    assert len(rows) == 12
    expect = {
        ("a", "size", "small"): (0.6, 0.1, 2),
        ("a", "size", "medium"): (0.85, 0.05, 2),
        ("a", "size", "large"): (0.95, 0.05, 2),
        ("a", "roughness", "smooth"): (0.95, 0.05, 2),
        ("a", "roughness", "rough"): (0.6, 0.1, 2),
        ("b", "size", "small"): (0.5, 0.1, 2),
        ("b", "size", "medium"): (0.8, 0.0, 1),  # NaN left out
        ("b", "size", "large"): (0.9, 0.0, 1),
        ("b", "roughness", "smooth"): (0.9, 0.0, 1),
    }
    for key, (mean, std, n) in expect.items():
        assert table[key] == [pytest.approx(mean), pytest.approx(std, abs=1e-12), n], key


def test_patient_stratified_table_by_hand():
    """Six patients; volume tertiles at 1 + 5/3 and 1 + 10/3 ml; the largest patient is the smoothest."""
    volumes = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    gammas = [0.06, 0.05, 0.04, 0.03, 0.02, 0.01]

    def patients(dscs):
        return {f"{i + 1:02d}": dict(dsc=d, volume_ml=volumes[i], gamma_msa=gammas[i]) for i, d in enumerate(dscs)}

    runs = {"a": patients([0.5, 0.7, 0.8, 0.9, 0.9, 1.0]), "b": patients([0.4, 0.6, math.nan, 0.8, 0.9, 0.9])}
    runs["b"]["07"] = dict(dsc=0.1)  # an older evaluation's row: no descriptors, in no stratum
    header, rows = patient_stratified_table(runs)
    assert header == ["run", "factor", "stratum", "mean_dsc", "std_dsc", "n_patients"]
    table = {tuple(r[:3]): r[3:] for r in rows}
    assert len(rows) == 12 and {r[2] for r in rows if r[1] == "smoothness"} == set(SMOOTHNESS_LABELS)
    expect = {
        ("a", "volume", "small"): (0.6, 0.1, 2),
        ("a", "volume", "large"): (0.95, 0.05, 2),
        ("a", "smoothness", "good"): (0.95, 0.05, 2),
        ("a", "smoothness", "poor"): (0.6, 0.1, 2),
        ("b", "volume", "medium"): (0.8, 0.0, 1),
        ("b", "smoothness", "medium"): (0.8, 0.0, 1),  # NaN left out
    }
    for key, (mean, std, n) in expect.items():
        assert table[key] == [pytest.approx(mean), pytest.approx(std, abs=1e-12), n], key


def test_patient_descriptors_against_numpy():
    expert = np.zeros((5, 40, 60), bool)
    expert[1:4] = _disk((40, 60), (20, 30), 12)
    got = patient_descriptors(expert, (2.0, 0.5, 0.25), 20)
    assert got["volume_ml"] == pytest.approx(expert.sum() * 2.0 * 0.5 * 0.25 / 1000)
    small = np.stack(
        [cv2.resize(z.astype(np.float32), (20, 20), interpolation=cv2.INTER_AREA) >= 0.5 for z in expert]
    ).astype(np.float64)
    assert got["gamma_msa"] == pytest.approx(np.sqrt(sum(g**2 for g in np.gradient(small))).mean(), rel=1e-12)
    assert patient_descriptors(np.zeros((3, 8, 8), bool), (1, 1, 1), 8) == {"volume_ml": 0.0, "gamma_msa": 0.0}


def test_plot_stratified_per_patient(tmp_path):
    from microseg.evaluation.analysis import PATIENT_FACTORS

    rows = [
        [run, factor, label, mean, 0.02, 3]
        for run, mean in (("focal", 0.8), ("afl", 0.9))
        for factor, _, labels in PATIENT_FACTORS
        for label in labels
    ]
    out = tmp_path / "patients.png"
    plot_stratified(
        ["run", "factor", "stratum", "mean_dsc", "std_dsc", "n_patients"], rows, out, factors=PATIENT_FACTORS
    )
    png = imread(out)
    assert _colour_pixels(png, (0.122, 0.467, 0.706), 0.05) > 500  # C0 bars (first run)
    assert _colour_pixels(png, (1.0, 0.498, 0.055), 0.05) > 500  # C1 bars (second run)


# --- disagreement ------------------------------------------------------------------------------


def test_disagreement_slices_picks_the_constructed_slice():
    shape = (40, 40)
    expert = np.stack([np.zeros(shape, bool)] + [_disk(shape, (20, 20), 12)] * 4)
    a = expert.copy()
    b = expert.copy()
    b[3] = _disk(shape, (20, 20), 5)  # far off on slice 3
    b[1] = _disk(shape, (21, 20), 12)  # slightly off on slice 1
    assert disagreement_slices({"a": a, "b": b}, expert, 2) == [3, 1]
    assert sorted(disagreement_slices({"a": a, "b": b}, expert, 10)) == [1, 2, 3, 4]  # slice 0 is empty
    assert disagreement_slices({"b": b}, expert, 1) == [3]  # a single run: its worst slice
    with pytest.raises(MicrosegError, match="prediction of b"):
        disagreement_slices({"a": a, "b": b[:, :30]}, expert, 2)


# --- figures -----------------------------------------------------------------------------------


def _colour_pixels(png: np.ndarray, rgb: tuple[float, float, float], tol: float = 0.15) -> int:
    return int(np.all(np.abs(png[..., :3] - np.array(rgb)) < tol, axis=-1).sum())


def test_plot_overlays_draws_contours_on_the_image(tmp_path):
    rng = np.random.default_rng(0)
    shape = (3, 60, 80)
    image = rng.integers(40, 120, shape).astype(np.uint8)
    expert = np.stack([_disk(shape[1:], (30, 40), 15)] * 3)
    pred = np.stack([_disk(shape[1:], (33, 44), 13)] * 3)
    out = tmp_path / "figs" / "overlay.png"
    plot_overlays(image, expert, {"run": pred}, [0, 2], out, "case 01", colours={"run": "#ff2020"})
    png = imread(out)
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 200
    assert _colour_pixels(png, (0.0, 1.0, 0.0)) > 50  # expert contour, green
    assert _colour_pixels(png, (1.0, 0.125, 0.125)) > 50  # the run's contour, red
    assert _colour_pixels(png, (0.3, 0.3, 0.3), 0.1) > 1000  # the grey image
    assert [p.name for p in out.parent.iterdir()] == ["overlay.png"]  # no temporary left
    with pytest.raises(MicrosegError, match="slice index 3"):
        plot_overlays(image, expert, {"run": pred}, [3], tmp_path / "x.png", "t")
    with pytest.raises(MicrosegError, match="image shape"):
        plot_overlays(image[:2], expert, {"run": pred}, [0], tmp_path / "x.png", "t")


def test_plot_stratified_writes_bars(tmp_path):
    rows = [
        [run, factor, label, mean, 0.02, 5]
        for run, mean in (("focal", 0.8), ("afl", 0.9))
        for factor, labels in (("size", ("small", "medium", "large")), ("roughness", ROUGHNESS_LABELS))
        for label in labels
    ]
    out = tmp_path / "strat.png"
    plot_stratified(["run", "factor", "stratum", "mean_dsc", "std_dsc", "n_slices"], rows, out)
    png = imread(out)
    assert png.ndim == 3
    assert _colour_pixels(png, (0.122, 0.467, 0.706), 0.05) > 500  # C0 bars (first run)
    assert _colour_pixels(png, (1.0, 0.498, 0.055), 0.05) > 500  # C1 bars (second run)


def test_one_colour_per_run_and_the_expert_reserved(tmp_path):
    runs = [f"run{i}" for i in range(len(RUN_COLOURS) + 2)]
    colours = run_colours(runs)
    assert EXPERT_COLOUR not in colours.values()
    assert len(set(colours[r] for r in runs[: len(RUN_COLOURS)])) == len(RUN_COLOURS)
    assert run_colours(runs[:2]) == {r: colours[r] for r in runs[:2]}  # a run keeps its colour
    shape = (1, 60, 80)
    image = np.full(shape, 80, np.uint8)
    expert = np.stack([_disk(shape[1:], (30, 40), 15)])
    out = tmp_path / "two.png"  # the default colours of an overlay are the runs' palette colours
    plot_overlays(
        image,
        expert,
        {"a": np.stack([_disk(shape[1:], (30, 40), 10)]), "b": np.stack([_disk(shape[1:], (30, 40), 20)])},
        [0],
        out,
        "t",
    )
    png = imread(out)
    for hex_colour in (RUN_COLOURS[0], RUN_COLOURS[1]):
        rgb = tuple(int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
        assert _colour_pixels(png, rgb, 0.05) > 20


def test_run_names_in_scripts_the_font_lacks_print_no_glyph_warnings(tmp_path):
    import warnings

    from microseg.reporting.figures import plot_loss_curves

    history = [{"epoch": 1, "loss": 0.5, "bce": 0.6}, {"epoch": 2, "loss": 0.4, "bce": 0.5}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_loss_curves({"損失関数 実験": history, "ag_bce": history}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
