"""The one writer of both reports (`compare RUN...` and `compare EXP...`): report.md built section by
section, each table also written as a CSV beside it; the `--out` guard; the folder written whole or
not at all.

A report folder is replaced whole (`microseg.core.atomic.atomic_folder`: built under a temporary
name, renamed into place; a killed compare leaves the earlier report as it was), so `--out` must
be new, empty, or an earlier report (it holds report.md): a folder holding anything else is refused
before any work, as is a file, or a place where no file can be created.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from microseg.core.atomic import atomic_folder, require_writable, write_text
from microseg.core.errors import MicrosegError
from microseg.core.tables import markdown_table, write_csv

REPORT = "report.md"


class ReportWriter:
    """report.md's lines as they are written into the folder `out`; each table also goes to
    `<out>/<stem>.csv`, its notes above it in report.md, or below it (`notes_below`, the runs report's
    layout)."""

    def __init__(self, out: Path, notes_below: bool = False):
        self.out = out
        self.notes_below = notes_below
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(
        self,
        stem: str,
        title: str,
        header: list[str],
        rows: list[list],
        notes: Sequence[str] = (),
        shown: tuple[list[str], list[list]] | None = None,
    ) -> None:
        """`rows` into `<stem>.csv`; in report.md a section: the title, the table (`shown` where the
        markdown shows another layout of the same numbers) and its notes, then the CSV's link."""
        write_csv(self.out / f"{stem}.csv", header, rows)
        table = markdown_table(*(shown or (header, rows)))
        body = [table, "", *notes, ""] if self.notes_below else [*notes, *([""] if notes else []), table, ""]
        self.add(f"## {title}", "", *body, f"([{stem}.csv]({stem}.csv))", "")


def require_report_folder(out: Path) -> None:
    """MicrosegError unless `out` is new, empty, or an earlier report (it holds report.md), and a
    report can be written there; nothing is created."""
    if out.exists() and not out.is_dir():
        raise MicrosegError(f"cannot create folder {out}: --out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT).is_file():
        raise MicrosegError(
            f"--out {out} holds files that are not a report (it is a folder that holds no {REPORT}): "
            "choose a new folder, or an earlier report's"
        )
    require_writable(out / REPORT)  # names --out when its place cannot be written


def write_report_folder(out: Path, write: Callable[[ReportWriter], None], notes_below: bool = False) -> Path:
    """Check `out` (`require_report_folder`), let `write` fill a `ReportWriter` on a new folder, write its
    report.md, and put the folder in the place of `out`, whole; returns the path of report.md."""
    out = Path(out)
    require_report_folder(out)
    with atomic_folder(out) as building:
        report = ReportWriter(building, notes_below)
        write(report)
        write_text(building / REPORT, "\n".join(report.lines))
    return out / REPORT
