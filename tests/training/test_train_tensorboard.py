"""`train --tensorboard`: the event file read back (TensorBoard's EventAccumulator) holds the
history's scalars, the running loss at the checks and a validation overlay per epoch; without
the package, one line naming the extra."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest

from microseg.cli import main
from microseg.training.tensorboard import EXPERT_RGB, PREDICTION_RGB, overlay
from train_helpers import tiny_train_argv, train_tiny


def test_event_file_holds_history_running_loss_and_overlay(cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_tiny(cache, tmp_path / "tb", tensorboard="", sync_every=2)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    with open(run / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    for column in [k for k in history[0] if k != "epoch"]:
        logged = events.Scalars(f"epoch/{column}")
        assert [e.step for e in logged] == [int(r["epoch"]) for r in history]
        assert [e.value for e in logged] == pytest.approx(
            [float(r[column]) for r in history], rel=1e-6, abs=1e-6, nan_ok=True
        )
    # 3 steps per epoch, checks after step 2 and at the epoch's end: global steps 2, 3, 5, 6
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3, 5, 6]
    images = events.Images("val/overlay")
    assert [e.step for e in images] == [1, 2] and (images[0].width, images[0].height) == (32, 32)


def test_overlay_draws_both_contours_over_the_grey_image():
    image = np.full((9, 9), 0.5)
    expert = np.zeros((9, 9), bool)
    expert[2:7, 2:7] = True  # a 5 x 5 square: its boundary is the 16-pixel ring
    pred = np.zeros((9, 9), bool)
    pred[4, 4] = True  # one pixel: its own boundary
    rgb = overlay(image, expert, pred)
    ring = expert.copy()
    ring[3:6, 3:6] = False
    assert rgb.shape == (9, 9, 3) and rgb.dtype == np.uint8
    assert (rgb[ring] == EXPERT_RGB).all() and ring.sum() == 16
    assert (rgb[4, 4] == PREDICTION_RGB).all()
    assert (rgb[~ring & ~pred] == 128).all()  # round(0.5 * 255)


def test_without_tensorboard_one_line_names_the_extra(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    code = main(tiny_train_argv(cache, tmp_path / "r", "--tensorboard"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install -e '.[tensorboard]'" in err[0]
