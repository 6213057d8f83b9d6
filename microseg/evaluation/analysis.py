"""Where the errors are: hard-region scores, size/roughness-stratified DSC, the most disputed slices.

- Hard region (MicroSegNet / micro-US adaptive focal): R = union over the other annotations O_i of
  dilate(E XOR O_i, k x k), the region the adaptive loss up-weights: the training's dilation
  (OpenCV anchor, as `microseg.losses.hard_region`) with its kernel scaled to native pixels.
  Inside R: DSC_R = 2|P n E n R| / (|P n R| + |E n R|), error rate = |(P XOR E) n R| / |R|.
- Stratification (A-FL Fig. 3): per-slice DSC grouped by tertiles of the expert's area and
  of its boundary roughness, the isoperimetric ratio P^2 / (4 pi A) (1 for a disk, 4/pi for a
  square, larger for rougher outlines); A-FL's gamma_mSa is reported beside it. And, as the
  paper's Fig. 3 itself does, per patient: the patient's DSC grouped by tertiles of its expert
  volume (ml) and of its smoothness, the volume's gamma_mSa (`patient_descriptors`).
The figures of these are drawn by `microseg.reporting.figures`.
Masks are [Z,H,W] arrays (non-zero = object).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from microseg.core.errors import MicrosegError
from microseg.core.patient_stats import patient_statistics
from microseg.core.preprocess import resize_mask
from microseg.core.rules import KERNEL, check_option
from microseg.losses.hard_region import check_kernel_size
from microseg.metrics import summarize

SIZE_LABELS = ("small", "medium", "large")
ROUGHNESS_LABELS = ("smooth", "moderate", "rough")
FACTORS = (("size", "area_mm2", SIZE_LABELS), ("roughness", "roughness", ROUGHNESS_LABELS))
STRATIFIED_HEADER = ["run", "factor", "stratum", "mean_dsc", "std_dsc", "n_slices"]
SMOOTHNESS_LABELS = ("good", "medium", "poor")  # A-FL Fig. 3's smoothness classes: low gamma_mSa is smooth
PATIENT_FACTORS = (("volume", "volume_ml", SIZE_LABELS), ("smoothness", "gamma_msa", SMOOTHNESS_LABELS))
PATIENT_STRATIFIED_HEADER = ["run", "factor", "stratum", "mean_dsc", "std_dsc", "n_patients"]
OUTLINE_EPSILON_PX = 1.0


def bool_volumes(**arrays: np.ndarray) -> list[np.ndarray]:
    """The named arrays as boolean [Z,H,W] volumes of one shape, else MicrosegError naming the culprit."""
    out, shape = [], None
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.ndim != 3:
            raise MicrosegError(f"{name} must be a [Z,H,W] volume, got shape {arr.shape}")
        if arr.dtype.kind in "fc" and np.isnan(arr).any():
            raise MicrosegError(f"{name} mask contains NaN")
        if shape is not None and arr.shape != shape:
            raise MicrosegError(f"{name} shape {arr.shape} does not match {next(iter(arrays))} shape {shape}")
        shape = arr.shape
        out.append(arr.astype(bool, copy=False))
    return out


def hard_region_kernel(train_kernel: int, train_size: int, native_rows: int) -> int:
    """The training dilation kernel expressed in native pixels: max(1, round(k * native_rows / train_size)).

    Training dilates by k x k at train_size x train_size (k = 4 at 224 in MicroSegNet); one training
    pixel spans native_rows / train_size native rows (962 / 224 = 4.29 on the real data, so
    k = 4 -> 17). The row scale is used (the columns' 1372 / 224 = 6.1 would give 25): the
    dilation is square, as in training. round() is half-up.
    """
    for name, v in (("train_kernel", train_kernel), ("train_size", train_size), ("native_rows", native_rows)):
        check_option("hard-region", name, v, KERNEL)
    return max(1, math.floor(train_kernel * native_rows / train_size + 0.5))


def hard_region_mask(expert: np.ndarray, others: Sequence[np.ndarray], kernel_size: int) -> np.ndarray:
    """Union over `others` of dilate(expert XOR other, k x k), per slice, as a bool [Z,H,W] volume.

    Dilation distributes over union, so this is dilate(union_i (expert XOR other_i)), dilated
    per slice by OpenCV on uint8 (`cv2.dilate`, anchor k // 2, outside the image background),
    which the training's `microseg.losses.hard_region.dilate` reproduces on the device.
    """
    if not len(others):
        raise MicrosegError("the hard region needs at least one other annotation besides the expert")
    kernel = np.ones((check_kernel_size(kernel_size),) * 2, np.uint8)
    named = {"expert": expert} | {f"annotation {i + 1}": o for i, o in enumerate(others)}
    expert, *others = bool_volumes(**named)
    disagree, scratch = np.zeros_like(expert), np.empty_like(expert)
    for other in others:
        disagree |= np.bitwise_xor(expert, other, out=scratch)
    region = np.empty_like(disagree)
    for z, plane in enumerate(disagree.view(np.uint8)):
        region[z] = cv2.dilate(plane, kernel).view(bool)
    return region


HARD_COUNTS = ("p_in_r", "e_in_r", "r", "pe_in_r", "xor_in_r")


def hard_region_counts(pred: np.ndarray, expert: np.ndarray, region: np.ndarray) -> np.ndarray:
    """|P n R|, |E n R|, |R|, |P n E n R|, |(P XOR E) n R| (HARD_COUNTS) of [Z,H,W] masks: they add up over slabs."""
    pred, expert, region = bool_volumes(prediction=pred, expert=expert, region=region)
    p, e = pred & region, expert & region
    n_p, n_e, n_pe = np.count_nonzero(p), np.count_nonzero(e), np.count_nonzero(np.bitwise_and(p, e, out=p))
    return np.array([n_p, n_e, np.count_nonzero(region), n_pe, n_p + n_e - 2 * n_pe], dtype=np.int64)


def hard_region_score(pred: np.ndarray, expert: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """DSC and error rate of `pred` vs `expert` inside `region`, all slices of the volume pooled."""
    return hard_region_from_counts(hard_region_counts(pred, expert, region))


def hard_region_from_counts(counts: np.ndarray) -> dict[str, float]:
    """DSC and error rate inside the hard region from pooled `hard_region_counts`.

    dsc = 2|P n E n R| / (|P n R| + |E n R|)   (NaN when P and E are both empty inside R)
    error_rate = |(P XOR E) n R| / |R|        (NaN when R is empty)
    region_px = |R|. Pooled counts (not a mean of per-slice values): slices with a large hard
    region weigh more, and slices where R holds no object do not produce undefined DSCs.
    """
    n_p, n_e, n_r, n_pe, n_xor = (int(c) for c in counts)
    return {
        "dsc": 2.0 * n_pe / (n_p + n_e) if n_p + n_e else math.nan,
        "error_rate": n_xor / n_r if n_r else math.nan,
        "region_px": n_r,
    }


def _outline_ratio(mask: np.ndarray, spacing_yx: tuple[float, float], origin: tuple[int, int] = (0, 0)) -> float:
    """P^2 / (4 pi A) of the largest external contour of a non-empty 2D mask, in mm.

    The 8-connected pixel-centre chain (cv2.findContours) is simplified by Douglas-Peucker at
    1 px (cv2.approxPolyDP) to remove the digital staircase, which alone inflates a disk's ratio
    by ~11%; P (arcLength) and A (contourArea) are taken on that polygon with points scaled by
    the spacing. A disk of radius 10 / 40 px scores 1.06 / 1.01, a square exactly 4/pi.
    Holes and smaller components are ignored; a polygon of zero area (a line, a single pixel)
    has no defined ratio: NaN. `mask` may be a crop whose first pixel is at `origin` (row, column)
    of the slice: the outline keeps the slice's coordinates.
    """
    contours, _ = cv2.findContours(
        mask.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(origin[1], origin[0])
    )
    outline = cv2.approxPolyDP(max(contours, key=cv2.contourArea), OUTLINE_EPSILON_PX, True)
    points = (outline.reshape(-1, 2) * np.array([spacing_yx[1], spacing_yx[0]])).astype(np.float32)
    perimeter, area = cv2.arcLength(points, True), cv2.contourArea(points)
    return perimeter**2 / (4 * math.pi * area) if area > 0 else math.nan


def _crop(mask: np.ndarray, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A non-empty 2D mask's bounding box grown by `margin` px (clipped to the image), contiguous,
    and the (row, column) of its first pixel."""
    rows, cols = (np.flatnonzero(mask.any(axis)) for axis in (1, 0))
    top, left = max(0, int(rows[0]) - margin), max(0, int(cols[0]) - margin)
    return np.ascontiguousarray(mask[top : rows[-1] + margin + 1, left : cols[-1] + margin + 1]), (top, left)


def _gamma_msa(crop: np.ndarray, size: int) -> float:
    """A-FL's gamma_mSa of a non-empty 2D bool mask of `size` pixels over its whole slice, from
    `_crop(mask, 2)`: the mean of |numpy.gradient| (float64, unit spacing, one-sided at the image's edges).

    The crop's gradient is summed and divided by the slice's area: exact, since the gradient
    vanishes beyond 1 px of the object, and 2 px keep the crop's one-sided edge differences at zero.
    """
    crop = crop.astype(np.float64)
    axes = [a for a in (0, 1) if crop.shape[a] > 1]
    if not axes:
        return 0.0
    gradients = np.gradient(crop, axis=axes)
    gradients = gradients if isinstance(gradients, (list, tuple)) else [gradients]
    return float(np.sqrt(sum(g * g for g in gradients)).sum() / size)


class ExpertDescriptors:
    """The expert's per-slice and per-patient descriptors, fed slab by slab (z ascending).

    `add(slab)` describes the slab's non-empty slices (`slice_descriptors`) and keeps the
    voxel count and, given a training `size`, the slices resized to it (uint8, Z x size x size:
    the patient's gamma_mSa needs the whole stack, which is small); `patient()` gives
    `patient_descriptors`.
    """

    def __init__(self, spacing_zyx: Sequence[float], size: int | None = None):
        self.spacing = tuple(float(s) for s in spacing_zyx)
        sy, sx = self.spacing[1:]
        if not (math.isfinite(sy) and math.isfinite(sx) and sy > 0 and sx > 0):
            raise MicrosegError(f"spacing {(sy, sx)} must be two positive numbers (sy, sx) in mm")
        self.size, self.z, self.voxels = size, 0, 0
        self.slices: list[dict[str, float]] = []
        self.resized: list[np.ndarray] = []

    def add(self, expert: np.ndarray) -> None:
        (expert,) = bool_volumes(expert=expert)
        sy, sx = self.spacing[1:]
        for k in np.flatnonzero(expert.reshape(len(expert), -1).any(1)):
            crop, origin = _crop(expert[k], 2)  # every voxel of the slice, and 2 px of background where there is room
            self.slices.append(
                {
                    "z": self.z + int(k),
                    "area_mm2": float(np.count_nonzero(crop)) * sy * sx,
                    "roughness": _outline_ratio(crop, (sy, sx), origin),
                    "gamma_msa": _gamma_msa(crop, expert[k].size),
                }
            )
        self.voxels += int(np.count_nonzero(expert))
        if self.size is not None:
            self.resized += [resize_mask(plane, self.size) for plane in expert.view(np.uint8)]
        self.z += len(expert)

    def patient(self) -> dict[str, float]:
        voxel_mm3 = float(np.prod(np.asarray(self.spacing, dtype=np.float64)))
        return {
            "volume_ml": float(self.voxels) * voxel_mm3 / 1000.0,
            "gamma_msa": patient_statistics(np.stack(self.resized))[1],
        }


def slice_descriptors(expert: np.ndarray, spacing_yx: tuple[float, float]) -> list[dict[str, float]]:
    """Size and boundary roughness of every slice whose expert mask is non-empty.

    Per slice: z; area_mm2 = pixel count * sy * sx (all components); roughness = P^2 / (4 pi A)
    of the largest outline (see `_outline_ratio`); gamma_msa = A-FL's mean gradient magnitude
    of the mask over the whole slice (`_gamma_msa`, unit pixel spacing), which grows with the
    outline's length relative to the image, so mixes size and roughness.
    """
    described = ExpertDescriptors((1.0, *spacing_yx))
    described.add(expert)
    return described.slices


def tertile_edges(values: Sequence[float]) -> tuple[float, float]:
    """The 33.33rd and 66.67th percentiles (numpy's linear interpolation) of the non-NaN values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        raise MicrosegError("cannot compute tertiles of an empty set of values")
    lo, hi = np.percentile(v, [100 / 3, 200 / 3])
    return float(lo), float(hi)


def stratum(value: float, edges: tuple[float, float], labels: Sequence[str] = SIZE_LABELS) -> str:
    """labels[0] if value <= lo, labels[1] if lo < value <= hi, else labels[2]."""
    lo, hi = edges
    return labels[0] if value <= lo else labels[1] if value <= hi else labels[2]


def stratum_edges(per_slice: Mapping[str, Sequence[Mapping]]) -> dict[str, tuple[float, float]]:
    """Tertile edges per factor ("size", "roughness") over the expert slices of all runs.

    The expert is the same for every run, so slices are de-duplicated by (case_id, z) and
    every listed slice counts, whatever its DSC (NaN included).
    """
    unique = {(s["case_id"], s["z"]): s for slices in per_slice.values() for s in slices}
    if not unique:
        raise MicrosegError("no scored slices to stratify")
    return {factor: tertile_edges([s[key] for s in unique.values()]) for factor, key, _ in FACTORS}


def patient_descriptors(expert: np.ndarray, spacing_zyx: Sequence[float], size: int) -> dict[str, float]:
    """A patient's size and smoothness, as A-FL's Fig. 3 groups its patients.

    volume_ml = expert voxel count * sz * sy * sx / 1000 (mm^3 -> ml, the NIfTI spacing);
    gamma_msa = A-FL's mean gradient magnitude of the expert volume (`patient_statistics`, voxel
    units, 3D) on the grid the network trains on: every slice resized to size x size as the cache
    resizes masks (`microseg.core.preprocess.resize_mask`). That is the statistic the loss sees, and
    it stays small in memory where the native 962 x 1372 x 300 volume would need gigabytes.
    """
    described = ExpertDescriptors(spacing_zyx, size)
    described.add(expert)
    return described.patient()


def _strata_rows(
    groups_of: Mapping[str, Sequence[Mapping]], factors: Sequence[tuple], edges: Mapping[str, tuple[float, float]]
) -> list[list]:
    """[run, factor, stratum, mean_dsc, std_dsc, n] of each run's items (dicts with dsc and the factors' keys)."""
    rows = []
    for run, items in groups_of.items():
        for factor, key, labels in factors:
            groups: dict[str, list[float]] = {label: [] for label in labels}
            for item in items:
                if not math.isnan(item.get(key, math.nan)):
                    groups[stratum(item[key], edges[factor], labels)].append(item.get("dsc", math.nan))
            for label in labels:
                stats = summarize(groups[label])
                rows.append([run, factor, label, stats["mean"], stats["std"], stats["n"]])
    return rows


def stratified_table(per_slice: Mapping[str, Sequence[Mapping]]) -> tuple[list[str], list[list]]:
    """Mean and std (population) of per-slice DSC, and slice count, per run and per stratum.

    `per_slice`: run name -> dicts with case_id, z, dsc, area_mm2, roughness (one per slice).
    Size strata are tertiles of area_mm2, roughness strata tertiles of roughness, the edges
    computed once over all runs' slices (`stratum_edges`). NaN DSCs are left out of mean, std
    and n, and slices with a NaN descriptor (undefined roughness) out of that factor's strata.
    Rows: [run, "size"|"roughness", stratum, mean_dsc, std_dsc, n_slices].
    """
    return list(STRATIFIED_HEADER), _strata_rows(per_slice, FACTORS, stratum_edges(per_slice))


def patient_strata_edges(patients: Mapping[str, Mapping[str, Mapping]]) -> dict[str, tuple[float, float]]:
    """Tertile edges per patient factor ("volume", "smoothness") over the patients of all runs.

    The expert volume is the same for every run: each case counts once, with the first run's
    non-NaN value. A factor no patient has (an evaluation of an older release) is left out.
    """
    edges = {}
    for factor, key, _ in PATIENT_FACTORS:
        values: dict[str, float] = {}
        for cases in patients.values():
            for case, row in cases.items():
                if case not in values and not math.isnan(row.get(key, math.nan)):
                    values[case] = row[key]
        if values:
            edges[factor] = tertile_edges(list(values.values()))
    return edges


def patient_stratified_table(patients: Mapping[str, Mapping[str, Mapping]]) -> tuple[list[str], list[list]]:
    """A-FL Fig. 3 per patient: mean and std (population) of per-patient DSC, and patient count,
    per run and per tertile of the expert volume (small, medium, large) and of its gamma_mSa
    (good, medium, poor smoothness), the edges computed once over all runs' patients.

    `patients`: run name -> case_id -> its per_patient.csv row (dsc, volume_ml, gamma_msa).
    Rows: [run, "volume"|"smoothness", stratum, mean_dsc, std_dsc, n_patients]; none when no
    patient has the descriptors.
    """
    edges = patient_strata_edges(patients)
    factors = [f for f in PATIENT_FACTORS if f[0] in edges]
    items = {run: list(cases.values()) for run, cases in patients.items()}
    return list(PATIENT_STRATIFIED_HEADER), _strata_rows(items, factors, edges)


def disagreement_slices(preds: Mapping[str, np.ndarray], expert: np.ndarray, n: int) -> list[int]:
    """The z of the `n` slices where the runs differ most, most different first.

    Candidates: slices where the expert or any prediction is non-empty. Per slice and run the
    DSC against the expert (0 when exactly one is empty, 1 when both are). Key: the spread
    max - min of those DSCs over the runs, ties broken by the area where the runs disagree with
    each other (union minus intersection of the predictions). With a single run there is no
    spread: the key is its 1 - DSC, ties broken by its XOR area with the expert (its worst slices).
    """
    if not preds:
        raise MicrosegError("disagreement_slices needs at least one run's prediction")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise MicrosegError(f"number of slices must be an integer >= 0, got {n!r}")
    e, *masks = (
        m.reshape(len(m), -1)
        for m in bool_volumes(expert=expert, **{f"prediction of {run}": p for run, p in preds.items()})
    )
    n_e = e.sum(1)
    per_run = []
    for p in masks:
        total = p.sum(1) + n_e
        per_run.append(np.where(total > 0, 2.0 * (p & e).sum(1) / np.maximum(total, 1), 1.0))
    scores = np.stack(per_run)
    union = np.logical_or.reduce(masks)
    if len(masks) > 1:
        key, tie = scores.max(0) - scores.min(0), union.sum(1) - np.logical_and.reduce(masks).sum(1)
    else:
        key, tie = 1.0 - scores[0], (union ^ e).sum(1)
    candidates = np.flatnonzero(union.any(1) | e.any(1))
    order = np.lexsort((candidates, -tie[candidates], -key[candidates]))
    return [int(z) for z in candidates[order][: int(n)]]
