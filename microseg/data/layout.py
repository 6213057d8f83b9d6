"""Find and validate the cases of one split in the real dataset's layout.

    <root>/<split>/micro_ultrasound_scans/microUS_<split>_<id>.nii.gz
    <root>/<split>/expert_annotations/expert_annotation_<split>_<id>.nii.gz
    <root>/<split>/non_expert_annotations/nonexpert_annotation_<split>_<id>.nii.gz
    <root>/<split>/<rater>_annotations/<rater>_annotation_<split>_<id>.nii.gz   (test raters)

Files are paired by the trailing id in their names, never by sort order; ``.nii`` and
``.nii.gz`` are both accepted. Hidden files (names starting with ".": macOS's AppleDouble
``._name.nii.gz`` companions, ``.DS_Store``, our own temporaries) are ignored, here and by
``nifti_files``, the one rule for every command that lists a folder. The
non-expert mask is required for every case of the train split (the hard-region losses
need it) and optional elsewhere; a rater's mask may be missing for some cases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from microseg.core.errors import MicrosegError

IMAGES = ("micro_ultrasound_scans", "microUS")
EXPERT = ("expert_annotations", "expert_annotation")
NON_EXPERT = ("non_expert_annotations", "nonexpert_annotation")
RATERS = ("clinician", "master_student", "medical_student")
DATASET_FOLDER = "Micro_Ultrasound_Prostate_Segmentation_Dataset"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Case:
    """One patient's files in one split."""

    case_id: str
    split: str
    image: Path
    expert: Path
    non_expert: Path | None
    raters: dict[str, Path] = field(default_factory=dict)


def file_name(kind: tuple[str, str], split: str, case_id: str) -> str:
    """The dataset's file name for one kind of file, e.g. ``microUS_train_01.nii.gz``."""
    return f"{kind[1]}_{split}_{case_id}.nii.gz"


def rater_kind(rater: str) -> tuple[str, str]:
    """(folder, file prefix) of an extra rater, e.g. ``("clinician_annotations", "clinician_annotation")``."""
    return (f"{rater}_annotations", f"{rater}_annotation")


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted, without hidden ones (names starting with ".")."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def nifti_files(folder: str | Path) -> list[Path]:
    """The visible ``.nii`` / ``.nii.gz`` files of ``folder``, sorted."""
    return [p for p in visible_entries(Path(folder)) if p.name.endswith(NIFTI_SUFFIXES) and p.is_file()]


def _scan(folder: Path, prefix: str, split: str) -> dict[str, Path]:
    """Map id -> file for every ``<prefix>_<split>_<id>.nii[.gz]`` in ``folder``; reject strangers."""
    pattern = re.compile(rf"{re.escape(prefix)}_{re.escape(split)}_(\d+)\.nii(\.gz)?")
    found: dict[str, Path] = {}
    for path in visible_entries(folder):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_file():
            raise MicrosegError(f"{path}: unexpected entry in {folder.name}/ (expected {prefix}_{split}_<id>.nii.gz)")
        case_id = match.group(1)
        same = [other for other in found if int(other) == int(case_id)]  # "01" and "1" are one patient
        if same:
            raise MicrosegError(f"{folder}: case {case_id} appears twice ({found[same[0]].name} and {path.name})")
        found[case_id] = path
    return found


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise MicrosegError(f"data folder {root} {'is not a folder' if root.exists() else 'does not exist'}")
    images = root / split / IMAGES[0]
    if not images.is_dir():
        hint = ""
        if (root / DATASET_FOLDER).is_dir():
            hint = f" (did you mean {root / DATASET_FOLDER}?)"
        elif (root / IMAGES[0]).is_dir():
            hint = f" ({root} looks like a split folder itself; give the folder above it)"
        raise MicrosegError(f"{root} has no '{split}' split: expected {images}{hint}")
    return root / split


def _unpaired(masks: dict[str, Path], images: dict[str, Path], image_dir: Path, split: str) -> None:
    for case_id in sorted(set(masks) - set(images)):
        expected = image_dir / file_name(IMAGES, split, case_id)
        raise MicrosegError(f"{masks[case_id]}: no matching image {expected}")


def find_cases(root: str | Path, split: str, require_non_expert: bool | None = None) -> list[Case]:
    """All cases of ``split`` under ``root``, sorted by id; MicrosegError naming the culprit otherwise.

    ``require_non_expert`` defaults to True for ``split == "train"``.
    """
    root = Path(root)
    split_dir = _split_dir(root, split)
    if require_non_expert is None:
        require_non_expert = split == "train"
    image_dir = split_dir / IMAGES[0]
    images = _scan(image_dir, IMAGES[1], split)
    if not images:
        raise MicrosegError(f"{image_dir} holds no {IMAGES[1]}_{split}_<id>.nii.gz volumes")
    if not (split_dir / EXPERT[0]).is_dir():
        raise MicrosegError(f"{split_dir} has no {EXPERT[0]}/ folder")
    experts = _scan(split_dir / EXPERT[0], EXPERT[1], split)
    non_experts: dict[str, Path] = {}
    if (split_dir / NON_EXPERT[0]).is_dir():
        non_experts = _scan(split_dir / NON_EXPERT[0], NON_EXPERT[1], split)
    elif require_non_expert:
        raise MicrosegError(f"{split_dir} has no {NON_EXPERT[0]}/ folder (the {split} split needs non-expert masks)")
    raters = {
        rater: _scan(split_dir / rater_kind(rater)[0], rater_kind(rater)[1], split)
        for rater in RATERS
        if (split_dir / rater_kind(rater)[0]).is_dir()
    }
    for masks in (experts, non_experts, *raters.values()):
        _unpaired(masks, images, image_dir, split)

    cases = []
    for case_id in sorted(images, key=lambda i: (int(i), i)):
        if case_id not in experts:
            expected = split_dir / EXPERT[0] / file_name(EXPERT, split, case_id)
            raise MicrosegError(f"{images[case_id]}: no expert mask (expected {expected})")
        if require_non_expert and case_id not in non_experts:
            expected = split_dir / NON_EXPERT[0] / file_name(NON_EXPERT, split, case_id)
            raise MicrosegError(f"{images[case_id]}: no non-expert mask (expected {expected})")
        case_raters = {rater: found[case_id] for rater, found in raters.items() if case_id in found}
        cases.append(Case(case_id, split, images[case_id], experts[case_id], non_experts.get(case_id), case_raters))
    return cases
