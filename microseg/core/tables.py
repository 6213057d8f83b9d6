"""Tables on disk and in reports: CSV read/write (atomic) and markdown, one format for every writer.

Per-patient tables end with the SUMMARY_ROWS (mean, std, median over patients); missing values
are NaN in CSV ("nan") and "n/a" in markdown.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microseg.core.atomic import write_text

SUMMARY_ROWS = ("mean", "std", "median")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Dicts of one layout as a CSV, columns in the first record's key order (nothing written if empty)."""
    if records:
        header = list(records[0])
        write_csv(path, header, [[record.get(key, "") for key in header] for record in records])


def number(text: str | None) -> float:
    """A CSV cell as a float; NaN when empty or not a number."""
    if text is None:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], digits: int = 4) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
