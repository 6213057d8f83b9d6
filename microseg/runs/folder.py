"""The run folder: its file names, the overwrite / --force / --resume policy, its lock.

`runs/<name>/` holds
- `config.yaml`      the resolved TrainConfig;
- `calf_stats.json`  the training-set statistics of the run's loss (`SegLoss.dataset_statistics`: CALF's moments);
- `history.csv`      one row per epoch;
- `last.pt`, `best.pt` checkpoints (`microseg.runs.checkpoint`; `best.pt` by validation DSC, only with a
  validation split);
- `metrics/`         `per_patient.csv` / `.md`, `per_slice.csv`, `evaluation.json` (from evaluate);
- `predictions/`     the predicted masks (from evaluate).
- `heldout/`         an experiment's fold cell: the evaluation of its held-out patients, as metrics/
                     (its masks in `heldout/predictions/`).
- `tensorboard/`     TensorBoard event files (with `train --tensorboard`).

While `train` writes a run it holds the run's lock (`RunLock`: an exclusive flock on
`<run>/.lock`, which holds the writer's pid): a second `train` into the same run is refused
naming that pid. The lock dies with its process, so a killed run never blocks the next one.
A fresh run that fails before its first checkpoint leaves nothing: what it created is removed.
A resumed run keeps its config (`resumed_config`). Reading runs for reports: `microseg.runs.record`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microseg.core.atomic import make_folder
from microseg.core.errors import MicrosegError
from microseg.core.tables import write_records


class RunFolder:
    """The paths of one run folder, and the policy for writing into it."""

    OUTPUTS = (
        "config.yaml",
        "calf_stats.json",
        "history.csv",
        "last.pt",
        "best.pt",
        "metrics",
        "heldout",
        "predictions",
        "tensorboard",
    )

    def __init__(self, path: str | Path, heldout: bool = False):
        """`heldout`: the evaluation paths (`metrics`, `predictions`, `per_patient`, ...) are those of an
        experiment fold cell's held-out evaluation (`heldout/`, its masks in `heldout/predictions/`), not
        the test split's (`metrics/`, `predictions/`)."""
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.calf_stats = self.path / "calf_stats.json"
        self.history = self.path / "history.csv"
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self.metrics = self.path / ("heldout" if heldout else "metrics")
        self.predictions = self.metrics / "predictions" if heldout else self.path / "predictions"
        self.tensorboard = self.path / "tensorboard"
        self.per_patient = self.metrics / "per_patient.csv"
        self.per_patient_md = self.metrics / "per_patient.md"
        self.per_slice = self.metrics / "per_slice.csv"
        self.evaluation = self.metrics / "evaluation.json"

    @property
    def held_out(self) -> RunFolder:
        """The same run, its evaluation paths those of the held-out evaluation (`heldout/`)."""
        return RunFolder(self.path, heldout=True)

    def prepare(self, resume: bool, force: bool) -> None:
        """--resume needs `last.pt`; otherwise refuse an existing run without --force, and with it clear its outputs."""
        if resume:
            if not self.last.is_file():
                raise MicrosegError(f"cannot resume: {self.last} not found")
            return
        existing = [name for name in self.OUTPUTS if (self.path / name).exists()]
        if existing and not force:
            raise MicrosegError(f"run {self.path} already exists ({', '.join(existing)}); use --resume or --force")
        for name in existing:
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def claim(self, resume: bool, force: bool) -> Iterator[None]:
        """Hold the run's lock and apply `prepare` under it while the block writes the run.

        If the block fails before a fresh run has its `last.pt`, the outputs it wrote are removed,
        and so are the folders this call created.
        """
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        make_folder(self.path)
        lock = RunLock(self.path)
        try:
            lock.acquire()
            try:
                self.prepare(resume, force)
            except BaseException:
                lock.release()
                raise
        except BaseException:
            _remove_empty(created)
            raise
        try:
            yield
        except BaseException:
            if not resume and not self.last.exists():
                self._remove_outputs()
            raise
        finally:
            lock.release()
            _remove_empty(created)

    def _remove_outputs(self) -> None:
        """Best effort, on the way out of a failure: what cannot be removed stays (the failure is reported)."""
        for name in self.OUTPUTS:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    target.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock while the block reads and writes the run (evaluate): refused, naming
        the holder's pid, while another process (train, evaluate) holds it."""
        lock = RunLock(self.path)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        write_records(self.history, rows)

    def checkpoint_path(self, which: str = "best") -> Path:
        """`best.pt` (falling back to `last.pt` when training had no validation), or `last.pt`."""
        if not self.path.is_dir():
            raise MicrosegError(f"run folder not found: {self.path}")
        candidates = [self.best, self.last] if which == "best" else [self.last]
        for path in candidates:
            if path.is_file():
                return path
        raise MicrosegError(f"{self.path} holds no checkpoint (expected {' or '.join(p.name for p in candidates)})")


def _remove_empty(folders: list[Path]) -> None:
    """rmdir `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class RunLock:
    """An exclusive, non-blocking flock on `<run>/.lock`; the file holds the holder's pid.

    The kernel drops a flock when its process ends, however it ends, so a stale `.lock` left by a
    killed process is taken over. The holder unlinks the file before it unlocks; a process that
    locked a file since unlinked (it opened it just before) sees another inode at the path and
    tries again.
    """

    NAME = ".lock"

    def __init__(self, run: Path):
        self.run, self.path = run, run / self.NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise MicrosegError(self.refusal(holder)) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def refusal(self, holder: str) -> str:
        return (
            f"run {self.run} is being written by another microseg process (pid {holder}); "
            "wait for it to end, or choose another --run"
        )

    def release(self) -> None:
        """Unlink the file, then unlock. A folder that no longer accepts the unlink (made read-only
        meanwhile) keeps an unlocked `.lock`, which the next holder takes over: the error being
        raised, if any, stays the one that names the write that failed."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the identity of the checkpoint that metrics scored)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
