"""Finding cases: pairing by id, both NIfTI suffixes, and precise errors for broken layouts."""

from __future__ import annotations

import pytest

from data_helpers import nifti_path
from microseg.core.errors import MicrosegError
from microseg.data.layout import find_cases, nifti_files


def touch(root, split, kind, case_id, ext=".nii.gz"):
    path = nifti_path(root, split, kind, case_id, ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make(root, split, ids, kinds=("image", "expert", "non_expert"), ext=".nii.gz"):
    for case_id in ids:
        for kind in kinds:
            touch(root, split, kind, case_id, ext)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(MicrosegError) as err:
        find_cases(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_pairs_by_trailing_id_not_by_sort_order(tmp_path):
    for case_id in ("10", "02", "07"):  # created out of order; "10" sorts before "2" as text
        touch(tmp_path, "train", "image", case_id)
        touch(tmp_path, "train", "expert", case_id, ".nii")  # mixed suffixes
        touch(tmp_path, "train", "non_expert", case_id)
    cases = find_cases(tmp_path, "train")
    assert [c.case_id for c in cases] == ["02", "07", "10"]
    for c in cases:
        assert c.image.name == f"microUS_train_{c.case_id}.nii.gz"
        assert c.expert.name == f"expert_annotation_train_{c.case_id}.nii"
        assert c.non_expert.name == f"nonexpert_annotation_train_{c.case_id}.nii.gz"
        assert c.split == "train" and c.raters == {}


def test_test_split_raters_and_optional_non_expert(tmp_path):
    make(tmp_path, "test", ["01", "02"], kinds=("image", "expert"), ext=".nii")
    touch(tmp_path, "test", "clinician", "02")
    (tmp_path / "test" / "expert_annotations" / ".DS_Store").write_bytes(b"")  # hidden files are ignored
    cases = find_cases(tmp_path, "test")
    assert [c.non_expert for c in cases] == [None, None]
    assert cases[0].raters == {} and cases[1].raters["clinician"].name == "clinician_annotation_test_02.nii.gz"


@pytest.mark.parametrize(
    "setup,needle",
    [
        (lambda r: None, "does not exist"),
        (lambda r: (r / "scans").mkdir(parents=True), "has no 'train' split: expected"),
        (lambda r: (r / "train" / "micro_ultrasound_scans").mkdir(parents=True), "holds no microUS_train_<id>"),
        (
            lambda r: (make(r, "train", ["01", "02"]), touch(r, "train", "expert", "02").unlink()),
            "microUS_train_02.nii.gz: no expert mask",
        ),
        (
            lambda r: (make(r, "train", ["01"]), touch(r, "train", "expert", "03")),
            "expert_annotation_train_03.nii.gz: no matching image",
        ),
        (
            lambda r: (make(r, "train", ["01", "02"]), touch(r, "train", "non_expert", "01").unlink()),
            "microUS_train_01.nii.gz: no non-expert mask",
        ),
        (lambda r: (make(r, "train", ["01"]), touch(r, "train", "image", "01", ".nii")), "case 01 appears twice"),
        (
            lambda r: (make(r, "train", ["01"]), (r / "train" / "expert_annotations" / "mask_1.png").write_bytes(b"")),
            "mask_1.png: unexpected entry",
        ),
        (lambda r: make(r, "train", ["01"], kinds=("image", "expert")), "has no non_expert_annotations/ folder"),
        (
            lambda r: (make(r, "train", ["01"]), touch(r, "train", "non_expert", "02")),
            "nonexpert_annotation_train_02.nii.gz: no matching image",
        ),
        (
            lambda r: (make(r, "train", ["01"]), (r / "train" / "micro_ultrasound_scans" / "extra").mkdir()),
            "extra: unexpected entry in micro_ultrasound_scans/",
        ),
        (lambda r: make(r, "train", ["01"], kinds=("image", "non_expert")), "has no expert_annotations/ folder"),
        (lambda r: (r.parent.mkdir(parents=True, exist_ok=True), r.write_text("")), "is not a folder"),
    ],
)
def test_broken_layouts_name_the_culprit(tmp_path, setup, needle):
    root = tmp_path / "data"
    setup(root)
    assert needle in error_of(root, "train")


def test_hint_for_the_zip_folder(tmp_path):
    make(tmp_path / "Micro_Ultrasound_Prostate_Segmentation_Dataset", "train", ["01"])
    assert "did you mean" in error_of(tmp_path, "train")


def test_a_split_folder_given_as_the_root_gets_a_hint(tmp_path):
    make(tmp_path, "train", ["01"])
    assert "looks like a split folder itself" in error_of(tmp_path / "train", "train")


def test_hidden_files_are_skipped_in_every_listing(tmp_path):
    make(tmp_path, "train", ["01"])
    for folder in (tmp_path / "train").iterdir():  # macOS copies: AppleDouble companions and .DS_Store
        for path in list(folder.iterdir()):
            (folder / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (folder / ".DS_Store").write_bytes(b"")
    cases = find_cases(tmp_path, "train")
    assert [c.image.name for c in cases] == ["microUS_train_01.nii.gz"]
    scans = tmp_path / "train" / "micro_ultrasound_scans"
    (scans / "notes.txt").write_text("")
    (scans / "b.nii").write_bytes(b"")
    assert [p.name for p in nifti_files(scans)] == ["b.nii", "microUS_train_01.nii.gz"]
