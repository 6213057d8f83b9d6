"""Torch files (checkpoints, weights) read without running code, and checked before use.

- No code runs: every file is read with ``torch.load(weights_only=True)``, which unpickles only
  tensors, plain containers, numbers and strings; a file that needs anything else (an object's
  ``__reduce__``, a builtin such as ``exec``, a numpy object array) is refused with one line naming
  the Python object it asks for. What microseg saves is made of those types only (`plain`).
- Nothing corrupt is used: a torch file is a zip archive whose members each carry a CRC-32 of
  their bytes, which torch itself never checks; `read_torch_file` verifies every member's CRC
  first (``zipfile.ZipFile.testzip``), so one changed byte in the stored data or its records is
  refused instead of loaded. `require_finite` refuses NaN or infinite values in a weights dict.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
import zipfile
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from microseg.core.errors import MicrosegError


def plain(value: Any) -> Any:
    """`value` made of what weights_only loading accepts: dataclasses and Paths become dicts and
    strings, numpy scalars Python numbers, numpy arrays tensors (containers converted throughout)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def _verify_zip(path: Path, what: str) -> None:
    """Every member of the zip at `path` reads back with its recorded CRC-32 and names."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # zipfile raises BadZipFile, zlib, struct, value and EOF errors on damage
        raise MicrosegError(
            f"{what} {path} is corrupt: its zip structure does not read ({type(err).__name__}); it is not used"
        ) from None
    if bad is not None:
        raise MicrosegError(
            f"{what} {path} is corrupt: the checksum (CRC-32) of its record '{bad}' does not "
            "match its content; it is not used"
        )


def read_torch_file(path: Path, what: str, formats: str, require_zip: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, after the zip's CRCs are verified.

    `what` names the file in errors ("checkpoint", "weights file"), `formats` says what it should
    have been. `require_zip` refuses torch's legacy (pre-zip, checksum-free) format, which microseg
    never writes. torch's own message advises weights_only=False, which would run the file's code:
    it is never repeated.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise MicrosegError(f"cannot read {what} {path}: it is empty")
    with open(path, "rb") as handle:
        head = handle.read(2)
    is_zip = head == b"PK"
    if is_zip:
        _verify_zip(path, what)
    elif require_zip:
        raise MicrosegError(
            f"cannot read {what} {path}: it is not a torch zip archive ({formats}), so its content cannot be verified"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, weights-only and storage errors come in many types
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and (is_zip or head[:1] == b"\x80"):  # not a text file
            needs = f" ({refused.group(1)})" if refused else ""
            raise MicrosegError(
                f"cannot read {what} {path}: it holds Python objects besides tensors{needs}, "
                "which are never loaded: reading them could run code"
            ) from None
        raise MicrosegError(
            f"cannot read {what} {path}: it is not a {what} ({formats}: {type(err).__name__})"
        ) from None


def require_finite(state: dict[str, Any], what: str, path: Path) -> None:
    """Refuse a weights dict holding NaN or infinite values, naming the first such tensor."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise MicrosegError(f"{what} {path}: '{name}' contains NaN or infinite values; it is not used")
