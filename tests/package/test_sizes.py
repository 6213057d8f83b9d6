"""Sizes, checked on the source: no function over 60 lines, no class over 250, in every module of microseg.

A definition's size is its lines from its ``def`` / ``class`` line to its last line, docstring and
blank lines inside included, decorators not (a nested function or a method counts in its own right,
and inside its enclosing definition's size).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import microseg

PACKAGE = Path(microseg.__file__).parent
MAX_LINES = {"function": 60, "class": 250}

KNOWN_OFFENDERS: set[str] = set()
"""Definitions over their limit when this test came, each to be split. The list only shrinks: an
entry that is within its limit, or gone, fails the test until it is removed from here."""


def definition_sizes(source: str, module: str) -> dict[str, tuple[str, int]]:
    """Every definition in `source`, nested ones too: "module.Qual.name" -> ("function" or "class", lines)."""
    sizes: dict[str, tuple[str, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}.{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                sizes[name] = (kind, child.end_lineno - child.lineno + 1)
                visit(child, name)
            else:
                visit(child, prefix)

    visit(ast.parse(source), module)
    return sizes


def oversized(sizes: dict[str, tuple[str, int]]) -> dict[str, str]:
    """The definitions over their kind's limit, each as "function (71 lines > 60)"."""
    return {
        name: f"{kind} ({lines} lines > {MAX_LINES[kind]})"
        for name, (kind, lines) in sizes.items()
        if lines > MAX_LINES[kind]
    }


def package_sizes() -> dict[str, tuple[str, int]]:
    sizes: dict[str, tuple[str, int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["microseg", *path.relative_to(PACKAGE).with_suffix("").parts]
        sizes |= definition_sizes(path.read_text(), ".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sizes


def test_sizes_are_counted_from_the_definition_line_to_its_last_line():
    def block(header: str, depth: int, lines: int) -> str:
        """`header` at `depth` levels of indent, then `lines` body lines one level deeper."""
        return textwrap.indent(header + "\n" + "".join(f"    x{i} = {i}\n" for i in range(lines)), "    " * depth)

    source = (
        "@decorator\n"
        + block("def short():", 0, 59)  # 60 lines: the decorator is not counted
        + "\n"
        + block("def long():", 0, 60)  # 61
        + "\nclass Holder:\n"
        + block("def method(self):", 1, 59)  # 60
        + "    def nested(self):\n"
        + block("def inner():", 2, 59)  # 60, nested 61, the class 1 + 60 + 61
    )
    sizes = definition_sizes(source, "m")
    assert sizes["m.short"] == ("function", 60) and sizes["m.long"] == ("function", 61)
    assert sizes["m.Holder.method"] == ("function", 60) and sizes["m.Holder.nested.inner"] == ("function", 60)
    assert sizes["m.Holder.nested"] == ("function", 61) and sizes["m.Holder"] == ("class", 122)
    assert set(oversized(sizes)) == {"m.long", "m.Holder.nested"}
    assert oversized({"m.C": ("class", 251), "m.D": ("class", 250)}) == {"m.C": "class (251 lines > 250)"}


def test_no_function_over_60_lines_and_no_class_over_250():
    sizes = package_sizes()
    assert {"microseg.cli.main", "microseg.core.errors.MicrosegError"} <= set(sizes)  # the package's modules were read
    new = {name: why for name, why in oversized(sizes).items() if name not in KNOWN_OFFENDERS}
    assert not new, "split these definitions: " + "; ".join(f"{name}, {why}" for name, why in sorted(new.items()))


def test_known_offenders_are_still_over_their_limit():
    """A known offender that has been split (or moved, or removed) leaves the list."""
    over = oversized(package_sizes())
    fixed = sorted(KNOWN_OFFENDERS - set(over))
    assert not fixed, f"within the limits now, remove from KNOWN_OFFENDERS: {', '.join(fixed)}"
