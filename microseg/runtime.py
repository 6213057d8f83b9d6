"""Where a run computes: the torch device, mixed-precision autocast, and torchrun's processes."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from microseg.errors import OptionError


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when present, else the CPU) or a torch device name, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"`device` {name!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"`device` {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"`device` {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"`device` {name!r}: microseg runs on cpu or cuda")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU of compute capability 8.0 or later
    (Ampere on). `torch.cuda.is_bf16_supported()` also counts emulation (T4, RTX 20xx), where bf16
    convolutions take a slow path."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_amp(amp: str | None, device: torch.device) -> str | None:
    """The `--amp` setting on `device`: "auto" is bf16 on a GPU with native bf16, fp16 (with the
    grad scaler) on an older GPU, and none (fp32) on the CPU; "none" / None is fp32."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return "bf16" if native_bf16(device) else "fp16"
    return None if amp in (None, "none") else amp


def autocast_context(device: torch.device, amp: str | None):
    """bf16 autocast on CPU or GPU; fp16 on GPU only (with a grad scaler); none when amp is None or "none"."""
    amp = resolve_amp(amp, device)
    if amp is None:
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise OptionError("`amp` fp16 needs a CUDA device; use `amp` bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_name)
        if self.device.type == "cuda" and self.device.index is None and self.world > 1:
            self.device = torch.device("cuda", local_rank)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(values)
        return values

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
