"""Valid values, one rule system for every option: the losses', deep supervision's and the training config's.

A rule (`Number`, `Integer`, `Flag`, `Choice`) says which values it accepts and describes them.
Each loss class lists `option_rules` (option name -> rule); its constructor checks every value
against its rule, and `build_loss` checks spec values first so that the message names the key
the user wrote: `check_option` raises one MicrosegError line, e.g. `ag_bce: option w=-4 must
be > 0`. The training config (`microseg.runs.config.RULES`) checks its fields with `check_value`,
whose `OptionError` names the field (`` `lr` must be > 0, got -1 ``; the command line says
``--lr``). Numbers must be finite; booleans are not numbers, and strings are not booleans
(`detach_gamma="false"` is refused, not read as true).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from microseg.core.errors import MicrosegError, OptionError

FLOAT32_TINY = 1e-30
"""The smallest guard (eps, smoothing) a loss accepts: float32 holds it, and its reciprocal (1e30), finitely."""


@dataclass(frozen=True)
class Number:
    """A finite real number in [low, high] (an open end with `low_open` / `high_open`); `none` also allows None.

    `text` replaces the generated description (for a floor that only guards float32's range)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: bool = False
    text: str = ""

    def describe(self) -> str:
        if self.text:
            return self.text
        low, high = format_value(self.low), format_value(self.high)
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {low}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {high}"
        else:
            text = "a finite number"
        return f"{text} or none" if self.none else text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            return False
        number = float(value)
        above = self.low is None or (number > self.low if self.low_open else number >= self.low)
        below = self.high is None or (number < self.high if self.high_open else number <= self.high)
        return above and below

    def convert(self, value: Any) -> float | None:
        return None if value is None else float(value)


@dataclass(frozen=True)
class Integer:
    """An integer >= low (not a bool, not a float)."""

    low: int

    def describe(self) -> str:
        return f"an integer >= {self.low}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= self.low

    def convert(self, value: Any) -> int:
        return int(value)


@dataclass(frozen=True)
class Flag:
    """true or false (a bool)."""

    def describe(self) -> str:
        return "true or false"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def convert(self, value: Any) -> bool:
        return bool(value)


@dataclass(frozen=True)
class Choice:
    """One of the listed strings."""

    values: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(self.values)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def convert(self, value: Any) -> str:
        return value


Rule = Number | Integer | Flag | Choice

POSITIVE = Number(0.0, low_open=True)
NON_NEGATIVE = Number(0.0)
UNIT_INTERVAL = Number(0.0, 1.0)
GUARD = Number(FLOAT32_TINY, 1e-2, text=f"in (0, 0.01] (at least {FLOAT32_TINY:g})")
"""eps-like guards: > 0 (float32-representable) so that logs and ratios stay finite, and at most 0.01
so that they stay a guard and do not reshape the loss (eps = 0.6 would zero it)."""
KERNEL = Integer(1)


def format_value(value: Any) -> str:
    """A number as a message shows it: integral values in full (4294967295), others as %g (0.001, nan)."""
    if isinstance(value, Real) and not isinstance(value, bool):
        number = float(value)
        return str(int(number)) if math.isfinite(number) and number.is_integer() else f"{number:g}"
    return repr(value)


def check_value(name: str, value: Any, rule: Rule) -> Any:
    """`value` converted if `rule` accepts it, else OptionError naming the option `name` (a config field)."""
    if not rule.accepts(value):
        raise OptionError(f"`{name}` must be {rule.describe()}, got {format_value(value)}")
    return rule.convert(value)


def check_option(loss: str, key: str, value: Any, rule: Rule) -> Any:
    """`value` converted (int, float, bool or str) if `rule` accepts it, else MicrosegError naming loss and option."""
    if not rule.accepts(value):
        raise MicrosegError(f"{loss}: option {key}={value!r} must be {rule.describe()}")
    return rule.convert(value)
