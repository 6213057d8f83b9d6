"""Build losses from a spec string: `name[:key=value,...]` terms joined by `+`, each optionally `weight*`.

Examples: `adaptive_focal`, `ag_bce:w=4,k=3`, `adaptive_focal+dice`, `0.5*dice+focal:alpha=0.25,gamma=2`.
Values read as int, float, bool (`true`/`false`) or `none`, else as strings. Keyword overrides
given to `build_loss` (e.g. the per-scale `kernel_size` of deep supervision) go to every term
whose constructor takes that keyword, unless the spec sets that option itself: spec options win,
overrides fill the rest, others are ignored.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from microseg.errors import MicrosegError
from microseg.losses.base import LOSSES, SegLoss, WeightedSum

_TERM = re.compile(r"^\s*(?:(?P<weight>[^*]+)\*)?\s*(?P<name>[A-Za-z_]\w*)\s*(?::(?P<options>.*))?$")
_PLUS = re.compile(r"(?<!\d[eE])\+")  # a '+' that is not an exponent sign (1e+3)


@dataclass(frozen=True)
class Term:
    weight: float
    name: str
    options: dict[str, Any]


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
    """Split a loss spec into weighted terms with their options (syntax only; names are not checked)."""
    terms = []
    for part in _PLUS.split(spec):
        match = _TERM.match(part)
        weight = parse_value(match["weight"]) if match and match["weight"] else 1.0
        numeric = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
        if match is None or not numeric:
            raise MicrosegError(f"malformed loss spec {spec!r}: cannot read {part.strip()!r}")
        options: dict[str, Any] = {}
        for item in [] if match["options"] is None else match["options"].split(","):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not (key and sep and value) or key in options:
                raise MicrosegError(f"malformed loss spec {spec!r}: bad or repeated option {item.strip()!r}")
            options[key] = parse_value(value)
        terms.append(Term(weight, match["name"], options))
    return terms


def _parameters(cls: type[SegLoss]) -> dict[str, inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in inspect.signature(cls).parameters.items() if p.kind in kinds}


def _check_type(name: str, key: str, value: Any, default: Any) -> None:
    """Spec values must have the type of the option's default (an int is fine for a float)."""
    expected = type(default)
    if default is None:
        return
    if expected is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float) if expected is float else expected) and not isinstance(value, bool)
    if not ok:
        raise MicrosegError(f"loss {name!r}: option {key!r} must be {expected.__name__}, got {value!r}")


def _build_term(term: Term, calf_stats: Any, overrides: dict[str, Any]) -> SegLoss:
    cls = LOSSES.get(term.name)
    if cls is None:
        raise MicrosegError(f"unknown loss {term.name!r}; valid names: {', '.join(sorted(LOSSES))}")
    params = {n: p for n, p in _parameters(cls).items() if n != "stats"}
    options: dict[str, Any] = {}
    for key, value in term.options.items():
        param = cls.aliases.get(key, key)
        if param not in params or param in options:
            alias_of = {target: alias for alias, target in cls.aliases.items()}
            listed = ", ".join(f"{n} ({alias_of[n]})" if n in alias_of else n for n in params)
            raise MicrosegError(
                f"unknown or repeated option {key!r} for loss {term.name!r}; its options: {listed or 'none'}"
            )
        _check_type(term.name, key, value, params[param].default)
        options[param] = value
    options.update({k: v for k, v in overrides.items() if k in params and k not in options})
    if "stats" in _parameters(cls):
        options["stats"] = calf_stats
    loss = cls(**options)
    loss.options = {n: options.get(n, p.default) for n, p in _parameters(cls).items()}
    return loss


def build_loss(spec: str, calf_stats: Any = None, **overrides: Any) -> SegLoss:
    """The loss module a spec describes; a weighted sum (`WeightedSum`) when it has several terms or a weight.

    `calf_stats` (a `CalfStats`, or its dict; `stats=` is accepted too) goes to CALF; `overrides`
    fill options the spec leaves unset.
    """
    calf_stats = overrides.pop("stats", None) if calf_stats is None else calf_stats
    built = [(t.weight, _build_term(t, calf_stats, overrides)) for t in parse_spec(spec)]
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][1]
    return WeightedSum(built, name="".join(spec.split()))


def describe_loss(module: SegLoss) -> dict[str, Any]:
    """{name, options} of a loss from `build_loss` ({name, terms: [{weight, name, options}]} for a composite),
    plain data ready for the run's YAML."""
    if type(module) is WeightedSum:
        return {
            "name": module.name,
            "terms": [{"weight": w, **describe_loss(t)} for w, t in zip(module.weights, module.terms)],
        }
    options = getattr(module, "options", {})
    return {"name": module.name, "options": {k: asdict(v) if is_dataclass(v) else v for k, v in options.items()}}
