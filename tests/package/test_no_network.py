"""Only `download` touches the network: the whole pipeline runs with every connection refused.

simulate, prepare, train (with augmentation, so albumentations is imported), evaluate, predict
and compare run in-process with socket connects, create_connection and name resolution replaced
by a recorder that refuses; no attempt may be recorded. microseg and albumentations are imported
afresh inside the test (albumentations asks the package index for its latest version when it is
imported, unless NO_ALBUMENTATIONS_UPDATE is set), with that variable removed from the
environment first. A control shows the recorder catches albumentations' own check.
"""

from __future__ import annotations

import importlib
import socket
import sys
import urllib.request

import pytest

from train_helpers import tiny_train_argv


@pytest.fixture
def refused_network(monkeypatch) -> list:
    """Every connect / resolve recorded, then refused with OSError."""
    attempts: list = []

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append((name, args[1:] if name.startswith("socket.") else args))
            raise OSError(f"network refused in tests: {name}")

        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


@pytest.fixture
def fresh_imports(monkeypatch):
    """microseg and albumentations leave sys.modules for the test (restored afterwards); a module the
    test alone imported leaves too, so that no later test meets it beside the restored ones (its
    classes, MicrosegError among them, would not be theirs)."""
    monkeypatch.delenv("NO_ALBUMENTATIONS_UPDATE", raising=False)
    before = [name for name in sys.modules if name.split(".")[0] in ("microseg", "albumentations")]
    for name in before:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [name for name in sys.modules if name.split(".")[0] in ("microseg", "albumentations")]:
        if name not in before:
            del sys.modules[name]


def test_the_recorder_sees_a_connection_and_albumentations_own_check(refused_network, fresh_imports):
    with pytest.raises(OSError):
        urllib.request.urlopen("http://127.0.0.1:9/", timeout=1)
    assert refused_network
    refused_network.clear()
    with pytest.warns(UserWarning):  # "Error fetching version info": the refused attempt
        importlib.import_module("albumentations")  # its own import, without microseg: it asks PyPI
    assert any("pypi.org" in str(args) for _, args in refused_network), refused_network


def test_no_command_but_download_attempts_a_connection(refused_network, fresh_imports, tmp_path, capsys):
    main = importlib.import_module("microseg.cli").main
    data, cache, runs = tmp_path / "data", tmp_path / "cache.h5", tmp_path / "runs"
    one = ["--jobs", "1"]  # every command in this process, where connects are recorded
    assert (
        main(
            ["simulate", "--out", str(data), "--train", "3", "--test", "2", "--slices", "4", "--size", "48", "64", *one]
        )
        == 0
    )
    assert main(["prepare", "--data", str(data), "--out", str(cache), "--size", "32", *one]) == 0
    for loss in ("ag_bce", "dice"):
        assert (
            main(
                tiny_train_argv(
                    cache, runs / loss, "--loss", loss, "--batch-size", "4", "--augment", "--optimizer", "adam"
                )
            )
            == 0
        )
        assert main(["evaluate", "--run", str(runs / loss), "--data", str(data), "--device", "cpu", *one]) == 0
    scan = sorted((data / "test" / "micro_ultrasound_scans").glob("*.nii.gz"))[0]
    assert (
        main(
            [
                "predict",
                "--run",
                str(runs / "dice"),
                "--input",
                str(scan),
                "--out",
                str(tmp_path / "mask.nii.gz"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        main(["compare", str(runs / "ag_bce"), str(runs / "dice"), "--out", str(tmp_path / "report"), "--overlays"])
        == 0
    )
    assert "albumentations" in sys.modules and (tmp_path / "report" / "report.md").is_file()
    assert refused_network == []
    assert "version info" not in capsys.readouterr().err
