"""Fetch the Micro-Ultrasound Prostate Segmentation Dataset (MicroSegNet; Zenodo record 10475293).

The record's metadata (Zenodo's REST API, ``GET {api}/records/10475293``) lists its files with
their published md5 checksums, read as pooch's DOI downloader reads them. Each file is fetched by
``microseg.core.http.fetch_file``: ``pooch.retrieve`` (temporary name, md5 check, rename; a mismatch
leaves nothing behind) with a downloader that keeps an interrupted transfer as ``.<name>.part``
beside the target and resumes it with an HTTP ``Range: bytes=<size>-`` request.

A zip is inspected before anything is extracted (`dataset_entries`): an entry with an absolute
path, a ``..`` component or a symbolic link refuses the archive; of the rest only the dataset's
own files (``[<dataset>/]<split>/<known folder>/<name>.nii[.gz]``) are extracted, and their total
size must fit both a cap (MAX_UNPACKED_BYTES) and the free space of the target's disk. Each is
copied with its bytes counted, so an entry that inflates beyond its recorded size is refused
too. They land in a temporary folder beside the target, the layout is checked with
``microseg.data.layout.find_cases``, and only then is it renamed to
``<out>/Micro_Ultrasound_Prostate_Segmentation_Dataset``.

The API root is ``https://zenodo.org/api``; ``--api URL`` or ``MICROSEG_ZENODO_API`` overrides it
(the tests serve a record from 127.0.0.1). Only this module and ``microseg.models.pretrained`` ever use
the network (through ``microseg.core.http``), and only when a ``download`` command asks them to.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from microseg.core.errors import MicrosegError
from microseg.core.http import RemoteFile, fetch_file, http_get
from microseg.data.layout import DATASET_FOLDER, EXPERT, IMAGES, NON_EXPERT, RATERS, find_cases, rater_kind

RECORD_ID = "10475293"
DEFAULT_API = "https://zenodo.org/api"
API_ENV = "MICROSEG_ZENODO_API"
MAX_UNPACKED_BYTES = 64 * 2**30
"""The most an archive may unpack to (the published dataset is a few GB)."""
DATASET_FOLDERS = (IMAGES[0], EXPERT[0], NON_EXPERT[0], *(rater_kind(r)[0] for r in RATERS))
_OWN_ENTRY = re.compile(
    rf"(?:{DATASET_FOLDER}/)?(?:train|test)/(?:{'|'.join(DATASET_FOLDERS)})/[^/.][^/]*\.nii(?:\.gz)?"
)


def record_files(api: str, record_id: str = RECORD_ID) -> list[RemoteFile]:
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
        files.append(RemoteFile(name, link, digest.lower(), int(size) if size is not None else None))
    if not files:
        raise MicrosegError(f"{url}: the record lists no files")
    return files


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
