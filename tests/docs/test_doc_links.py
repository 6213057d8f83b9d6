"""The README is a README and the docs hold together: every relative link in README.md and docs/ reaches
an existing file (and heading), every page of docs/ is on the map, and the README's opening commands
are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from docs_helpers import DOCS, ROOT, fenced_blocks, heading_anchors, markdown_files, prose

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
README_MAX_LINES = 150


def relative_links(page: Path) -> list[str]:
    """The targets of a page's markdown links that point into the repository (no scheme)."""
    return [target for target in LINK.findall(prose(page)) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_every_relative_link_reaches_a_file_and_its_heading():
    checked, broken = 0, []
    for page in markdown_files():
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            checked += 1
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    assert checked >= 50 and not broken, "\n".join(broken)


def test_the_anchors_are_the_ones_github_makes(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n## At the real dataset's scale\n\n## `compare EXP`: reports\n\n## Demo\n\n## Demo\n")
    assert heading_anchors(page) == {"a-title", "at-the-real-datasets-scale", "compare-exp-reports", "demo", "demo-1"}


def test_every_page_of_the_docs_is_on_the_map():
    index = DOCS / "index.md"
    mapped = {(DOCS / target.partition("#")[0]).resolve() for target in relative_links(index)}
    pages = {page.resolve() for page in DOCS.rglob("*.md")} - {index.resolve()}
    assert pages and pages <= mapped, sorted(str(p.relative_to(ROOT)) for p in pages - mapped)


def test_the_readme_is_short_and_opens_with_the_commands_ci_runs():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    opening = fenced_blocks(readme)[0].text.splitlines()
    ci_test_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert opening[3] == ci_test_command
    assert opening[1] == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/microseg demo"
