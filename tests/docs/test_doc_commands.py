"""The command blocks of the docs are runnable: every `microseg` command in a shell block of README.md
or docs/ parses with today's options, and the blocks marked ```bash phantom``` run as written, page by
page in order, in a fresh folder, each `--out` / `--run` they name existing afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from docs_helpers import DOCS, PHANTOM, ROOT, Block, fenced_blocks, markdown_files, microseg_commands
from microseg.cli import build_parser

MIN_PHANTOM_BLOCKS = 4
BLOCK_TIMEOUT_S = 300


def phantom_pages() -> dict[Path, list[Block]]:
    """Each page holding phantom blocks -> its phantom blocks, in page order."""
    pages: dict[Path, list[Block]] = {}
    for page in sorted(DOCS.rglob("*.md")):
        blocks = [block for block in fenced_blocks(page) if block.info == PHANTOM]
        if blocks:
            pages[page] = blocks
    return pages


def test_the_docs_hold_phantom_blocks_that_run_microseg():
    pages = phantom_pages()
    blocks = [block for blocks in pages.values() for block in blocks]
    assert len(pages) >= 2 and len(blocks) >= MIN_PHANTOM_BLOCKS, [b.where() for b in blocks]
    assert all(microseg_commands(block.text) for block in blocks)


def test_every_microseg_command_in_a_shell_block_parses(capsys):
    parser, checked, refused = build_parser(), 0, []
    for page in markdown_files():
        for block in fenced_blocks(page):
            if not block.info.startswith(("bash", "sh")):
                continue
            for argv in microseg_commands(block.text):
                if "..." in argv:  # a placeholder for the options shown elsewhere
                    continue
                checked += 1
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    refused.append(f"{block.where()}: microseg {' '.join(argv)}: {capsys.readouterr().err.strip()}")
    assert checked >= 40 and not refused, "\n".join(refused)


def named_outputs(block: Block) -> list[str]:
    """The paths a block's commands write: the values of their --out and --run options."""
    outputs = []
    for argv in microseg_commands(block.text):
        outputs += [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("--out", "--run")]
    return outputs


def run_block(block: Block, folder: Path, env: dict) -> subprocess.CompletedProcess:
    """Run one block with bash -e in `folder`; a block that hangs is killed with all it started."""
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", block.text],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{block.where()} did not end within {BLOCK_TIMEOUT_S} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(phantom_pages()), ids=lambda page: str(page.relative_to(DOCS)))
def test_the_phantom_blocks_of_a_page_run_as_written(page, tmp_path):
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shim = bin_folder / "microseg"  # `microseg` is this tree's package, run by this interpreter
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m microseg "$@"\n')
    shim.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_folder}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    work = tmp_path / "work"
    work.mkdir()
    for block in phantom_pages()[page]:
        result = run_block(block, work, env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (block.where(), result.stderr[-3000:])
        missing = [path for path in named_outputs(block) if not (work / path).exists()]
        assert not missing, (block.where(), missing)
