"""Where a run computes: --amp auto per GPU generation (the capability query patched), the
benchmark's peak table keyed by exact GPU names."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from microseg.core.runtime import configure_speed, resolve_amp


@pytest.mark.parametrize(
    "capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")]
)
def test_amp_auto_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expected):
    # T4 / RTX 20xx (7.5) and V100 (7.0) emulate bf16: fp16 with the grad scaler; A100 (8.0) on: bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_amp("auto", torch.device("cuda", 0)) == expected
    assert resolve_amp("bf16", torch.device("cuda", 0)) == "bf16"  # an explicit choice stays
    assert resolve_amp("none", torch.device("cuda", 0)) is None


def test_amp_auto_is_fp32_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_amp("auto", torch.device("cpu")) is None


@pytest.fixture
def bench_train():
    scripts = str(Path(__file__).resolve().parents[2] / "scripts")
    sys.path.insert(0, scripts)
    try:
        yield importlib.import_module("bench_train")
    finally:
        sys.path.remove(scripts)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ],
)
def test_peak_table_matches_whole_gpu_names(bench_train, monkeypatch, name, peak):
    # a substring match gave the H100 PCIe and NVL the SXM peak, and the L40 the L4's
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench_train.detected_peak(torch.device("cuda", 0)) == peak


@pytest.mark.parametrize("deterministic", [False, True])
def test_speed_settings_on_cuda_and_their_deterministic_opposite(deterministic):
    flags = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
    )
    try:
        configure_speed(torch.device("cuda", 0), deterministic)  # flags only: no GPU needed
        assert torch.backends.cudnn.benchmark is not deterministic
        assert (
            torch.backends.cuda.matmul.allow_tf32 is not deterministic
            and torch.backends.cudnn.allow_tf32 is not deterministic
        )
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = flags[:4]
        torch.use_deterministic_algorithms(flags[4])
