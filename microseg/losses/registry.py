"""Loss specs: `name[:key=value,...]` terms joined by `+`, each optionally `weight*`, parsed once into a `LossSpec`.

Examples: `adaptive_focal`, `ag_bce:w=4,k=3`, `adaptive_focal+dice`, `0.5*dice+focal:alpha=0.25,gamma=2`.
Values read as int, float, bool (`true`/`false`) or `none`, else as strings. Term weights must
be finite and > 0. Every option is checked against its rule (`microseg.core.rules`): an
unknown, repeated, mistyped or out-of-range option is refused with one line naming the loss and
the option. A `LossSpec` (`LossSpec.parse`) is the parsed, checked and immutable value: a string
spec is parsed once where it enters (the command line, a config, a plan) and the value is what
`build_loss`, `dataset_statistics`, `check_spec` and `DeepSupervision` take (each also takes the
text, for library use). Keyword options of `build_loss` are read as spec options are and refused
when no term takes them; deep supervision's per-scale kernel goes, explicitly, only to the terms
with a dilation kernel (`scale_kernel_size`).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from microseg.core.errors import MicrosegError
from microseg.core.rules import check_option
from microseg.losses.base import LOSSES, SegLoss, WeightedSum

_TERM = re.compile(r"^\s*(?:(?P<weight>[^*]+)\*)?\s*(?P<name>[A-Za-z_]\w*)\s*(?::(?P<options>.*))?$")
_PLUS = re.compile(r"(?<!\d[eE])\+")  # a '+' that is not an exponent sign (1e+3)


@dataclass(frozen=True)
class Term:
    """One term of a spec: its weight, loss name and options (`items`: (key, value) pairs in the spec's order)."""

    weight: float
    name: str
    items: tuple[tuple[str, Any], ...] = ()

    @property
    def options(self) -> dict[str, Any]:
        """The options as a dict (a copy: the term stays as it is)."""
        return dict(self.items)


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, anything else -> the stripped string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> list[Term]:
    """Split a loss spec into weighted terms with their options as written (syntax only: the first step of
    `LossSpec.parse`; names and options are not checked)."""
    terms = []
    for part in _PLUS.split(spec):
        match = _TERM.match(part)
        weight = parse_value(match["weight"]) if match and match["weight"] else 1.0
        numeric = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
        if match is None or not numeric:
            raise MicrosegError(f"malformed loss spec {spec!r}: cannot read {part.strip()!r}")
        if weight <= 0:
            raise MicrosegError(f"loss spec {spec!r}: term weight {weight:g} of {match['name']!r} must be > 0")
        options: dict[str, Any] = {}
        for item in [] if match["options"] is None else match["options"].split(","):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not (key and sep and value) or key in options:
                raise MicrosegError(f"malformed loss spec {spec!r}: bad or repeated option {item.strip()!r}")
            options[key] = parse_value(value)
        terms.append(Term(weight, match["name"], tuple(options.items())))
    return terms


def _listed(cls: type[SegLoss]) -> str:
    """A loss's options with their short names, e.g. 'hard_weight (w), kernel_size (k), beta, eps'."""
    alias_of = {target: alias for alias, target in cls.aliases.items()}
    return ", ".join(f"{n} ({alias_of[n]})" if n in alias_of else n for n in cls.option_rules) or "none"


def _option_name(cls: type[SegLoss], key: str) -> str:
    """The constructor option a spec or keyword key names (aliases resolved), else MicrosegError listing them."""
    param = cls.aliases.get(key, key)
    if param not in cls.option_rules:
        raise MicrosegError(f"unknown option {key!r} for loss {cls.name!r}; its options: {_listed(cls)}")
    return param


def _term_class(name: str) -> type[SegLoss]:
    cls = LOSSES.get(name)
    if cls is None:
        raise MicrosegError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return cls


@dataclass(frozen=True, eq=False)
class LossSpec:
    """A loss spec parsed once: `text` as written, and its `terms`, each option checked against its rule,
    converted and named by its constructor parameter (`w=4` -> `hard_weight=4.0`).

    Immutable. `canonical` (and `str()`) is its one spelling (`canonical_spec`); two specs are equal
    when their canonical spellings are, i.e. when they build the same loss.
    """

    text: str
    terms: tuple[Term, ...]

    @classmethod
    def parse(cls, text: str) -> LossSpec:
        """The spec `text` describes: syntax (`parse_spec`), then every loss name, then every term's options;
        MicrosegError naming the first culprit."""
        written = parse_spec(text)
        for term in written:
            _term_class(term.name)
        return cls(text, tuple(Term(t.weight, t.name, tuple(_checked_options(t).items())) for t in written))

    @functools.cached_property
    def canonical(self) -> str:
        """`[weight*]name[:option=value,...]` per term, the terms (a sum) sorted: see `canonical_spec`."""
        return "+".join(sorted(_canonical_term(term) for term in self.terms))

    def __str__(self) -> str:
        return self.canonical

    def __repr__(self) -> str:
        return f"LossSpec({self.canonical!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LossSpec) and self.canonical == other.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)


def as_loss_spec(spec: str | LossSpec) -> LossSpec:
    """`spec` itself when it is a LossSpec, else the LossSpec its text describes (`LossSpec.parse`)."""
    return spec if isinstance(spec, LossSpec) else LossSpec.parse(spec)


def _build_term(term: Term, dataset_stats: Any, keywords: dict[str, Any], scale_kernel_size: int | None) -> SegLoss:
    """One term of a LossSpec: its (checked) options, keyword options and the deep-supervision kernel."""
    cls = _term_class(term.name)
    options = term.options
    for key, value in keywords.items():
        param = cls.aliases.get(key, key)
        if param not in cls.option_rules:
            continue  # taken by another term (build_loss checks that some term takes it)
        if param in options:
            raise MicrosegError(f"option {param} of loss {term.name!r} is given twice (again as {key}=)")
        options[param] = check_option(term.name, key, value, cls.option_rules[param])
    if scale_kernel_size is not None and "kernel_size" in cls.option_rules:
        if "kernel_size" in options:
            raise MicrosegError(
                f"loss {term.name!r}: deep supervision sets the dilation kernel of each scale from its kernel_sizes "
                "(ds_kernel_sizes), so the loss spec must not set kernel_size (k)"
            )
        options["kernel_size"] = scale_kernel_size
    if cls.dataset_stats_param is not None:
        options[cls.dataset_stats_param] = dataset_stats
    return cls(**options)


def build_loss(
    spec: str | LossSpec, dataset_stats: Any = None, *, scale_kernel_size: int | None = None, **options: Any
) -> SegLoss:
    """The loss module a spec describes; a weighted sum (`WeightedSum`) when it has several terms or a weight.

    `spec`: a LossSpec, or its text (parsed here). `options` are keyword options, read as spec
    options are (short names too: `w=10`), given to every term that takes them; a keyword no term
    takes, or one the spec sets too, is refused.
    `dataset_stats` (from `dataset_statistics`, or its dict) goes to the terms that take training-set
    statistics (CALF's `CalfStats`); `stats=` is accepted as its other spelling when no term has a
    `stats` option (A-FL's). `scale_kernel_size` is deep supervision's
    kernel for one scale: it goes to every term with a dilation kernel (`kernel_size`) and to no
    other, and a spec that sets that kernel itself is refused.
    """
    spec = as_loss_spec(spec)
    classes = [_term_class(t.name) for t in spec.terms]
    takes_stats_option = any("stats" in cls.option_rules for cls in classes)
    if "stats" in options and not takes_stats_option and any(cls.dataset_stats_param for cls in classes):
        if dataset_stats is not None:
            raise MicrosegError("dataset statistics given twice (dataset_stats= and stats=); give one")
        dataset_stats = options.pop("stats")
    for key in options:
        if not any(cls.aliases.get(key, key) in cls.option_rules for cls in classes):
            listed = _listed(classes[0]) if len(classes) == 1 else "; ".join(f"{c.name}: {_listed(c)}" for c in classes)
            raise MicrosegError(f"unknown option {key!r} for loss {spec.text!r}; its options: {listed}")
    if dataset_stats is not None and not any(cls.dataset_stats_param for cls in classes):
        takers = ", ".join(name for name, cls in sorted(LOSSES.items()) if cls.dataset_stats_param)
        raise MicrosegError(f"dataset statistics given, but loss {spec.text!r} has no term that takes them ({takers})")
    built = [(t.weight, _build_term(t, dataset_stats, options, scale_kernel_size)) for t in spec.terms]
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][1]
    return WeightedSum(built, name="".join(spec.text.split()))


def dataset_statistics(spec: str | LossSpec, foreground_fractions: Callable[[], np.ndarray]) -> Any:
    """The training-set statistics the spec's loss needs before training, None when it needs none.

    Each term whose loss declares `dataset_stats_param` computes them (`SegLoss.dataset_statistics`)
    from its options and the expert foreground fraction of every training slice
    (`foreground_fractions()`, read only when needed); the terms must agree on them.
    """
    spec = as_loss_spec(spec)
    needing = [(term, cls) for term in spec.terms if (cls := _term_class(term.name)).dataset_stats_param]
    if not needing:
        return None
    fractions = foreground_fractions()
    found = list(dict.fromkeys(cls.dataset_statistics(term.options, fractions) for term, cls in needing))
    if len(found) != 1:
        raise MicrosegError(
            f"loss spec {spec.text!r}: its terms need {len(found)} different training-set statistics "
            "(e.g. two include_empty choices for calf); give them one"
        )
    return found[0]


def _checked_options(term: Term) -> dict[str, Any]:
    """A written term's options by constructor parameter (aliases resolved), each checked against its rule
    and converted."""
    cls = _term_class(term.name)
    options: dict[str, Any] = {}
    for key, value in term.items:
        param = _option_name(cls, key)
        if param in options:
            raise MicrosegError(f"repeated option {key!r} ({param}) for loss {term.name!r}")
        options[param] = check_option(term.name, key, value, cls.option_rules[param])
    return options


def _spelled(value: Any) -> str:
    """An option value or weight as the canonical spec writes it; `parse_value` reads it back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def _canonical_term(term: Term) -> str:
    """`[weight*]name[:option=value,...]` of a LossSpec's term: full option names, sorted, default values
    left out, weight 1 left out."""
    cls = _term_class(term.name)
    defaults = inspect.signature(cls).parameters
    kept = []
    for param, value in sorted(term.items):
        default = defaults[param].default if param in defaults else inspect.Parameter.empty
        rule = cls.option_rules[param]
        if not (rule.accepts(default) and (rule.convert(default), type(rule.convert(default))) == (value, type(value))):
            kept.append(f"{param}={_spelled(value)}")
    weight = "" if term.weight == 1 else f"{_spelled(float(term.weight))}*"
    return weight + term.name + (":" + ",".join(kept) if kept else "")


def check_spec(spec: str | LossSpec) -> LossSpec:
    """The LossSpec of `spec` (parsed when it is text), once it is refused, without building anything heavy,
    if deep supervision would refuse it (for config validation before a run folder exists): names,
    options and their ranges, the checks a loss's constructor makes across its options, no dilation
    kernel set by the spec; CALF's statistics are not needed."""
    spec = as_loss_spec(spec)
    for term in spec.terms:
        if _term_class(term.name).dataset_stats_param is None:
            _build_term(term, None, {}, scale_kernel_size=1)  # what the constructor checks across options
    return spec


def canonical_spec(spec: str | LossSpec) -> str:
    """The one spelling of a loss spec, after the checks of `check_spec`: two specs that build the same loss
    have the same canonical spec, whatever their whitespace, option order, option aliases or explicit defaults.

    Each term is written `[weight*]name[:option=value,...]`: options by their constructor name
    (`ag_bce:w=4` -> `ag_bce:hard_weight=4`), sorted, an option equal to its default left out
    (`dice:smooth=1e-5` -> `dice`: it builds the same loss), numbers in their shortest form
    (`1.0` -> `1`, `0.00001` -> `1e-05`), booleans `true`/`false`; a weight of 1 is left out. The
    terms, a sum, are sorted. Terms are not merged (`dice+dice` stays two terms). `canonical_spec`
    of a canonical spec is itself.
    """
    return check_spec(spec).canonical
