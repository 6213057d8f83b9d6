"""Pretrained weights by name: `download weights` from a pre-filled offline HF cache or a local
npz server, verification, and `--weights R50-ViT-B_16` resolution. No network anywhere.

The fake hub cache has the layout huggingface_hub reads (refs/main -> snapshot -> blob named by
the file's sha256, computed here with hashlib); its file holds a tiny encoder's tensors in timm's
names, with a class token and a class-token row in the position table, as timm's in21k file has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from microseg.cli import main
from microseg.core.errors import MicrosegError
from microseg.models import build_model
from microseg.models.pretrained import SPECS, resolve_weights, weights_dir
from microseg.models.weights import load_weights
from model_helpers import google_npz

NAME = "R50-ViT-B_16"
REPO_DIR = "models--timm--vit_base_r50_s16_224.orig_in21k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def timm_in21k_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny encoder's state dict as timm's in21k checkpoint stores it (cls_token, 1 + 14 x 14 positions)."""
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in build_model("tiny").encoder.state_dict().items()}
    hidden = state["pos_embed"].shape[-1]
    state["pos_embed"] = torch.cat([torch.randn(1, 1, hidden), torch.randn_like(state["pos_embed"])], dim=1)
    state["cls_token"] = torch.randn(1, 1, hidden)
    return state


def fill_hub_cache(hf_home: Path, data: bytes, blob_name: str | None = None) -> Path:
    """huggingface_hub's cache layout for timm/vit_base_r50_s16_224.orig_in21k holding model.safetensors."""
    repo = hf_home / "hub" / REPO_DIR
    blob = repo / "blobs" / (blob_name or hashlib.sha256(data).hexdigest())
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("../..") / "blobs" / blob.name)
    return blob


@pytest.fixture()
def tiny_spec(monkeypatch):
    """The real spec (hub tag, file names) initialising the tiny model instead of the 105 M one."""
    monkeypatch.setitem(SPECS, NAME, dataclasses.replace(SPECS[NAME], model="tiny"))
    return SPECS[NAME]


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """HF_HOME and HF_HUB_OFFLINE=1 as a user sets them (huggingface_hub reads them at import, so its
    constants are set too)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf"


def test_spec_is_timms_in21k_hybrid():
    import timm

    cfg = timm.models.get_pretrained_cfg(SPECS[NAME].hub_tag)
    assert cfg.architecture == "vit_base_r50_s16_224" and cfg.hf_hub_id == "timm/vit_base_r50_s16_224.orig_in21k"
    assert SPECS[NAME].model == NAME and SPECS[NAME].npz_file == "R50+ViT-B_16.npz"


def test_hub_download_from_offline_cache(tmp_path, offline_hub, tiny_spec, capsys):
    data = save(timm_in21k_tensors())
    blob = fill_hub_cache(offline_hub, data)
    assert main(["download", "weights", NAME, "--out", str(tmp_path / "weights")]) == 0
    out = capsys.readouterr().out
    assert f"sha256 ok: {blob.name}" in out and "verified: loaded 68 tensors from safetensors" in out
    written = tmp_path / "weights" / "R50-ViT-B_16.safetensors"
    assert written.read_bytes() == data
    assert sorted(p.name for p in written.parent.iterdir()) == [written.name]  # no temporary left


def test_train_weights_name_finds_the_file(tmp_path, monkeypatch):
    state = timm_in21k_tensors(seed=1)
    (tmp_path / "R50-ViT-B_16.safetensors").write_bytes(save(state))
    monkeypatch.setenv("MICROSEG_WEIGHTS", str(tmp_path))
    model = build_model("tiny")
    report = load_weights(model, resolve_weights(NAME))
    encoder = model.encoder.state_dict()
    assert report.unexpected == ["cls_token"] and not [k for k in report.missing if k.startswith("encoder.")]
    assert torch.equal(encoder["pos_embed"], state["pos_embed"][:, 1:])  # class-token row dropped
    assert torch.equal(encoder["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])


def test_missing_named_weights_say_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROSEG_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(MicrosegError, match=rf"microseg download weights {NAME} --out {tmp_path / 'w'}$"):
        resolve_weights(NAME)
    with pytest.raises(MicrosegError, match="weights file not found: nothing.npz"):
        resolve_weights("nothing.npz")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "R50+ViT-B_16.npz").write_bytes(b"")
    assert resolve_weights(NAME) == tmp_path / "w" / "R50+ViT-B_16.npz"
    assert resolve_weights(tmp_path / "w" / "R50+ViT-B_16.npz", "elsewhere") == tmp_path / "w" / "R50+ViT-B_16.npz"


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_offline_without_cache_is_one_line(tmp_path, offline_hub, tiny_spec, capsys):
    code, err = run_cli(["download", "weights", NAME, "--out", str(tmp_path / "w")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("microseg: error: cannot reach the Hugging Face Hub for timm/vit_base_r50_s16_224")
    assert "HF_HUB_OFFLINE" in err and not (tmp_path / "w").exists()


def test_corrupt_blob_is_refused(tmp_path, offline_hub, tiny_spec, capsys):
    data = save(timm_in21k_tensors())
    fill_hub_cache(offline_hub, data[:-4] + b"\0\0\0\0", blob_name=hashlib.sha256(data).hexdigest())
    code, err = run_cli(["download", "weights", NAME, "--out", str(tmp_path / "w")], capsys)
    assert code == 2 and "does not match the hub's" in err and not list((tmp_path / "w").glob("*"))


def test_incomplete_file_is_refused_and_not_written(tmp_path, offline_hub, tiny_spec, capsys):
    state = timm_in21k_tensors()
    del state["blocks.1.attn.qkv.weight"]
    fill_hub_cache(offline_hub, save(state))
    (tmp_path / "w").mkdir()
    code, err = run_cli(["download", "weights", NAME, "--out", str(tmp_path / "w")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "incomplete R50-ViT-B_16 weights: 1 encoder tensors missing (first: encoder.blocks.1.attn.qkv.weight)" in err
    assert list((tmp_path / "w").iterdir()) == []


@pytest.fixture()
def npz_server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
    httpd.RequestHandlerClass.log_message = lambda *a: None
    # shutdown() waits for the serving loop to look again: every 50 ms, not the default 0.5 s
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_npz_source_by_url(tmp_path, npz_server, monkeypatch, capsys):
    folder, url = npz_server
    arrays = google_npz(folder / "R50+ViT-B_16.npz", grid=14)
    np.savez(folder / "R50+ViT-B_16.npz", **arrays)
    broken = dict(arrays)
    del broken["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"]
    np.savez(folder / "broken.npz", **broken)
    spec = dataclasses.replace(SPECS[NAME], model="tiny", npz_url=f"{url}/R50+ViT-B_16.npz")
    monkeypatch.setitem(SPECS, NAME, spec)
    out = tmp_path / "w"
    assert main(["download", "weights", NAME, "--source", "npz", "--out", str(out)]) == 0
    assert (out / "R50+ViT-B_16.npz").read_bytes() == (folder / "R50+ViT-B_16.npz").read_bytes()
    assert "verified: loaded" in capsys.readouterr().out
    monkeypatch.setitem(SPECS, NAME, dataclasses.replace(spec, npz_url=f"{url}/broken.npz"))
    (out / "R50+ViT-B_16.npz").unlink()
    code, err = run_cli(["download", "weights", NAME, "--source", "npz", "--out", str(out)], capsys)
    assert code == 2 and "encoder.blocks.1.mlp.fc1.weight" in err and list(out.iterdir()) == []


def test_unknown_name_is_refused(capsys):
    code, err = run_cli(["download", "weights", "R50-ViT-Q_99"], capsys)
    assert code == 2 and err.strip() == f"microseg: error: unknown weights 'R50-ViT-Q_99'; known: {NAME}"
    assert weights_dir(None) == Path(os.environ.get("MICROSEG_WEIGHTS") or "weights")
