"""The one YAML reader: a mapping read with yaml.safe_load, every other content one line naming the file,
the same through each of its callers (a train --config, a run's config.yaml, an experiment plan)."""

from __future__ import annotations

from pathlib import Path

import pytest

from microseg.core.errors import MicrosegError
from microseg.core.yaml_mapping import read_yaml_mapping
from microseg.experiments.plan import read_plan_file
from microseg.runs.config import load_config, read_config_file

NOT_A_MAPPING = ["- 1\n- 2\n", "just text\n", "3.5\n", "true\n"]
NOT_YAML = ["a: [1, 2\n", "a: b: c\n", "{x\n", "!!python/object/apply:os.system ['echo hi']\n"]
NOT_TEXT = [b"\xff\xfe\x00binary", b"a: \x80\x81\n"]


def refusal(read, path: Path) -> str:
    with pytest.raises(MicrosegError) as err:
        read(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("text", ["", "# a comment only\n", "~\n"])
def test_an_empty_file_is_an_empty_mapping(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert read_yaml_mapping(path, "option: value") == {}


def test_a_mapping_is_read_as_plain_data(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("lr: 1.0e-3\nseeds: [1, 2]\nbase:\n  epochs: 3\nname: x\n")
    assert read_yaml_mapping(path, "option: value") == {"lr": 1e-3, "seeds": [1, 2], "base": {"epochs": 3}, "name": "x"}


@pytest.mark.parametrize(
    "read, entries",
    [
        (lambda p: read_yaml_mapping(p, "key: value"), "key: value"),
        (lambda p: read_config_file(str(p)), "option: value"),
        (load_config, "option: value"),
        (read_plan_file, "plan field: value"),
    ],
    ids=["reader", "train --config", "run config.yaml", "plan"],
)
def test_each_caller_refuses_what_is_not_a_yaml_mapping_in_one_line(tmp_path, read, entries):
    path = tmp_path / "config.yaml"
    for text in NOT_A_MAPPING:
        path.write_text(text)
        assert refusal(read, path) == f"{path} must hold a mapping of {entries}"
    for text in NOT_YAML:  # a Python object tag is not built (yaml.safe_load): it is not YAML here
        path.write_text(text)
        assert refusal(read, path).startswith(f"{path} is not valid YAML: ")
    for data in NOT_TEXT:
        path.write_bytes(data)
        assert refusal(read, path) == f"{path} is not a text (YAML) file"
