"""Multi-process training in tests: N processes of `microseg train` joined by the gloo backend (the
environment torchrun gives them: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), each recording
the slices and the random stream of every step, with Ctrl-C (a real SIGINT) or a failure injected
at a chosen step of a chosen process. A process that does not end within `PROCESS_TIMEOUT_S` is
killed and reported as hung, so a hang fails the test instead of blocking the suite."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

PROCESS_TIMEOUT_S = 240  # a hang of gloo's collectives would last 30 minutes (its default timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_recorder(record: dict, actions: dict, patch=setattr) -> None:
    """Patch the trainer (with `patch`, e.g. pytest's monkeypatch.setattr) to record each step and act
    at the planned calls.

    `record["steps"]` gets [epoch, step, slice ids, fingerprint of the CPU random state] per step;
    `actions` maps a step call (1-based, counted in this process) to "sigint" (a real SIGINT, as a
    terminal sends), "raise" (a RuntimeError in the step) or "ctrl_c" (KeyboardInterrupt raised in
    the step); {"validate": "raise"} makes validation fail.
    """
    import torch

    from microseg.core.errors import MicrosegError
    from microseg.training.trainer import Trainer

    real_step, real_validate = Trainer.train_step, Trainer.validate
    calls = {"n": 0}
    record.setdefault("steps", [])

    def step(self, batch):
        calls["n"] += 1
        state = hashlib.sha1(torch.random.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        ids = [f"{case}:{z}" for case, z in zip(batch["case_id"], batch["slice_index"].tolist(), strict=True)]
        record["steps"].append([self.epoch, self.step, ids, state])
        action = actions.get(calls["n"])
        if action:
            record["injected"] = time.monotonic()
        if action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        elif action == "raise":
            raise RuntimeError("injected failure in a step")
        elif action == "ctrl_c":
            raise KeyboardInterrupt
        return real_step(self, batch)

    def validate(self, loader):
        if actions.get("validate") == "raise":
            record["injected"] = time.monotonic()
            raise MicrosegError("injected failure in validation")
        return real_validate(self, loader)

    patch(Trainer, "train_step", step)
    patch(Trainer, "validate", validate)


def _process(rank: int, world: int, port: int, argv: list[str], actions: dict, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under a background pytest
    import torch

    from microseg.cli import main

    torch.set_num_threads(1)
    record: dict = {"rank": rank}
    install_recorder(record, {int(k) if k.isdigit() else k: v for k, v in actions.items()})
    with open(Path(out) / f"rank{rank}.err", "w") as err:
        sys.stderr = err
        try:
            record["code"] = main(argv)
        except BaseException as exc:  # noqa: BLE001 -- reported to the test
            record["code"] = f"raised {type(exc).__name__}: {exc}"
        record["ended"] = time.monotonic()
        sys.stderr = sys.__stderr__
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def launch(world: int, argv: list[str], out: Path, actions: dict[int, dict] | None = None) -> list[dict]:
    """Run `microseg argv` in `world` processes; `actions[rank]` as in `install_recorder`. Returns
    each process's record: exit code, steps, stderr lines ("err"), end time; fails on a hang."""
    import pytest
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(
            target=_process,
            args=(rank, world, port, argv, {str(k): v for k, v in (actions or {}).get(rank, {}).items()}, str(out)),
        )
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    if hung:
        pytest.fail(f"process(es) {hung} of {world} still running after {PROCESS_TIMEOUT_S} s")
    records = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"process {rank} ended without its record (exit code {processes[rank].exitcode})"
        record = json.loads(path.read_text())
        record["err"] = [line for line in (out / f"rank{rank}.err").read_text().splitlines() if line.strip()]
        records.append(record)
    return records


def steps_by_position(*records: dict) -> dict[tuple[int, int], list[str]]:
    """(epoch, step) -> the sorted slice ids all the given processes' records saw there."""
    seen: dict[tuple[int, int], list[str]] = {}
    for record in records:
        for epoch, step, ids, _ in record["steps"]:
            seen.setdefault((epoch, step), []).extend(ids)
    return {key: sorted(ids) for key, ids in seen.items()}
