"""`microseg download dataset` against a Zenodo look-alike on 127.0.0.1 (no network).

The server answers the record's metadata and serves the archive with HTTP Range support; it can
cut a transfer midway, ignore Range, or publish a wrong md5. Checksums are computed here with
hashlib, the expected layout from the phantom the archive was made of.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from microseg.cli import main
from microseg.data.layout import DATASET_FOLDER, find_cases
from microseg.data.phantom import simulate_dataset
from microseg.download import RECORD_ID

ARCHIVE = f"{DATASET_FOLDER}.zip"


class Zenodo(BaseHTTPRequestHandler):
    """GET /api/records/<id> (JSON) and GET /files/<name> (bytes, Range-aware), as the server's settings say."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        s = self.server
        s.requests.append((self.path, self.headers.get("Range")))
        if self.path == f"/api/records/{RECORD_ID}":
            files = [{"key": name, "size": len(data), "checksum": f"md5:{s.md5.get(name, hashlib.md5(data).hexdigest())}",
                      "links": {"self": f"http://127.0.0.1:{s.server_port}/files/{name}"}} for name, data in s.files.items()]
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
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, bytes]:
    """A small phantom in the real layout and its zip, with the dataset folder at the top, as published."""
    root = simulate_dataset(tmp_path_factory.mktemp("src") / DATASET_FOLDER, n_train=2, n_test=1, n_slices=4,
                            size=(32, 48), seed=5)
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
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    return files(a) == files(b)


def test_download_verifies_and_unpacks_the_real_layout(tmp_path, server, dataset, capsys, monkeypatch):
    root, archive = dataset
    server.files[ARCHIVE] = archive
    monkeypatch.setenv("MICROSEG_ZENODO_API", api(server))  # the env var serves as well as --api
    code = main(["download", "dataset", "--out", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"md5 {hashlib.md5(archive).hexdigest()}" in out and "dataset ready" in out
    target = tmp_path / "data" / DATASET_FOLDER
    assert same_tree(target, root)
    assert [c.case_id for c in find_cases(target, "train")] == ["01", "02"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [DATASET_FOLDER]  # no zip, no temporaries
    code = main(["download", "dataset", "--out", str(tmp_path / "data"), "--api", "http://127.0.0.1:9/api"])
    assert code == 0 and "already present" in capsys.readouterr().out  # no second transfer, no network


@pytest.mark.parametrize("honour_range", [True, False])
def test_interrupted_transfer_resumes(tmp_path, server, dataset, capsys, honour_range):
    root, archive = dataset
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
def test_bad_checksum_is_refused_and_nothing_is_left(tmp_path, server, dataset, capsys, corruption):
    _, archive = dataset
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
