"""The HDF5 slice cache: every training slice resized once, test volumes recorded by path.

Layout of the file (one slice per chunk, lzf-compressed; every dataset carries HDF5's fletcher32
checksum per chunk, so a damaged chunk fails to read instead of yielding other values):
    images       uint8 [N, S, S]  area-averaged resize (cv2.INTER_AREA) of the 0..INTENSITY_MAX slice
    expert       uint8 [N, S, S]  {0, 1}: area-averaged resize of the mask, then >= 0.5
    non_expert   uint8 [N, S, S]  {0, 1}: same
    case_id      bytes [N]        patient id of each slice ("01", ...)
    slice_index  int32 [N]        z of each slice in its volume
    expert_fraction float32 [N]   expert foreground fraction of the slice at native size
    train/<id>   group; attrs: shape [Z,H,W], spacing (sz,sy,sx) of the source volume, and the
                 patient's A-FL statistics `afl_fg_fraction`, `afl_gamma_msa` (below)
    test/<id>    group; attrs: image, expert, non_expert, <rater> paths, shape [Z,H,W], spacing (sz,sy,sx)
    root attrs:  size, format_version, fingerprint, data_root, sources (JSON: [path, bytes, mtime_ns]
                 of every source file)

A-FL per-patient statistics (`microseg.core.patient_stats`): the foreground fraction and
the mean 3D gradient magnitude of the patient's cached expert stack (Z x S x S, the training-size
slices, empty ones included), in voxel units of that grid (unit spacing on every axis, the grid
the network trains on, as A-FL computes them on its resized volumes); the dataset hands them
with each of the patient's slices.

Slices are resized by ``microseg.core.preprocess.resize_image`` / ``resize_mask`` (area averaging;
the reference thresholds its bilinear masks at > 0 once and truncates them once, dilating then
eroding), the functions evaluation uses too.

The fingerprint is sha256 over the format version, the size, and each source file's absolute
path, byte size and mtime; ``microseg.data.prepare.prepare_cache`` reuses a cache whose fingerprint
matches and rebuilds it otherwise. `check_sources` (train and evaluate) compares the recorded
files with the disk and refuses a cache whose sources changed since, naming the file. Only the train split is cached; the test split is checked
from headers (``test_record``: files present, 3D, every mask on its image's grid: shape,
spacing, origin, axis directions) and read at native size by evaluation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from microseg.core.atomic import atomic_path, require_free_space
from microseg.core.errors import MicrosegError, OptionError
from microseg.core.patient_stats import PATIENT_STAT_KEYS, patient_statistics
from microseg.core.preprocess import resize_image, resize_mask
from microseg.data.layout import RATERS, Case
from microseg.data.volumes import Volume, read_geometry, require_same_geometry

FORMAT_VERSION = 4  # 3: per-patient A-FL statistics; 4: fletcher32 checksums, source records
SLICE_KEYS = ("images", "expert", "non_expert")


@dataclass
class CacheInfo:
    """What a cache holds; ``test_cases[id]`` has image/expert/non_expert/raters paths, shape, spacing."""

    path: Path
    size: int
    n_slices: int
    case_ids: list[str]
    test_cases: dict[str, dict]
    train_geometry: dict[str, dict]  # id -> {"shape": (Z,H,W), "spacing": (sz,sy,sx)} at native size
    patient_stats: dict[str, dict[str, float]]  # id -> {PATIENT_STAT_KEYS: value}, A-FL's per patient

    def slice_spacing(self, case_id: str) -> tuple[float, float, float]:
        """(sz, sy, sx) in mm of a training case's cached slices (native spacing scaled to size x size)."""
        geometry = self.train_geometry[case_id]
        (_, h, w), (sz, sy, sx) = geometry["shape"], geometry["spacing"]
        return (sz, sy * h / self.size, sx * w / self.size)


def _source_files(cases: list[Case]) -> list[Path]:
    files = []
    for case in cases:
        files += [p for p in (case.image, case.expert, case.non_expert) if p is not None]
        files += list(case.raters.values())
    return files


def source_records(cases: list[Case]) -> list[tuple[str, int, int]]:
    """(path, byte size, mtime_ns) of every source file."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _source_files(cases)]


def fingerprint(cases: list[Case], size: int) -> str:
    """sha256 of format version, size and (path, byte size, mtime_ns) of every source file."""
    blob = json.dumps({"format_version": FORMAT_VERSION, "size": size, "files": source_records(cases)})
    return hashlib.sha256(blob.encode()).hexdigest()


def check_sources(path: str | Path) -> None:
    """Refuse a cache whose source files differ from the disk's (byte size or mtime), naming the first.

    When the cache's data folder is not on this machine (the cache was copied alone) nothing is
    compared; when it is, a recorded file that is gone or changed is refused.
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        if "sources" not in f.attrs:  # a cache of an earlier format: read_cache_info refuses it for training
            return
        data_root, sources = Path(str(f.attrs["data_root"])), json.loads(str(f.attrs["sources"]))
    if not data_root.is_dir():
        return
    for name, size, mtime_ns in sources:
        try:
            stat = Path(name).stat()
        except FileNotFoundError:
            raise MicrosegError(
                f"{name} was removed since the cache {path} was prepared from it: prepare the "
                "cache again (or pass --no-source-check to use it as it is)"
            ) from None
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
            raise MicrosegError(
                f"{name} changed since the cache {path} was prepared from it (its size or "
                "modification time differ): prepare the cache again (or pass --no-source-check "
                "to use it as it is)"
            )


def test_record(case: Case) -> dict:
    """Header-level check of a test case: every mask lies on the image's grid."""
    image = read_geometry(case.image)
    masks = {"expert": case.expert, "non_expert": case.non_expert} | case.raters
    for path in (p for p in masks.values() if p is not None):
        require_same_geometry(read_geometry(path), image)
    paths = {key: str(p) for key, p in masks.items() if p is not None}
    return {"image": str(case.image), **paths, "shape": image.shape, "spacing": image.spacing}


def cached_fingerprint(out: Path) -> str | None:
    """Fingerprint of the microseg cache at ``out`` (None if absent or of another format); refuse other files."""
    if not out.exists():
        return None
    try:
        with h5py.File(out, "r") as f:
            attrs = dict(f.attrs)
    except OSError:
        attrs = {}
    if "fingerprint" not in attrs:
        raise OptionError(f"`out` {out} exists and is not a microseg cache; refusing to overwrite it")
    return str(attrs["fingerprint"]) if int(attrs.get("format_version", -1)) == FORMAT_VERSION else None


def _append(dataset: h5py.Dataset, values: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    dataset[start:] = values


@dataclass
class CacheEntry:
    """One training case as the cache stores it: its slices resized (uint8 [Z, S, S] each of
    SLICE_KEYS), its native shape and spacing, its A-FL statistics and expert foreground fractions."""

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    stacks: dict[str, np.ndarray]
    stats: dict[str, float]
    expert_fraction: np.ndarray


def cache_entry(case: Case, image: Volume, masks: list[Volume], size: int) -> CacheEntry:
    """The cache entry of a case's image and [expert, non-expert] masks at ``size``."""
    stacks = {"images": np.stack([resize_image(s, size) for s in image.array])}
    for key, mask in zip(SLICE_KEYS[1:], masks, strict=True):
        stacks[key] = np.stack([resize_mask(s, size) for s in mask.array])
    stats = dict(zip(PATIENT_STAT_KEYS, patient_statistics(stacks["expert"]), strict=True))
    fraction = masks[0].array.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
    return CacheEntry(case.case_id, image.array.shape, image.spacing, stacks, stats, fraction)


def write_cache(
    out: Path,
    size: int,
    digest: str,
    root: Path,
    entries: Iterable[CacheEntry],
    test_records: dict[str, dict],
    sources: list[tuple[str, int, int]],
) -> int:
    """Write the cache of the training cases' ``entries`` (in order, consumed one at a time), the
    test split's records and the `source_records` at ``out``, atomically; returns the number of slices."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(
            size=size,
            format_version=FORMAT_VERSION,
            fingerprint=digest,
            data_root=str(root),
            sources=json.dumps(sources),
        )
        slices = {
            key: f.create_dataset(
                key,
                (0, size, size),
                np.uint8,
                maxshape=(None, size, size),
                chunks=(1, size, size),
                compression="lzf",
                fletcher32=True,
            )
            for key in SLICE_KEYS
        }
        per_slice = {
            key: f.create_dataset(key, (0,), dtype, maxshape=(None,), fletcher32=True)
            for key, dtype in (("case_id", "S16"), ("slice_index", np.int32), ("expert_fraction", np.float32))
        }
        for entry in entries:
            n = entry.shape[0]
            require_free_space(out, n * size * size * len(SLICE_KEYS))  # before HDF5 meets ENOSPC
            for key in SLICE_KEYS:
                _append(slices[key], entry.stacks[key])
            f.create_group(f"train/{entry.case_id}").attrs.update(
                shape=entry.shape, spacing=entry.spacing, **entry.stats
            )
            _append(per_slice["case_id"], np.full(n, entry.case_id.encode(), dtype="S16"))
            _append(per_slice["slice_index"], np.arange(n, dtype=np.int32))
            _append(per_slice["expert_fraction"], entry.expert_fraction)
        for case_id, record in test_records.items():
            group = f.create_group(f"test/{case_id}")
            group.attrs.update(record)
        return len(slices["images"])


def read_cache_info(path: str | Path) -> CacheInfo:
    """Describe a cache; MicrosegError if it is missing or not a microseg cache of this version."""
    path = Path(path)
    if not path.is_file():
        raise MicrosegError(f"{path}: cache not found (run 'microseg prepare' first)")
    try:
        with h5py.File(path, "r") as f:
            if "fingerprint" not in f.attrs or any(k not in f for k in (*SLICE_KEYS, "case_id", "slice_index")):
                raise MicrosegError(f"{path}: not a microseg cache")
            if int(f.attrs["format_version"]) != FORMAT_VERSION:
                found = f.attrs["format_version"]
                raise MicrosegError(
                    f"{path}: cache format {found}, this microseg reads format {FORMAT_VERSION} "
                    "(checksummed slices): prepare it again with `microseg prepare`"
                )
            ids = [i.decode() for i in f["case_id"][()]]
            tests = {}
            for case_id, group in f.get("test", {}).items():
                attrs = dict(group.attrs)
                tests[case_id] = {
                    "image": Path(attrs["image"]),
                    "expert": Path(attrs["expert"]),
                    "non_expert": Path(attrs["non_expert"]) if "non_expert" in attrs else None,
                    "raters": {rater: Path(attrs[rater]) for rater in RATERS if rater in attrs},
                    "shape": tuple(int(v) for v in attrs["shape"]),
                    "spacing": tuple(float(v) for v in attrs["spacing"]),
                }
            geometry = {
                case_id: {key: tuple(group.attrs[key].tolist()) for key in ("shape", "spacing")}
                for case_id, group in f["train"].items()
            }
            stats = {
                case_id: {key: float(group.attrs[key]) for key in PATIENT_STAT_KEYS}
                for case_id, group in f["train"].items()
            }
            return CacheInfo(path, int(f.attrs["size"]), len(ids), list(dict.fromkeys(ids)), tests, geometry, stats)
    except OSError as err:
        raise MicrosegError(f"{path}: not a readable microseg cache ({err})") from None


def foreground_areas(path: str | Path) -> np.ndarray:
    """Expert foreground fraction of every cached training slice (native resolution), float32 [N]."""
    read_cache_info(path)
    try:
        with h5py.File(path, "r") as f:
            return f["expert_fraction"][()]
    except OSError as err:
        raise MicrosegError(
            f"cache {path}: its expert_fraction record cannot be read ({' '.join(str(err).split())}): "
            "the file is damaged; prepare it again"
        ) from None
