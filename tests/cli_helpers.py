"""What the CLI tests share: run the CLI in-process, read its one error line, list what a folder holds
or snapshot its files."""

from __future__ import annotations

from pathlib import Path

from microseg.cli import main

PROC_FOLDER = Path("/proc/microseg-tests")  # procfs refuses new entries, even to root


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code: int, err: str, *needles: str) -> str:
    """The single `microseg: error:` line, after checking exit 2, no traceback and the needles."""
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("microseg:")]
    assert len(lines) == 1 and lines[0].startswith("microseg: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree(folder: Path) -> list[str]:
    """Every path under ``folder`` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path) with its bytes: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
