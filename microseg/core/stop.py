"""Stopping a command: Ctrl-C, SIGTERM and SIGHUP as one interruption, held to a step's end.

A terminal's Ctrl-C sends SIGINT, a scheduler's time limit or `timeout` SIGTERM, a closed terminal
SIGHUP. Inside `StopSignals` (experiment runs and cells install it for all three) the first of
them raises `Interrupted` in the main thread, as Ctrl-C raises KeyboardInterrupt, so one path
saves the position and the command ends with status 128 + the signal's number (130, 143, 129);
later ones are ignored (the command is already stopping; SLURM signals every process of a job).
Inside a `deferred` block (a training step) the signal only marks itself `pending` and the
block's end raises it, so a saved position is always a step boundary; a stop that some library
swallowed on its way is raised again there (and by `check`, before a cell starts). Training uses the
command's `StopSignals` (`stop_signals`); alone (`microseg train`) it holds Ctrl-C only, and
SIGTERM keeps its default action there (torchrun's agent ends the processes of a failed run with it).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) that reached the command; `detail` says what to resume."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = ""):
        super().__init__(detail)
        self.signum, self.detail = int(signum), detail


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def signal_of(err: KeyboardInterrupt) -> int:
    """The signal that raised `err` (a plain KeyboardInterrupt: Ctrl-C's, SIGINT)."""
    return err.signum if isinstance(err, Interrupted) else int(signal.SIGINT)


def exit_status(err: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the command: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + signal_of(err)


def _default(signum: int) -> Any:
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


class StopSignals:
    """The stop signals handled in this process: the first raises `Interrupted` (inside `deferred`, at
    the block's end), later ones are ignored.

    `with StopSignals(signals):` installs the handler, in the main thread, for each of `signals`
    whose handler is Python's default (an ignored signal stays ignored) and restores them after.
    `signum` is the signal received (None while none); `pending`, one received inside a deferred
    block and not raised yet.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self.pending = self.deferring = False
        self.previous: dict[int, Any] = {}  # the handlers replaced

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                if signal.getsignal(signum) is _default(signum):
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # already stopping
        self.signum = signum
        if not self.deferring:
            raise Interrupted(signum)
        self.pending = True

    @contextlib.contextmanager
    def deferred(self, reraise: bool = True) -> Iterator[None]:
        """A stop signal waits for the block's end (then `Interrupted`, unless `reraise` is False)."""
        outer, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = outer
        if reraise and not outer and self.signum is not None:  # pending, or raised and lost on the way
            self.pending = False
            raise self.interrupted()

    def check(self) -> None:
        """Raise the stop already received, if any (where a stop must not be missed: before a cell starts)."""
        if self.signum is not None:
            raise self.interrupted()

    def interrupted(self) -> Interrupted:
        """The interruption of the signal received (Ctrl-C's when none was)."""
        return Interrupted(self.signum or signal.SIGINT)


def installed() -> StopSignals | None:
    """The `StopSignals` handling a stop signal in this process now, if any."""
    for signum in STOP_SIGNALS:
        owner = getattr(signal.getsignal(signum), "__self__", None)
        if isinstance(owner, StopSignals):
            return owner
    return None


@contextlib.contextmanager
def stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopSignals]:
    """The `StopSignals` of the command when one is installed (an experiment run's: all three
    signals), else a new one handling `signals` for the block."""
    outer = installed()
    if outer is not None:
        yield outer
        return
    with StopSignals(signals) as own:
        yield own
