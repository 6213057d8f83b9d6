"""The per-case evaluation protocols: which slices of a patient are scored, and how into one case score.

`score_case` scores a predicted volume against its reference under one of PROTOCOLS (MicroSegNet's
evaluation, "microsegnet", and two variants); `CaseScorer` gives the same `CaseScore` fed slab by
slab. The slice and volume scores are `microseg.metrics.scores`' DSC and HD95.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from microseg.core.errors import MicrosegError, OptionError
from microseg.metrics.scores import (
    as_masks,
    cropped_hd95,
    dice,
    joint_crop,
    mask_points,
    nearest_distances,
    percentile95,
    voxel_spacing,
)

PROTOCOLS = ("microsegnet", "all-slices", "volume")
ONE_SIDED_HD95 = ("skip", "diagonal")


def check_protocol(protocol: str) -> str:
    """`protocol` if it is one of PROTOCOLS, else MicrosegError naming the option."""
    if protocol not in PROTOCOLS:
        raise OptionError(f"`protocol` {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return protocol


@dataclass(frozen=True)
class SliceScore:
    """One scored slice: its index and metrics (hd95_mm NaN where HD95 is undefined and skipped)."""

    z: int
    dsc: float
    hd95_mm: float


@dataclass(frozen=True)
class CaseScore:
    """One case (patient) under one protocol.

    n_slices: slices scored (volume protocol: slices with any foreground in either mask);
    n_one_sided: slices where exactly one mask is empty; n_both_empty: slices where both are.
    per_slice: the scored slices (empty for the volume protocol).
    """

    dsc: float
    hd95_mm: float
    n_slices: int
    n_one_sided: int
    n_both_empty: int
    per_slice: list[SliceScore] = field(default_factory=list)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def score_case(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], protocol: str, one_sided_hd95: str = "skip"
) -> CaseScore:
    """Score a predicted volume [Z,H,W] against its reference; spacing (sz, sy, sx) in mm.

    Protocols (MicroSegNet's evaluation, and two variants):
    - "microsegnet" (the reference): only slices where both masks are non-empty; DSC and HD95
      (in-plane spacing (sy, sx)) per slice; the case score is the mean over those slices.
      No such slice: DSC and HD95 are NaN with n_slices = 0.
    - "all-slices": every slice where either mask is non-empty. A one-sided slice scores DSC 0;
      its HD95 is undefined: one_sided_hd95="skip" leaves it out of the HD95 mean (it still
      counts in n_one_sided and the DSC mean), "diagonal" scores it the image diagonal
      hypot(H*sy, W*sx) mm. HD95 is NaN if no slice has an HD95; both NaN if no slice qualifies.
    - "volume": 3D DSC and 3D HD95 with the full spacing. One volume empty: DSC 0 and HD95 NaN
      ("skip") or the volume diagonal ("diagonal"); both empty: both NaN.
    """
    pred, ref = as_masks(pred, ref)
    if pred.ndim != 3:
        raise MicrosegError(f"expected [Z,H,W] volumes, got shape {pred.shape}")
    scorer = CaseScorer(pred.shape, spacing, protocol, one_sided_hd95)
    scorer.add(pred, ref)
    return scorer.result()


class CaseScorer:
    """`score_case` fed slab by slab (consecutive slices, z ascending): the same CaseScore.

    Per-slice protocols score each slice as it arrives. The volume protocol counts voxels and
    keeps the 3D borders of both masks (medpy's cross-shaped erosion, as `microseg.metrics.scores` takes them) as voxel
    indices, a slice's border known once the next slice has arrived; `result()` measures their
    distances in the masks' joint bounding box, as `hd95` does on the whole volume. Memory: a
    slab plus the border points (a surface, not a volume).
    """

    def __init__(
        self,
        shape_zyx: tuple[int, int, int],
        spacing: tuple[float, float, float],
        protocol: str,
        one_sided_hd95: str = "skip",
    ):
        check_protocol(protocol)
        if one_sided_hd95 not in ONE_SIDED_HD95:
            raise MicrosegError(f"unknown one_sided_hd95 {one_sided_hd95!r}; valid: {', '.join(ONE_SIDED_HD95)}")
        self.shape, self.spacing = tuple(int(n) for n in shape_zyx), voxel_spacing(spacing, 3)
        self.protocol, self.one_sided_hd95 = protocol, one_sided_hd95
        self.z = 0
        self.has_p, self.has_r = np.zeros(self.shape[0], bool), np.zeros(self.shape[0], bool)
        self.per_slice: list[SliceScore] = []
        self.counts = np.zeros(3, np.int64)  # volume protocol: |P|, |R|, |P n R|
        self.lo = np.array(self.shape)
        tail = np.zeros((1, *self.shape[1:]), bool)  # the slice before z = 0 (outside: False, as medpy)
        self.tails = [tail, tail]
        self.borders: list[list[np.ndarray]] = [[], []]

    def add(self, pred: np.ndarray, ref: np.ndarray) -> None:
        """Score the next slab of both masks ([n,H,W], non-zero = object)."""
        pred, ref = as_masks(pred, ref)
        if pred.ndim != 3 or pred.shape[1:] != self.shape[1:] or self.z + len(pred) > self.shape[0]:
            raise MicrosegError(
                f"slab of shape {pred.shape} does not continue a volume of shape {self.shape} at slice {self.z}"
            )
        z0, self.z = self.z, self.z + len(pred)
        has_p, has_r = np.any(pred, axis=(1, 2)), np.any(ref, axis=(1, 2))
        self.has_p[z0 : self.z], self.has_r[z0 : self.z] = has_p, has_r
        if self.protocol == "volume":
            self._add_volume(pred, ref, z0)
            return
        s = self.spacing
        diagonal = math.hypot(self.shape[1] * s[1], self.shape[2] * s[2])
        for k in np.flatnonzero(has_p & has_r if self.protocol == "microsegnet" else has_p | has_r):
            if has_p[k] and has_r[k]:
                a, b = joint_crop(pred[k], ref[k])  # every voxel of both: DSC's counts too
                self.per_slice.append(SliceScore(z0 + int(k), dice(a, b), cropped_hd95(a, b, s[1:])))
            else:
                self.per_slice.append(
                    SliceScore(z0 + int(k), 0.0, diagonal if self.one_sided_hd95 == "diagonal" else math.nan)
                )

    def _add_volume(self, pred: np.ndarray, ref: np.ndarray, z0: int) -> None:
        self.counts += (np.count_nonzero(pred), np.count_nonzero(ref), np.count_nonzero(pred & ref))
        either = pred | ref
        if either.any():
            self.lo = np.minimum(
                self.lo,
                [
                    z0 + int(np.flatnonzero(either.any((1, 2)))[0]),
                    int(np.flatnonzero(either.any((0, 2)))[0]),
                    int(np.flatnonzero(either.any((0, 1)))[0]),
                ],
            )
        for i, mask in enumerate((pred, ref)):
            self._borders(i, mask, z0)

    def _borders(self, i: int, slab: np.ndarray, z0: int) -> None:
        """Append the 3D border voxels of mask `i` for every slice whose two neighbours are known
        (`slab` starts at slice z0)."""
        block = np.concatenate((self.tails[i], slab))
        first = z0 - (len(self.tails[i]) - 1)  # z of block[1]
        if len(block) > 2:
            inner = np.pad(block[1:-1], ((0, 0), (1, 1), (1, 1)))
            interior = block[1:-1] & block[:-2] & block[2:]
            interior &= inner[:, :-2, 1:-1] & inner[:, 2:, 1:-1] & inner[:, 1:-1, :-2] & inner[:, 1:-1, 2:]
            points = mask_points(block[1:-1] & ~interior)
            points[:, 0] += first
            self.borders[i].append(points)
        self.tails[i] = block[-2:]

    def result(self) -> CaseScore:
        """The case's score, once every slice has been added."""
        if self.z != self.shape[0]:
            raise ValueError(f"scored {self.z} of {self.shape[0]} slices")
        has_p, has_r = self.has_p, self.has_r
        n_one_sided, n_both_empty = int(np.sum(has_p ^ has_r)), int(np.sum(~has_p & ~has_r))
        if self.protocol != "volume":
            per_slice = self.per_slice
            return CaseScore(
                _mean([p.dsc for p in per_slice]),
                _mean([p.hd95_mm for p in per_slice]),
                len(per_slice),
                n_one_sided,
                n_both_empty,
                list(per_slice),
            )
        n = int(np.sum(has_p | has_r))
        if has_p.any() and has_r.any():
            n_p, n_r, n_pr = (int(c) for c in self.counts)
            return CaseScore(2.0 * n_pr / (n_p + n_r), self._hd95(), n, n_one_sided, n_both_empty)
        diagonal = float(np.hypot.reduce(np.array(self.shape) * self.spacing))
        penalty = diagonal if self.one_sided_hd95 == "diagonal" else math.nan
        return CaseScore(0.0 if n else math.nan, penalty if n else math.nan, n, n_one_sided, n_both_empty)

    def _hd95(self) -> float:
        """3D HD95 of the collected borders, coordinates relative to the joint bounding box as in `hd95`."""
        end = np.zeros((1, *self.shape[1:]), bool)  # the slice after the last (outside: False)
        for i in range(2):
            self._borders(i, end, self.shape[0])
        a, b = ((np.concatenate(points) - self.lo) * self.spacing for points in self.borders)
        return percentile95(nearest_distances(a, b), nearest_distances(b, a), "pooled")
