"""The valid range of every loss option: a rule per option, checked when the loss is built.

Each loss class lists `option_rules` (option name -> rule); its constructor checks every value
against its rule, and `build_loss` checks spec values first so that the message names the key
the user wrote. A value outside its rule raises one MicrosegError line, e.g.
`ag_bce: option w=-4 must be > 0`. Numbers must be finite; booleans are not numbers, and strings
are not booleans (`detach_gamma="false"` is refused, not read as true).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from microseg.errors import MicrosegError

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
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "a finite number"
        return f"{text} or none" if self.none else text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
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
        return isinstance(value, Integral) and not isinstance(value, bool) and value >= self.low

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


def check_option(loss: str, key: str, value: Any, rule: Rule) -> Any:
    """`value` converted (int, float, bool or str) if `rule` accepts it, else MicrosegError naming loss and option."""
    if not rule.accepts(value):
        raise MicrosegError(f"{loss}: option {key}={value!r} must be {rule.describe()}")
    return rule.convert(value)
