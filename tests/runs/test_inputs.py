"""A run's inputs resolved once (`train_inputs`): the cache read, its patients split, a fresh run's weights
resolved, and the warning of a batch larger than the training split; each refusal one line naming the option."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import torch

from microseg.core.errors import MicrosegError
from microseg.runs.config import resolve_train_config
from microseg.runs.inputs import train_inputs
from train_helpers import TINY_TRAIN


def slice_patients(cache: Path) -> list[str]:
    """Each cached training slice's patient id, read from the HDF5 file directly."""
    with h5py.File(cache, "r") as f:
        return [i.decode() for i in f["case_id"][()]]


def config(cache: Path, tmp_path: Path, **options):
    return resolve_train_config(None, dict(TINY_TRAIN, cache=str(cache), run=str(tmp_path / "run"), **options))


def test_the_inputs_hold_the_cache_the_split_and_the_weights_file(cache, tmp_path):
    from microseg.models import build_model

    ids = slice_patients(cache)
    weights = tmp_path / "start.pt"
    torch.save(build_model("tiny", img_size=32).state_dict(), weights)
    inputs = train_inputs(config(cache, tmp_path, val_patients=["03"], val_fraction=0.0, weights=str(weights)), False)
    assert inputs.cache.path == cache and inputs.cache.size == 32 and inputs.cache.case_ids == ["01", "02", "03"]
    assert inputs.train_idx == [i for i, p in enumerate(ids) if p != "03"]
    assert inputs.val_idx == [i for i, p in enumerate(ids) if p == "03"]
    assert inputs.weights == weights and inputs.warnings == () and inputs.resume is False
    assert inputs.config.val_patients == ["03"]
    spelled = train_inputs(config(cache, tmp_path, loss=" 0.5*dice + ag_bce:w=2"), False).loss
    assert spelled.text == " 0.5*dice + ag_bce:w=2" and str(spelled) == "0.5*dice+ag_bce:hard_weight=2"
    assert [(t.weight, t.name, t.options) for t in spelled.terms] == [
        (0.5, "dice", {}),
        (1.0, "ag_bce", {"hard_weight": 2.0}),
    ]
    only = train_inputs(config(cache, tmp_path, patients=["02"], val_fraction=0.0), False)
    assert (only.train_idx, only.val_idx, only.weights) == ([i for i, p in enumerate(ids) if p == "02"], [], None)


def test_a_resumed_run_resolves_no_weights(cache, tmp_path):
    inputs = train_inputs(config(cache, tmp_path, weights=str(tmp_path / "gone.npz")), resume=True)
    assert inputs.weights is None and inputs.resume is True  # a resumed run continues its own weights


def test_a_batch_larger_than_the_training_split_is_one_warning(cache, tmp_path):
    n_train = len(slice_patients(cache))  # every patient trains without a validation split
    (warning,) = train_inputs(config(cache, tmp_path, val_fraction=0.0, batch_size=n_train + 1), False).warnings
    assert f"--batch-size {n_train + 1}" in warning and f"the {n_train} training slices" in warning
    assert train_inputs(config(cache, tmp_path, val_fraction=0.0, batch_size=n_train), False).warnings == ()


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(weights="missing.npz"), "weights file not found: missing.npz"),
        (dict(patients=["09"]), "`patients`: patient(s) 09 not in cache"),
        (dict(val_patients=["01"], patients=["01"], val_fraction=0.0), "are in both `patients` and `val_patients`"),
    ],
)
def test_an_input_the_run_cannot_use_is_one_line(cache, tmp_path, options, needle):
    with pytest.raises(MicrosegError) as err:
        train_inputs(config(cache, tmp_path, **options), False)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
