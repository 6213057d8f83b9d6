"""Fetch the Micro-Ultrasound Prostate Segmentation Dataset (MicroSegNet; Zenodo record 10475293).

The record's metadata (Zenodo's REST API, ``GET {api}/records/10475293``) lists its files with
their published md5 checksums, read as pooch's DOI downloader reads them. Each file goes through
``pooch.retrieve`` (temporary name, md5 check, rename; a mismatch leaves nothing behind) with
``ResumableDownloader``, which keeps an interrupted transfer as ``.<name>.part`` beside the target
and resumes it with an HTTP ``Range: bytes=<size>-`` request.

A zip is inspected before anything is extracted (`dataset_entries`): an entry with an absolute
path, a ``..`` component or a symbolic link refuses the archive; of the rest only the dataset's
own files (``[<dataset>/]<split>/<known folder>/<name>.nii[.gz]``) are extracted, and their total
size must fit both a cap (MAX_UNPACKED_BYTES) and the free space of the target's disk. Each is
copied with its bytes counted, so an entry that inflates beyond its recorded size is refused
too. They land in a temporary folder beside the target, the layout is checked with
``microseg.data.layout.find_cases``, and only then is it renamed to
``<out>/Micro_Ultrasound_Prostate_Segmentation_Dataset``.

The API root is ``https://zenodo.org/api``; ``--api URL`` or ``MICROSEG_ZENODO_API`` overrides it
(the tests serve a record from 127.0.0.1). Only this module and ``microseg.pretrained`` ever use
the network, and only when a ``download`` command asks them to.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from tqdm import tqdm

from microseg.data.layout import DATASET_FOLDER, EXPERT, IMAGES, NON_EXPERT, RATERS, find_cases, rater_kind
from microseg.errors import MicrosegError

RECORD_ID = "10475293"
DEFAULT_API = "https://zenodo.org/api"
API_ENV = "MICROSEG_ZENODO_API"
TIMEOUT_S = 30
CHUNK_BYTES = 1 << 14  # an interruption loses at most one chunk of what arrived
MAX_UNPACKED_BYTES = 64 * 2**30
"""The most an archive may unpack to (the published dataset is a few GB)."""
DATASET_FOLDERS = (IMAGES[0], EXPERT[0], NON_EXPERT[0], *(rater_kind(r)[0] for r in RATERS))
_OWN_ENTRY = re.compile(
    rf"(?:{DATASET_FOLDER}/)?(?:train|test)/(?:{'|'.join(DATASET_FOLDERS)})/[^/.][^/]*\.nii(?:\.gz)?"
)


@dataclass(frozen=True)
class RecordFile:
    """One file of a Zenodo record: its name, download URL, md5 (hex) and size in bytes (None if unknown)."""

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


def record_files(api: str, record_id: str = RECORD_ID) -> list[RecordFile]:
    """The files of a Zenodo record with their md5, from ``GET {api}/records/{record_id}``.

    Accepts both metadata formats pooch knows: ``key`` + ``checksum: "md5:<hex>"`` + ``links.self``
    (the API before and since 2023) and ``filename`` + a bare hex checksum (October 2023).
    """
    url = f"{api.rstrip('/')}/records/{record_id}"
    response = http_get(url)
    if response.status_code != 200:
        raise MicrosegError(f"{url}: HTTP {response.status_code} (is record {record_id} public?)")
    try:
        items = response.json()["files"]
    except (ValueError, KeyError, TypeError):
        raise MicrosegError(f"{url}: not a Zenodo record (no 'files' in the JSON answer)") from None
    files = []
    for item in items:
        name = item.get("key") or item.get("filename") or ""
        algorithm, _, digest = str(item.get("checksum", "")).rpartition(":")
        if not name or "/" in name or name.startswith(".") or not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
            raise MicrosegError(f"{url}: file entry {name or item!r} has no usable name and md5 checksum")
        if algorithm not in ("", "md5"):
            raise MicrosegError(f"{url}: file {name} has a {algorithm} checksum, expected md5")
        default = f"{api.rstrip('/')}/records/{record_id}/files/{quote(name)}/content"
        link = (item.get("links") or {}).get("self") or default
        size = item.get("size")
        files.append(RecordFile(name, link, digest.lower(), int(size) if size is not None else None))
    if not files:
        raise MicrosegError(f"{url}: the record lists no files")
    return files


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


def fetch_file(file: RecordFile, folder: Path, progress: bool | None = None) -> Path:
    """Download one record file into ``folder`` (resuming a partial one), md5-checked; returns its path."""
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


def dataset_entries(archive: Path) -> list[Any]:
    """The dataset's own file entries of a zip, after every entry's path and kind and their total
    size are checked; MicrosegError naming the archive and the entry otherwise. Nothing is extracted."""
    import stat
    import zipfile

    try:
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise MicrosegError(f"{archive}: cannot unpack ({err})") from None
    own = []
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
            raise MicrosegError(f"{archive}: entry {name!r} has an absolute path; the archive is not unpacked")
        if ".." in parts:
            raise MicrosegError(
                f"{archive}: entry {name!r} points outside the folder ('..'); the archive is not unpacked"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise MicrosegError(f"{archive}: entry {name!r} is a symbolic link; the archive is not unpacked")
        if not info.is_dir() and _OWN_ENTRY.fullmatch(name):
            own.append(info)
    return own


def _extract(archive: Path, entries: list[Any], staging: Path) -> None:
    """Copy `entries` of the zip under `staging`, each refused if it inflates beyond its recorded size."""
    import zipfile

    with zipfile.ZipFile(archive) as z:
        for info in entries:
            target = staging / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with z.open(info) as source, open(target, "wb") as sink:
                while block := source.read(1 << 20):
                    written += len(block)
                    if written > info.file_size:
                        raise MicrosegError(
                            f"{archive}: entry {info.filename!r} unpacks to more than its recorded "
                            f"{info.file_size} bytes; the archive is not unpacked"
                        )
                    sink.write(block)


def unpack_dataset(archives: list[Path], out: Path) -> Path:
    """Inspect the archives, extract the dataset's own files into a temporary folder beside
    ``out/<dataset>``, check the layout, rename into place."""
    import zipfile

    entries = {archive: dataset_entries(archive) for archive in archives}
    total = sum(info.file_size for found in entries.values() for info in found)
    if total > MAX_UNPACKED_BYTES:
        raise MicrosegError(
            f"{', '.join(map(str, archives))} would unpack to {total / 2**30:.1f} GiB, more than the "
            f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB any copy of the dataset needs; not unpacked"
        )
    free = shutil.disk_usage(out).free
    if total > free:
        raise MicrosegError(
            f"cannot unpack into {out}: the dataset needs {total / 2**20:.1f} MiB and its disk has "
            f"{free / 2**20:.1f} MiB free"
        )
    target = out / DATASET_FOLDER
    staging = Path(tempfile.mkdtemp(prefix=f".{DATASET_FOLDER}.", suffix=".tmp", dir=out))
    try:
        for archive, found in entries.items():
            try:
                _extract(archive, found, staging)
            except (zipfile.BadZipFile, EOFError) as err:
                raise MicrosegError(f"{archive}: cannot unpack ({err})") from None
        root = staging / DATASET_FOLDER if (staging / DATASET_FOLDER).is_dir() else staging
        for split in ("train", "test"):
            try:
                find_cases(root, split)
            except MicrosegError as err:
                raise MicrosegError(f"the downloaded archive is not the dataset's layout: {err}") from None
        os.replace(root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _present(target: Path) -> bool:
    """True when ``target`` already holds the dataset; MicrosegError when it exists but is not it."""
    if not target.exists():
        return False
    try:
        for split in ("train", "test"):
            find_cases(target, split)
    except MicrosegError as err:
        raise MicrosegError(f"{target} exists but is not a complete dataset ({err}); move it away first") from None
    return True


def download_dataset(
    out: str | Path = "data", api: str | None = None, keep_archive: bool = False, progress: bool | None = None
) -> Path:
    """Fetch, verify and unpack the dataset under ``out``; returns the dataset folder."""
    out = Path(out)
    target = out / DATASET_FOLDER
    if _present(target):
        print(f"dataset already present: {target}")
        return target
    api = api or os.environ.get(API_ENV) or DEFAULT_API
    files = record_files(api)
    out.mkdir(parents=True, exist_ok=True)
    archives = []
    for file in files:
        size = f"{file.size / 1e6:.1f} MB" if file.size is not None else "size unknown"
        print(f"fetching {file.name} ({size}, md5 {file.md5}) from {file.url}")
        path = fetch_file(file, out, progress)
        print(f"md5 ok: {path}")
        if path.suffix == ".zip":
            archives.append(path)
    if not archives:
        raise MicrosegError(f"record {RECORD_ID} at {api} holds no .zip archive")
    dataset = unpack_dataset(archives, out)
    if not keep_archive:
        for path in archives:
            path.unlink()
    cases = {split: len(find_cases(dataset, split)) for split in ("train", "test")}
    print(f"dataset ready: {dataset} ({cases['train']} train and {cases['test']} test patients)")
    return dataset
