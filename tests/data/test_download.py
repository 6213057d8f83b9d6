"""`microseg download dataset` against a Zenodo look-alike on 127.0.0.1 (no network).

The server answers the record's metadata and serves the archive with HTTP Range support; it can
cut a transfer midway, ignore Range, or publish a wrong md5. Checksums are computed here with
hashlib, the expected layout from the phantom the archive was made of.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import stat
import threading
import zipfile
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import microseg.data.download as download_module
from cli_helpers import one_error
from microseg.cli import main
from microseg.data.download import RECORD_ID
from microseg.data.layout import DATASET_FOLDER, find_cases
from microseg.data.phantom import simulate_dataset

ARCHIVE = f"{DATASET_FOLDER}.zip"


class Zenodo(BaseHTTPRequestHandler):
    """GET /api/records/<id> (JSON) and GET /files/<name> (bytes, Range-aware), as the server's settings say."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        s = self.server
        s.requests.append((self.path, self.headers.get("Range")))
        if self.path == f"/api/records/{RECORD_ID}":
            files = [
                {
                    "key": name,
                    "size": len(data),
                    "checksum": f"md5:{s.md5.get(name, hashlib.md5(data).hexdigest())}",
                    "links": {"self": f"http://127.0.0.1:{s.server_port}/files/{name}"},
                }
                for name, data in s.files.items()
            ]
            return self._send(200, json.dumps({"id": int(RECORD_ID), "files": files}).encode(), {})
        name = self.path.removeprefix("/files/")
        if name not in s.files:
            return self._send(404, b"not found", {})
        data, start = s.files[name], 0
        ranged = self.headers.get("Range")
        if ranged and s.honour_range:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            return self._send(206, data[start:], headers, cut=s.cut.pop(0) if s.cut else None)
        self._send(200, data, {}, cut=s.cut.pop(0) if s.cut else None)

    def _send(self, status: int, body: bytes, headers: dict, cut: int | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])  # a cut transfer: fewer bytes, then the socket closes
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Zenodo)
    httpd.files, httpd.md5, httpd.cut, httpd.honour_range, httpd.requests = {}, {}, [], True, []
    # shutdown() waits for the serving loop to look again: every 50 ms, not the default 0.5 s
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def published_dataset(tmp_path_factory) -> tuple[Path, bytes]:
    """A small phantom in the real layout and its zip, with the dataset folder at the top, as published."""
    root = simulate_dataset(
        tmp_path_factory.mktemp("src") / DATASET_FOLDER, n_train=2, n_test=1, n_slices=4, size=(32, 48), seed=5
    )
    (root / "notes.bin").write_bytes(np.random.default_rng(0).bytes(200_000))  # a few download chunks' worth
    archive = root.parent / ARCHIVE
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for path in sorted(root.rglob("*")):
            z.write(path, path.relative_to(root.parent).as_posix())
    return root, archive.read_bytes()


def api(server) -> str:
    return f"http://127.0.0.1:{server.server_port}/api"


def download(out: Path, server, capsys) -> tuple[int, str, str]:
    code = main(["download", "dataset", "--out", str(out), "--api", api(server)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def same_tree(a: Path, b: Path) -> bool:
    """The same dataset files (volumes and masks) with the same bytes."""
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*.nii.gz")}  # noqa: E731
    return files(a) == files(b)


def test_download_verifies_and_unpacks_the_real_layout(tmp_path, server, published_dataset, capsys, monkeypatch):
    root, archive = published_dataset
    server.files[ARCHIVE] = archive
    monkeypatch.setenv("MICROSEG_ZENODO_API", api(server))  # the env var serves as well as --api
    code = main(["download", "dataset", "--out", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"md5 {hashlib.md5(archive).hexdigest()}" in out and "dataset ready" in out
    target = tmp_path / "data" / DATASET_FOLDER
    assert same_tree(target, root)
    assert not (target / "notes.bin").exists()  # not one of the dataset's own files: not unpacked
    assert [c.case_id for c in find_cases(target, "train")] == ["01", "02"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [DATASET_FOLDER]  # no zip, no temporaries
    code = main(["download", "dataset", "--out", str(tmp_path / "data"), "--api", "http://127.0.0.1:9/api"])
    assert code == 0 and "already present" in capsys.readouterr().out  # no second transfer, no network


@pytest.mark.parametrize("honour_range", [True, False])
def test_interrupted_transfer_resumes(tmp_path, server, published_dataset, capsys, honour_range):
    root, archive = published_dataset
    server.files[ARCHIVE], server.cut, server.honour_range = archive, [len(archive) // 2], honour_range
    code, _, err = download(tmp_path, server, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("microseg: error: transfer of ") and "interrupted" in err
    partial = tmp_path / f".{ARCHIVE}.part"
    kept = partial.stat().st_size
    assert 0 < kept <= len(archive) // 2 and not (tmp_path / DATASET_FOLDER).exists()
    assert partial.read_bytes() == archive[:kept]
    code, _, _ = download(tmp_path, server, capsys)
    assert code == 0 and same_tree(tmp_path / DATASET_FOLDER, root)
    assert server.requests[-1] == (f"/files/{ARCHIVE}", f"bytes={kept}-")  # asked for the rest
    assert not partial.exists()


@pytest.mark.parametrize("corruption", ["wrong md5", "corrupt resume"])
def test_bad_checksum_is_refused_and_nothing_is_left(tmp_path, server, published_dataset, capsys, corruption):
    _, archive = published_dataset
    server.files[ARCHIVE] = archive
    if corruption == "wrong md5":
        server.md5[ARCHIVE] = hashlib.md5(b"another file").hexdigest()
    else:  # a partial file whose bytes are not the archive's: the resumed whole fails the md5
        (tmp_path / f".{ARCHIVE}.part").write_bytes(b"x" * 1000)
    code, _, err = download(tmp_path, server, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"microseg: error: {ARCHIVE}: md5 ") and "discarded" in err
    assert list(tmp_path.iterdir()) == []


def test_archive_in_another_layout_is_refused(tmp_path, server, capsys):
    path = tmp_path / "junk.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{DATASET_FOLDER}/train/readme.txt", "no volumes here")
    server.files[ARCHIVE] = path.read_bytes()
    out = tmp_path / "data"
    code, _, err = download(out, server, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not the dataset's layout" in err
    assert not (out / DATASET_FOLDER).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_no_server_is_one_line(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["download", "dataset", "--out", str(tmp_path), "--api", f"http://127.0.0.1:{port}/api"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"microseg: error: cannot reach 127.0.0.1:{port}")


# -- the archive is inspected before anything is extracted ----------------------------------------
# Archives built here from the valid phantom, then altered: an entry with an absolute path, with
# '..' components, a symbolic link, a total beyond the cap or the disk's free space, an entry that
# inflates beyond its recorded size. Each is refused with one line naming the archive (and the
# entry); nothing is written outside the download folder nor left in it but the verified zip. A
# valid archive with extra files unpacks only the dataset's own files.


def valid_entries(root: Path) -> list[tuple[str, bytes]]:
    return [
        (p.relative_to(root.parent).as_posix(), p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name.endswith(".nii.gz")
    ]


def build(path: Path, entries: list[tuple[str, bytes]], extra: list[zipfile.ZipInfo | tuple] = ()) -> bytes:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
        for item in extra:
            if isinstance(item, zipfile.ZipInfo):
                z.writestr(item, item.comment)
            else:
                z.writestr(*item)
    return path.read_bytes()


def symlink(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    info.comment = target.encode()
    return info


def left_in(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


BAD = {
    "dotdot": (lambda tmp: (f"{DATASET_FOLDER}/train/../../../escaped.nii.gz", b"x"), "'..'"),
    "dotdot-top": (lambda tmp: ("../escaped.nii.gz", b"x"), "'..'"),
    "absolute": (lambda tmp: (str(tmp / "escaped.nii.gz"), b"x"), "absolute path"),
    "symlink": (
        lambda tmp: symlink(f"{DATASET_FOLDER}/train/micro_ultrasound_scans/microUS_train_09.nii.gz", "/etc/passwd"),
        "symbolic link",
    ),
    "symlink-dir": (lambda tmp: symlink(f"{DATASET_FOLDER}/link", str(tmp)), "symbolic link"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsafe_entries_refuse_the_archive_before_anything_is_extracted(
    case, tmp_path, server, published_dataset, capsys
):
    root, _ = published_dataset
    make, needle = BAD[case]
    archive = tmp_path / "archive.zip"
    server.files[ARCHIVE] = build(archive, valid_entries(root), [make(tmp_path)])
    out = tmp_path / "data"
    code, _, err = download(out, server, capsys)
    one_error(code, err, ARCHIVE, needle, "not unpacked")
    assert not (tmp_path / "escaped.nii.gz").exists() and not (tmp_path.parent / "escaped.nii.gz").exists()
    assert left_in(out) == [ARCHIVE]  # the verified zip only: no dataset, no temporary


def test_a_total_beyond_the_cap_is_refused_before_extracting(tmp_path, server, published_dataset, capsys, monkeypatch):
    root, _ = published_dataset
    entries = valid_entries(root)
    monkeypatch.setattr(download_module, "MAX_UNPACKED_BYTES", sum(len(d) for _, d in entries) - 1)
    server.files[ARCHIVE] = build(tmp_path / "a.zip", entries)
    out = tmp_path / "data"
    code, _, err = download(out, server, capsys)
    one_error(code, err, ARCHIVE, "would unpack to", "not unpacked")
    assert left_in(out) == [ARCHIVE]


def test_a_zip_bomb_entry_of_the_dataset_is_refused_by_the_cap(
    tmp_path, server, published_dataset, capsys, monkeypatch
):
    """64 MiB of zeros deflate to about 64 KiB: refused from its recorded size, never written."""
    root, _ = published_dataset
    monkeypatch.setattr(download_module, "MAX_UNPACKED_BYTES", 32 * 2**20)
    bomb = (f"{DATASET_FOLDER}/train/micro_ultrasound_scans/microUS_train_03.nii.gz", bytes(64 * 2**20))
    server.files[ARCHIVE] = build(tmp_path / "a.zip", valid_entries(root) + [bomb])
    assert len(server.files[ARCHIVE]) < 2**20
    out = tmp_path / "data"
    code, _, err = download(out, server, capsys)
    one_error(code, err, "would unpack to")
    assert left_in(out) == [ARCHIVE]


def test_a_total_beyond_the_free_space_is_refused(tmp_path, server, published_dataset, capsys, monkeypatch):
    root, _ = published_dataset
    entries = valid_entries(root)
    server.files[ARCHIVE] = build(tmp_path / "a.zip", entries)
    out = tmp_path / "data"
    real = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")

    def small_disk(path):
        usage = real(path)
        return Usage(usage.total, usage.used, 1000) if Path(path) == out else usage

    monkeypatch.setattr(download_module.shutil, "disk_usage", small_disk)
    code, _, err = download(out, server, capsys)
    one_error(code, err, str(out), "the dataset needs", "free")
    assert left_in(out) == [ARCHIVE]


def test_an_entry_inflating_beyond_its_recorded_size_is_refused(tmp_path, server, published_dataset, capsys):
    root, _ = published_dataset
    entries = valid_entries(root)
    path = tmp_path / "a.zip"
    build(path, entries)
    name, data = entries[0]
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    half = (len(data) // 2).to_bytes(4, "little")  # the recorded uncompressed size, halved
    raw[info.header_offset + 22 : info.header_offset + 26] = half  # in the local header
    offset = raw.index(b"PK\x01\x02")
    while offset != -1:  # and in its central directory record
        length = int.from_bytes(raw[offset + 28 : offset + 30], "little")
        if raw[offset + 46 : offset + 46 + length].decode() == name:
            raw[offset + 24 : offset + 28] = half
        offset = raw.find(b"PK\x01\x02", offset + 4)
    server.files[ARCHIVE] = bytes(raw)
    out = tmp_path / "data"
    code, _, err = download(out, server, capsys)
    one_error(code, err, ARCHIVE)
    assert "more than its recorded" in err or "cannot unpack" in err
    assert left_in(out) == [ARCHIVE]


def test_only_the_datasets_own_files_are_extracted(tmp_path, server, published_dataset, capsys):
    root, _ = published_dataset
    entries = valid_entries(root)
    extra = [
        (f"{DATASET_FOLDER}/train/big.bin", bytes(4 * 2**20)),
        ("__MACOSX/._x.nii.gz", b"apple"),
        (f"{DATASET_FOLDER}/README.txt", b"read me"),
        (f"{DATASET_FOLDER}/train/scripts/run.sh", b"rm -rf /"),
    ]
    server.files[ARCHIVE] = build(tmp_path / "a.zip", entries, extra)
    out = tmp_path / "data"
    code, _, err = download(out, server, capsys)
    assert code == 0, err
    target = out / DATASET_FOLDER
    unpacked = sorted(p.relative_to(out).as_posix() for p in target.rglob("*") if p.is_file())
    assert unpacked == sorted(name for name, _ in entries)
    assert all((out / name).read_bytes() == data for name, data in entries)
    assert left_in(out) == [DATASET_FOLDER]
