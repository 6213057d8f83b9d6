"""HTTP fetches that resume and verify: the network code shared by the dataset's and the weights' downloads.

`http_get` turns an unreachable host into one MicrosegError line. `ResumableDownloader` (a pooch
downloader) keeps an interrupted transfer as ``.<name>.part`` beside the target (`partial_path`)
and resumes it with an HTTP ``Range: bytes=<size>-`` request. `fetch_file` goes through
``pooch.retrieve`` with it (temporary name, md5 check, rename; a mismatch leaves nothing behind).
Nothing here runs unless a ``download`` command asks for it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from microseg.core.errors import MicrosegError

TIMEOUT_S = 30
CHUNK_BYTES = 1 << 14  # an interruption loses at most one chunk of what arrived


@dataclass(frozen=True)
class RemoteFile:
    """A file to fetch: its name, download URL, md5 (hex) and size in bytes (None if unknown)."""

    name: str
    url: str
    md5: str
    size: int | None


def _reason(err: BaseException) -> str:
    """The operating system's reason inside a requests/urllib3 connection error, on one line."""
    text = " ".join(str(err).split())
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if match:
        return match.group(1).strip()
    return "timed out" if "timed out" in text.lower() else type(err).__name__


def http_get(url: str, headers: dict[str, str] | None = None, stream: bool = False) -> Any:
    """``requests.get`` that turns an unreachable host into one MicrosegError line."""
    import requests

    try:
        return requests.get(url, headers=headers or {}, stream=stream, timeout=TIMEOUT_S)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise MicrosegError(f"cannot reach {urlsplit(url).netloc or url} ({url}): {_reason(err)}") from None


def partial_path(target: Path) -> Path:
    """Where an interrupted transfer of ``target`` is kept: ``.<name>.part`` beside it."""
    return target.with_name(f".{target.name}.part")


class ResumableDownloader:
    """A pooch downloader that resumes: HTTP GET into ``partial`` (Range when it holds bytes already).

    When the transfer completes, ``partial`` is renamed to pooch's output file (pooch then checks
    the hash and renames it into place, or deletes it). An interrupted transfer raises MicrosegError
    and keeps ``partial`` for the next call.
    """

    def __init__(self, partial: Path, size: int | None = None, progress: bool | None = None) -> None:
        self.partial, self.size, self.progress = partial, size, progress

    def __call__(self, url: str, output_file: str, pooch: Any, check_only: bool = False) -> None:
        import requests

        offset = self.partial.stat().st_size if self.partial.exists() else 0
        if offset and offset == self.size:
            os.replace(self.partial, output_file)
            return
        response = http_get(url, {"Range": f"bytes={offset}-"} if offset else None, stream=True)
        with response:
            if response.status_code == 416 and offset:  # the partial file is longer than the file: start over
                self.partial.unlink()
                return self(url, output_file, pooch)
            resumed = offset and response.status_code == 206 and _range_start(response) == offset
            if response.status_code not in (200, 206) or (response.status_code == 206 and not resumed):
                raise MicrosegError(f"{url}: HTTP {response.status_code}")
            offset = offset if resumed else 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else self.size
            bar = tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(urlsplit(url).path).name[:40],
                disable=None if self.progress is None else not self.progress,
            )
            with open(self.partial, "ab" if resumed else "wb") as out, bar:
                try:
                    for chunk in response.iter_content(CHUNK_BYTES):
                        out.write(chunk)
                        bar.update(len(chunk))
                except requests.RequestException:
                    pass  # judged by the size below
        received = self.partial.stat().st_size
        if total is not None and received < total:
            raise MicrosegError(
                f"transfer of {url} interrupted at {received} of {total} bytes; "
                f"run the same command again to resume it (kept as {self.partial})"
            )
        os.replace(self.partial, output_file)


def _range_start(response: Any) -> int | None:
    """First byte of a 206 answer's ``Content-Range: bytes <start>-<end>/<total>``."""
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def fetch_file(file: RemoteFile, folder: Path, progress: bool | None = None) -> Path:
    """Download one file into ``folder`` (resuming a partial one), md5-checked; returns its path."""
    import pooch

    target = folder / file.name
    downloader = ResumableDownloader(partial_path(target), file.size, progress)
    pooch.get_logger().setLevel(logging.WARNING)  # its INFO lines repeat ours
    try:
        return Path(
            pooch.retrieve(file.url, known_hash=f"md5:{file.md5}", fname=file.name, path=folder, downloader=downloader)
        )
    except ValueError as err:  # pooch's hash mismatch; it has deleted the download
        got = re.search(r"but got (\w+)", str(err))
        raise MicrosegError(
            f"{file.name}: md5 {got.group(1) if got else '?'} does not match the record's "
            f"{file.md5}; the download was discarded"
        ) from None
