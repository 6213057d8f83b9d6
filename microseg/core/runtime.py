"""Where a run computes: the torch device, its speed settings, mixed-precision autocast, torchrun's
processes (Ctrl-C held to a step's end: `microseg.core.stop`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from microseg.core.errors import MicrosegError, OptionError


def device_name(name: str) -> torch.device | None:
    """A device name checked as a name only (what a machine other than this one runs on): None for "auto",
    else the cpu or cuda torch device it names; OptionError otherwise."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError(f"`device` {name!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"`device` {name!r}: microseg runs on cpu or cuda")
    return device


def resolve_device(name: str) -> torch.device:
    """ "auto" (CUDA when present, else the CPU) or a torch device name, checked to exist."""
    device = device_name(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"`device` {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(
            f"`device` {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
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


def configure_speed(device: torch.device, deterministic: bool) -> None:
    """cuDNN's autotuner (`cudnn.benchmark`: the fastest convolution algorithm per input shape) and
    TF32 tensor cores for fp32 matrix products and convolutions (fp32 training, evaluation, the
    fp32 parts of autocast) on CUDA; all off under `deterministic`, which also makes torch pick
    deterministic kernels (`use_deterministic_algorithms(True, warn_only=True)`: an op that has
    none, such as the backward of bilinear upsampling on CUDA, warns once and runs anyway) and
    cuBLAS a fixed workspace."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def autocast_context(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CPU or GPU; fp16 on GPU only (with a grad scaler); none when amp is None or "none"."""
    amp = resolve_amp(amp, device)
    if amp is None:
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise OptionError("`amp` fp16 needs a CUDA device; use `amp` bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class ProcessStopped(MicrosegError):
    """Another process of a multi-process run stopped (its own message says why); this one stops too."""


class Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process.

    A failure must end every rank within seconds, not leave the others in a collective until a
    timeout (the NCCL watchdog's 10 minutes): a block where the ranks' work differs (rank 0
    claims the run, validates, writes) runs under `together`, whose end shares any rank's failure
    with all; a rank that fails elsewhere (inside a step) aborts the process group on its way
    out, and a rank whose collective then breaks stops with `ProcessStopped`. Under torchrun the
    agent also stops the remaining workers once one exits with an error.
    """

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and device_name not in ("auto", "cpu", "cuda"):
            raise OptionError(
                f"`device` {device_name} with {self.world} processes would put every process on one "
                "device: use `device` cuda (each process takes the GPU of its LOCAL_RANK) and "
                "CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        self.device = resolve_device(device_name)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", local_rank)

    def start(self) -> None:
        """Join the process group (several processes) and select this rank's GPU."""
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (all_reduce on this rank's device); as given with one process."""
        if self.world == 1:
            return values
        shared = values.to(self.device)
        dist.all_reduce(shared)
        return shared.to(values.device)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A block every rank enters and leaves, where the ranks' work may differ (no collective inside).

        At its end the ranks tell each other whether they failed: a failed rank raises its own
        error, the others `ProcessStopped` naming it. Ctrl-C is not shared (the other ranks have it too).
        """
        if self.world == 1:
            yield
            return
        try:
            yield
        except KeyboardInterrupt:
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # the group may be what broke
                self._failed_ranks(True)
            raise
        failed = self._failed_ranks(False)
        if failed:
            raise ProcessStopped(
                f"process {', '.join(map(str, failed))} of {self.world} failed (its message says why); "
                f"process {self.rank} stops too"
            )

    def _failed_ranks(self, failed: bool) -> list[int]:
        flags = torch.zeros(self.world, dtype=torch.float32)
        flags[self.rank] = float(failed)
        return [int(r) for r in torch.nonzero(self.sum(flags)).flatten()]

    def lost_peer(self, err: BaseException) -> bool:
        """Whether `err` is a collective that broke because another process of the run stopped."""
        return self.world > 1 and (isinstance(err, dist.DistError) or "by peer" in str(err))

    def close(self, failed: bool = False) -> None:
        """Leave the process group; after a failure, abort it, so that no collective of this process waits on."""
        if self.world > 1 and dist.is_initialized():
            if failed and self.device.type == "cuda":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
