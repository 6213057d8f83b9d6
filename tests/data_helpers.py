"""Hand-made NIfTI datasets for the data tests, written with nibabel directly in the real files'
(x, y, z) order: slice z of our [Z, H, W] convention is ``nib_array[:, :, z].T``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

FOLDERS = {
    "image": ("micro_ultrasound_scans", "microUS"),
    "expert": ("expert_annotations", "expert_annotation"),
    "non_expert": ("non_expert_annotations", "nonexpert_annotation"),
    "clinician": ("clinician_annotations", "clinician_annotation"),
}
SPACING_XYZ = (0.1, 0.2, 0.5)


def nifti_path(root: Path, split: str, kind: str, case_id: str, ext: str = ".nii.gz") -> Path:
    folder, prefix = FOLDERS[kind]
    return root / split / folder / f"{prefix}_{split}_{case_id}{ext}"


def write_zyx(path: Path, array_zyx: np.ndarray, spacing_xyz=SPACING_XYZ) -> Path:
    """Write a [Z, H, W] array as the real files store it: nibabel (x, y, z) = [W, H, Z]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    z, h, w = array_zyx.shape
    xyz = np.zeros((w, h, z), dtype=array_zyx.dtype)
    for k in range(z):
        xyz[:, :, k] = array_zyx[k].T
    nib.save(nib.Nifti1Image(xyz, np.diag([*spacing_xyz, 1.0])), path)
    return path


def blob_case(shape=(5, 48, 64), z=3) -> tuple[np.ndarray, np.ndarray]:
    """An image and an asymmetric mask: an L-shaped blob in the top-left of slice ``z`` only."""
    mask = np.zeros(shape, dtype=np.uint8)
    mask[z, 2:14, 3:8] = 1  # vertical bar
    mask[z, 10:14, 3:20] = 1  # foot of the L
    image = np.where(mask > 0, 200, 20).astype(np.uint8)
    return image, mask


def make_dataset(root: Path, train_ids=("01", "02"), test_ids=("01",), shape=(5, 48, 64)) -> Path:
    """A valid dataset: L-blob cases (mask values 255 in the non-expert, as some tools write)."""
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for case_id in ids:
            image, mask = blob_case(shape)
            write_zyx(nifti_path(root, split, "image", case_id), image)
            write_zyx(nifti_path(root, split, "expert", case_id), mask)
            write_zyx(nifti_path(root, split, "non_expert", case_id), (mask * 255).astype(np.uint8))
            if split == "test":
                write_zyx(nifti_path(root, split, "clinician", case_id), mask)
    return root
