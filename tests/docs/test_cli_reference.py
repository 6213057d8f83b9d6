"""docs/reference/cli.md is generated from the parsers and must be current: the committed page equals a
fresh rendering, and every option argparse's own --help lists is on the page, in its command's section."""

from __future__ import annotations

import argparse
import importlib.util
import re

from docs_helpers import DOCS, ROOT
from microseg.cli import build_parser

PAGE = DOCS / "reference" / "cli.md"
REGENERATE = "python scripts/cli_reference.py > docs/reference/cli.md"


def load_generator():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_the_parsers_rendering():
    fresh = load_generator().render()
    assert PAGE.read_text() == fresh, (
        f"{PAGE.relative_to(ROOT)} is out of date with microseg/cli.py: run `{REGENERATE}`"
    )


def commands(parser: argparse.ArgumentParser, prog: str = "microseg"):
    """(prog, parser) of every command and sub-command, walking the sub-parsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prog} {name}", sub
                yield from commands(sub, f"{prog} {name}")


def sections(text: str) -> dict[str, str]:
    """The page's `## heading` sections: heading -> text up to the next one."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_command_and_option_of_the_help_is_in_its_section(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse's help, one option a line
    page = sections(PAGE.read_text())
    found = list(commands(build_parser()))
    # at least the 10 verbs, download's 2 and experiment's 3 sub-commands; each one a section
    assert len(found) >= 15 and set(page) == {prog for prog, _ in found}
    for prog, parser in found:
        invocations = re.findall(r"^  (-\S.*?)(?:\s{2,}|$)", parser.format_help(), flags=re.M)
        options = {flag for line in invocations for flag in re.findall(r"--[a-z][\w-]*", line)}
        listed = set(re.findall(r"`(--[a-z][\w-]*)", page[prog]))
        assert options - {"--help"} <= listed, (prog, sorted(options - listed - {"--help"}))
        for action in parser._positionals._group_actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(f"[{prog} {name}]" in page[prog] for name in action.choices), prog
            else:
                assert f"`{action.metavar or action.dest}" in page[prog] or f"`[{action.dest}]" in page[prog], prog
