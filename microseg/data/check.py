"""Dataset check before any training: one screen per split and a JSON of the same numbers.

Per split: patients; slices per patient; image sizes and voxel spacings (the most common value,
and every case that differs named as an outlier); the intensity range; expert foreground slices
per patient; every other annotator's DSC and HD95 against the expert, scored per patient with
``microseg.metrics.score_case`` under the protocol ``evaluate`` uses and averaged over patients
with ``summarize`` (so they equal evaluate's ``<rater>_dsc`` / ``<rater>_hd95_mm`` mean rows: the
inter-rater baseline before any training); and every problem found.

Problems are errors (the data cannot be used as it is: a layout error, an unreadable or invalid
volume -- intensities outside 0..254, a non-binary mask, NaN --, a mask off its image's grid:
shape, spacing, origin or axis directions, ``require_same_geometry``) or warnings (size or
spacing outliers, an expert volume empty on every slice: legitimate but suspicious).
``check_dataset`` never raises on a problem; ``require_clean`` does, with one line, when any
error was found. ``prepare`` runs the same check through ``checked_train_cases``, reading each
training volume once for both, and writes it beside the cache as ``<cache>.check.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from tqdm import tqdm

from microseg.core.atomic import write_text
from microseg.core.errors import MicrosegError, OptionError, warn
from microseg.core.parallel import Work, iterate_jobs, resolve_jobs, run_jobs
from microseg.data.layout import Case, find_cases
from microseg.data.volumes import Volume, read_geometry, read_mask_for, read_volume, require_same_geometry
from microseg.metrics import PROTOCOLS, score_case, summarize

SPLITS = ("train", "test")
SPACING_DECIMALS = 6  # spacings equal to 1e-6 mm are the same


Kind = Literal["image", "mask"]
Reader = Callable[[Path, Kind], Volume]
T = TypeVar("T")


def _read(path: Path, kind: Kind, problems: list[dict], case_id: str, read: Reader) -> Volume | None:
    try:
        return read(path, kind)
    except MicrosegError as err:
        problems.append({"level": "error", "case": case_id, "message": str(err)})
        return None


def _annotations(case: Case) -> dict[str, Path]:
    """Every annotation other than the expert's, by rater name, as evaluate names its columns."""
    return ({"non_expert": case.non_expert} if case.non_expert else {}) | case.raters


def check_case(case: Case, protocol: str, problems: list[dict], read: Reader = read_volume) -> dict:
    """One case's numbers (volumes read with ``read``); problems found are appended to ``problems``."""
    record: dict = {"case_id": case.case_id, "raters": {}}
    image = _read(case.image, "image", problems, case.case_id, read)
    expert = _read(case.expert, "mask", problems, case.case_id, read) if case.expert else None
    if image is None:
        return record
    z, h, w = image.array.shape
    record |= {
        "slices": z,
        "size": [h, w],
        "spacing": list(image.spacing),
        "intensity": [int(image.array.min(initial=0)), int(image.array.max(initial=0))],
    }
    if expert is None or not _same_grid(expert, image, problems, case.case_id):
        return record
    has_expert = expert.array.reshape(z, -1).any(1)
    record["foreground_slices"] = int(has_expert.sum())
    if not has_expert.any():
        problems.append(
            {"level": "warning", "case": case.case_id, "message": f"{case.expert}: mask is empty on every slice"}
        )
        return record
    for name, path in _annotations(case).items():
        mask = _read(path, "mask", problems, case.case_id, read)
        if mask is not None and _same_grid(mask, image, problems, case.case_id):
            score = score_case(mask.array, expert.array, image.spacing, protocol)
            record["raters"][name] = {"dsc": score.dsc, "hd95_mm": score.hd95_mm, "slices_scored": score.n_slices}
    return record


def _same_grid(mask: Volume, image: Volume, problems: list[dict], case_id: str) -> bool:
    """False (an error) when the mask is not on the image's grid (``require_same_geometry``)."""
    try:
        require_same_geometry(mask.geometry, image.geometry)
    except MicrosegError as err:
        problems.append({"level": "error", "case": case_id, "message": str(err)})
        return False
    return True


def _outliers(records: list[dict], key: str, label: str, problems: list[dict]) -> dict:
    """The most common value of ``key`` and the cases that differ from it (warnings)."""
    values = {r["case_id"]: tuple(round(v, SPACING_DECIMALS) for v in r[key]) for r in records if key in r}
    if not values:
        return {"usual": None, "outliers": {}}
    usual = Counter(values.values()).most_common(1)[0][0]
    outliers = {case_id: list(v) for case_id, v in values.items() if v != usual}
    for case_id, value in outliers.items():
        problems.append(
            {"level": "warning", "case": case_id, "message": f"{label} {value} differs from the usual {list(usual)}"}
        )
    return {"usual": list(usual), "outliers": outliers}


def _raters(records: list[dict]) -> dict:
    """Per rater: the per-patient DSC / HD95 and their summaries (NaN patients left out, as evaluate's rows)."""
    names = list(dict.fromkeys(name for r in records for name in r["raters"]))
    out = {}
    for name in names:
        scored = [r for r in records if name in r["raters"]]
        per_patient = {r["case_id"]: r["raters"][name] for r in scored}
        out[name] = {
            "dsc": summarize([s["dsc"] for s in per_patient.values()]),
            "hd95_mm": summarize([s["hd95_mm"] for s in per_patient.values()]),
            "per_patient": per_patient,
        }
    return out


def _bar(cases: list[Case], desc: str, progress: bool | None) -> tqdm:
    return tqdm(cases, desc=desc, unit="case", leave=False, disable=None if progress is None else not progress)


def check_split(root: Path, split: str, protocol: str = "microsegnet", jobs: int = 1) -> dict:
    """Every number and problem of one split (a layout error ends the split's check with that error);
    `jobs` cases at once, one per process (`microseg.core.parallel`)."""
    problems: list[dict] = []
    try:
        cases = find_cases(root, split)
    except MicrosegError as err:
        return {"patients": 0, "problems": [{"level": "error", "case": None, "message": str(err)}]}
    checked = run_jobs(_check_one, [(case, protocol) for case in cases], jobs, desc=f"check {split}")
    for _, found in checked:
        problems += found
    return split_report([record for record, _ in checked], problems)


def _check_one(job: tuple[Case, str]) -> tuple[dict, list[dict]]:
    """`check_case` of one (case, protocol) with its own problem list (a worker process's job)."""
    problems: list[dict] = []
    return check_case(*job, problems), problems


def split_report(records: list[dict], problems: list[dict]) -> dict:
    """A split's numbers from its cases' records (outliers are added to ``problems``)."""
    slices = {r["case_id"]: r["slices"] for r in records if "slices" in r}
    intensity = {r["case_id"]: r["intensity"] for r in records if "intensity" in r}
    return {
        "patients": len(records),
        "case_ids": [r["case_id"] for r in records],
        "slices": {"total": int(sum(slices.values())), "per_patient": slices},
        "size": _outliers(records, "size", "image size", problems),
        "spacing_mm": _outliers(records, "spacing", "spacing (sz, sy, sx) mm", problems),
        "intensity": {
            "min": min((i[0] for i in intensity.values()), default=None),
            "max": max((i[1] for i in intensity.values()), default=None),
            "per_patient": intensity,
        },
        "foreground_slices": {r["case_id"]: r["foreground_slices"] for r in records if "foreground_slices" in r},
        "raters": _raters(records),
        "problems": problems,
    }


def check_dataset(root: str | Path, protocol: str = "microsegnet", jobs: int | None = 1) -> dict:
    """The check of every split present under ``root`` (train/, test/), `jobs` cases at once (None:
    the default, `microseg.core.parallel.resolve_jobs`)."""
    if protocol not in PROTOCOLS:
        raise OptionError(f"`protocol` {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    jobs = resolve_jobs(jobs, "check", work=lambda: dataset_work(Path(root), SPLITS))
    root = Path(root)
    if not root.is_dir():
        raise MicrosegError(f"data folder {root} does not exist")
    splits = [split for split in SPLITS if (root / split).exists()]
    if not splits:
        raise MicrosegError(f"{root} holds neither train/ nor test/: not a dataset folder")
    return dataset_report(root, protocol, {split: check_split(root, split, protocol, jobs) for split in splits})


def dataset_work(root: Path, splits: Sequence[str]) -> Work:
    """The patients of `splits` of `root` and their images' voxels (from the headers), for the default
    `--jobs` (`microseg.core.parallel.machine_jobs`); a split or an image that cannot be read counts
    nothing (its check reports it)."""
    items, pixels = 0, 0
    for split in splits:
        try:
            cases = find_cases(root, split)
        except MicrosegError:
            continue
        for case in cases:
            items += 1
            with contextlib.suppress(MicrosegError, OSError):
                pixels += math.prod(read_geometry(case.image).shape)
    return Work(items, pixels)


def dataset_report(root: Path, protocol: str, splits: dict[str, dict]) -> dict:
    """The report of a dataset from its splits' reports, with the error and warning counts."""
    levels = Counter(p["level"] for s in splits.values() for p in s["problems"])
    return {
        "data": str(Path(root).resolve()),
        "protocol": protocol,
        "splits": splits,
        "errors": levels["error"],
        "warnings": levels["warning"],
    }


def _json_ready(value: Any) -> Any:
    """NaN -> None (strict JSON), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_check(report: dict, path: str | Path) -> Path:
    """Write the report as JSON, atomically."""
    write_text(path, json.dumps(_json_ready(report), indent=1) + "\n")
    return Path(path)


def require_clean(report: dict, hint: str) -> None:
    """MicrosegError (one line: the count, the first error, ``hint``) when the check found errors."""
    if report["errors"]:
        first = next(p for s in report["splits"].values() for p in s["problems"] if p["level"] == "error")
        raise MicrosegError(
            f"dataset check found {report['errors']} error(s) in {report['data']} (first: {first['message']}); {hint}"
        )


def _spread(values: dict[str, int]) -> str:
    """'min 18 (07), median 20, max 24 (03)' over per-patient counts."""
    if not values:
        return "none"
    lo, hi = min(values, key=lambda c: values[c]), max(values, key=lambda c: values[c])
    if values[lo] == values[hi]:
        return f"{values[lo]} each"
    return f"min {values[lo]} ({lo}), median {float(np.median(list(values.values()))):g}, max {values[hi]} ({hi})"


def _geometry_line(label: str, entry: dict, unit: str = "") -> str:
    if entry["usual"] is None:
        return f"{label:<12} unknown"
    usual = " x ".join(f"{v:g}" for v in entry["usual"])
    outliers = ", ".join(f"{c} ({' x '.join(f'{v:g}' for v in value)})" for c, value in entry["outliers"].items())
    return f"{label:<12} {usual}{unit}" + (f"; outliers: {outliers}" if outliers else " (all patients)")


def format_split(split: str, s: dict, protocol: str) -> str:
    """One split's screen."""
    if not s["patients"]:
        return f"== {split}: not checked ==\n" + "\n".join(f"  {p['level']}: {p['message']}" for p in s["problems"])
    per = s["slices"]["per_patient"]
    lines = [
        f"== {split}: {s['patients']} patients, {s['slices']['total']} slices (per patient {_spread(per)}) ==",
        _geometry_line("image size", s["size"], " px (H x W)"),
        _geometry_line("spacing", s["spacing_mm"], " mm (z x y x x)"),
        f"{'intensity':<12} {s['intensity']['min']}..{s['intensity']['max']}",
        f"{'foreground':<12} expert slices per patient: {_spread(s['foreground_slices'])}",
        "             " + " ".join(f"{c}:{n}" for c, n in s["foreground_slices"].items()),
    ]
    if s["raters"]:
        lines.append(f"raters against the expert (protocol {protocol}, mean +- std over patients):")
    for name, r in s["raters"].items():
        lines.append(
            f"  {name:<16} DSC {r['dsc']['mean']:.4f} +- {r['dsc']['std']:.4f}   "
            f"HD95 {r['hd95_mm']['mean']:.3f} +- {r['hd95_mm']['std']:.3f} mm   ({r['dsc']['n']} patients)"
        )
    lines.append(f"problems: {len(s['problems'])}" if s["problems"] else "problems: none")
    lines += [f"  {p['level']}: " + (f"case {p['case']}: " if p["case"] else "") + p["message"] for p in s["problems"]]
    return "\n".join(lines)


def format_check(report: dict) -> str:
    """Every split's screen, then the totals."""
    screens = [format_split(split, s, report["protocol"]) for split, s in report["splits"].items()]
    return "\n\n".join(screens) + f"\n\n{report['data']}: {report['errors']} error(s), {report['warnings']} warning(s)"


def data_check_path(data: str | Path) -> Path:
    """Where ``check`` writes its report by default: ``<data>.check.json`` beside the dataset folder."""
    return Path(str(data).rstrip("/\\") + ".check.json")


def check_path(cache: str | Path) -> Path:
    """Where ``prepare`` writes its dataset check: ``<cache>.check.json`` (``a.h5`` -> ``a.check.json``)."""
    return Path(cache).with_suffix(".check.json")


def _reusable(path: Path, fingerprint: str) -> dict | None:
    """An earlier check at ``path`` of exactly these source files (same fingerprint), else None."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("fingerprint") == fingerprint else None


def checked_train_cases(
    root: Path,
    cache: Path,
    fingerprint: str,
    train: list[Case],
    test: list[Case],
    convert: Callable[[Case, Volume, list[Volume]], T],
    jobs: int = 1,
) -> Iterator[T]:
    """prepare's reader: ``convert(case, image, [expert, non-expert])`` of each training case, in
    order, the volumes checked on the way; `jobs` cases at once, one per process (`microseg.core.parallel`),
    each holding one case's volumes (`convert` must be picklable: a module-level function or a
    partial of one).

    The same check as ``check_dataset`` without a second pass over the training volumes: the test
    split first, then every training case from the very volumes prepare goes on to cache. The first
    error raises one line (nothing is written); after the last case the report is written to
    ``<cache>.check.json`` and its warnings are printed. An earlier check of the same source files
    (``fingerprint``: paths, sizes, mtimes) is reused and the volumes are just read.
    """
    path = check_path(cache)
    report = _reusable(path, fingerprint)
    hint = f"run 'microseg check --data {root}' for the full report"
    if report is None:
        splits = {"test": check_split(root, "test", "microsegnet", jobs)} if test else {}
        require_clean(dataset_report(root, "microsegnet", splits), hint)
    records: list[dict] = []
    problems: list[dict] = []
    jobs_ = [(case, report is None, convert) for case in train]
    for converted, record, found in iterate_jobs(_read_checked, jobs_, jobs, desc="prepare"):
        if record is not None:
            records.append(record)
            problems += found
            require_clean(dataset_report(root, "microsegnet", {"train": {"problems": problems}}), hint)
        yield converted
    if report is None:
        splits = {"train": split_report(records, problems)} | splits
        report = dataset_report(root, "microsegnet", splits) | {"fingerprint": fingerprint}
        write_check(report, path)
        for problem in (p for s in report["splits"].values() for p in s["problems"]):
            warn(problem["message"])
    patients = ", ".join(f"{s['patients']} {split}" for split, s in report["splits"].items())
    print(f"dataset check: {patients} patients, {report['warnings']} warning(s): {path}", file=sys.stderr)


def _read_checked(job: tuple[Case, bool, Callable]) -> tuple[Any, dict | None, list[dict]]:
    """One training case for ``checked_train_cases``: (convert(case, image, masks), its check record
    or None when not checked, its problems); after an error nothing is converted (None)."""
    case, check, convert = job
    if case.expert is None or case.non_expert is None:  # find_cases gives every training case both
        raise MicrosegError(f"training case {case.case_id} lacks its expert or non-expert mask")
    pair = [case.expert, case.non_expert]
    if not check:
        image = read_volume(case.image)
        return convert(case, image, [read_mask_for(image, p) for p in pair]), None, []
    read, problems = _Remembered(), list[dict]()
    record = check_case(case, "microsegnet", problems, read)
    if any(p["level"] == "error" for p in problems):
        return None, record, problems
    image, masks = read(case.image, "image"), [read(p, "mask") for p in pair]
    for mask in masks:
        require_same_geometry(mask.geometry, image.geometry)
    return convert(case, image, masks), record, problems


class _Remembered:
    """``read_volume`` that keeps what it read, so one case's volumes are read once."""

    def __init__(self) -> None:
        self.volumes: dict[tuple[Path, Kind], Volume] = {}

    def __call__(self, path: Path, kind: Kind) -> Volume:
        if (path, kind) not in self.volumes:
            self.volumes[path, kind] = read_volume(path, kind)
        return self.volumes[path, kind]
