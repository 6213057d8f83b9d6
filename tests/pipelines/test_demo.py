"""The demo's side-by-side training: one process per job, lines prefixed, errors passed back as one line."""

from __future__ import annotations

import io

import pytest
import yaml

from train_helpers import TINY_TRAIN
from microseg.demo import PrefixedLines, train_side_by_side
from microseg.errors import MicrosegError


def test_prefixed_lines_prefix_each_complete_line_and_are_not_a_terminal():
    sink = io.StringIO()
    stream = PrefixedLines(sink, "[focal] ")
    stream.write("epoch 1\nepoch")
    stream.write(" 2\n")
    assert sink.getvalue() == "[focal] epoch 1\n[focal] epoch 2\n"
    assert not stream.isatty()


@pytest.mark.slow
def test_jobs_train_and_evaluate_side_by_side_each_with_its_own_loss(cache, phantom, tmp_path, capfd):
    jobs = {loss: dict(TINY_TRAIN, epochs=1, val_fraction=0.0, cache=str(cache), run=str(tmp_path / loss), loss=loss)
            for loss in ("focal", "ag_bce")}
    runs = train_side_by_side(jobs, phantom)
    assert runs == [tmp_path / "focal", tmp_path / "ag_bce"]
    for loss, run in zip(jobs, runs):
        assert yaml.safe_load((run / "config.yaml").read_text())["loss"] == loss
        assert (run / "metrics" / "per_patient.csv").is_file()
    out = capfd.readouterr().out
    assert "[focal] epoch 1" in out and "[ag_bce] epoch 1" in out
    assert "[ag_bce] evaluate " in out


@pytest.mark.slow
def test_a_failing_job_raises_its_own_one_line_error(cache, phantom, tmp_path):
    jobs = {"focal": dict(TINY_TRAIN, cache=str(tmp_path / "missing.h5"), run=str(tmp_path / "focal"), loss="focal")}
    with pytest.raises(MicrosegError, match="missing.h5"):
        train_side_by_side(jobs, phantom)
    assert not (tmp_path / "focal").exists()
