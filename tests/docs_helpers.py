"""What the documentation tests share: the repository's markdown files, their fenced blocks, the
`microseg` commands inside a shell block, and the anchors GitHub gives a page's headings."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PHANTOM = "bash phantom"
"""The info string of a fenced block that runs on the phantom as written (the tests run it)."""

FENCE = re.compile(r"^(```+|~~~+)(.*)$")
SHELL_SEPARATORS = {"&&", "||", ";", "|"}


def markdown_files() -> list[Path]:
    """README.md, every page under docs/, and the READMEs of the data and weights folders."""
    return [
        ROOT / "README.md",
        *sorted(DOCS.rglob("*.md")),
        ROOT / "data" / "README.md",
        ROOT / "weights" / "README.md",
    ]


@dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line of its opening fence (from 1), its info string, its text."""

    page: Path
    line: int
    info: str
    text: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, in order."""
    blocks, opening, body = [], None, []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        match = FENCE.match(line.strip())
        if opening is None and match:
            opening, body = (number, match[1], match[2].strip()), []
        elif opening is not None and match and match[1].startswith(opening[1]) and not match[2].strip():
            blocks.append(Block(page, opening[0], opening[2], "\n".join(body)))
            opening = None
        elif opening is not None:
            body.append(line)
    return blocks


def outside_fences(page: Path) -> str:
    """A page's text without its fenced blocks: the prose, headings and links live there."""
    lines, fence = [], None
    for line in page.read_text().splitlines():
        match = FENCE.match(line.strip())
        if fence is None and match:
            fence = match[1]
        elif fence is not None and match and match[1].startswith(fence) and not match[2].strip():
            fence = None
        elif fence is None:
            lines.append(line)
    return "\n".join(lines)


def prose(page: Path) -> str:
    """A page's text without its fenced blocks and inline code spans."""
    return re.sub(r"(`+).*?\1", "", outside_fences(page), flags=re.S)


def microseg_commands(script: str) -> list[list[str]]:
    """The argument lists of the `microseg` commands a shell block runs (`microseg ...`,
    `.venv/bin/microseg ...`, `python -m microseg ...`), continuation lines joined, comments dropped."""
    commands, current = [], []
    for word in shell_words(script):
        if word in SHELL_SEPARATORS:
            argv = _microseg_argv(current)
            if argv is not None:
                commands.append(argv)
            current = []
        else:
            current.append(word)
    return commands


def shell_words(script: str) -> list[str]:
    """A shell block's words as the shell splits them (quotes removed, comments dropped,
    continuation lines joined), with `;` ending each line."""
    words: list[str] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words += [*lexer, ";"]
    return words


def _microseg_argv(words: list[str]) -> list[str] | None:
    """The arguments after `microseg` in one simple command (`microseg`, `path/to/microseg`,
    `python -m microseg` or `torchrun ... -m microseg -- ...`), else None."""
    for i, word in enumerate(words):
        if word.endswith("/microseg") or (word == "microseg" and (i == 0 or words[i - 1] == "-m")):
            argv = words[i + 1 :]
            return argv[1:] if words[0] == "torchrun" and argv[:1] == ["--"] else argv  # torchrun drops the --
    return None


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation but hyphens and
    underscores dropped, spaces to hyphens; a repeated anchor gets -1, -2, ..."""
    anchors: set[str] = set()
    for line in outside_fences(page).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match[1].replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors
