"""`predict`: a run's (or an ensemble's) masks of NIfTI volumes, a file or a folder, nothing half-written."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from microseg.core.atomic import atomic_files_into, require_writable
from microseg.core.errors import MicrosegError, OptionError
from microseg.data.layout import NIFTI_SUFFIXES, nifti_files, visible_entries
from microseg.data.volumes import SlabReader, read_geometry, volume_writer
from microseg.inference.ensemble import check_members, ensemble_of
from microseg.inference.predictor import SLAB, Predictor, binary, checked_runs, slab_predictor, torch_threads


def predict(
    run: str | Path | Sequence[str | Path],
    source: Path,
    out: Path,
    device: str = "auto",
    resize: str | None = None,
    source_check: bool = True,
) -> list[Path]:
    """Predict one volume (out = a .nii/.nii.gz file) or every visible .nii/.nii.gz in a folder (out = a folder).

    Before the model is loaded, every input's NIfTI header is read and the output place checked.
    A folder is all or nothing: its masks are written into a temporary folder beside `out` and
    move into `out` (other files there stay) only once every volume has been predicted, so a
    volume that turns out truncated stops the command with nothing half-written. `run` may be a list
    of runs: their ensemble (`microseg.inference.ensemble`). The run, or each member, gets evaluate's checks
    and stays locked while it predicts (`checked_runs`).
    """
    source, out = Path(source), Path(out)
    inputs, targets = _prediction_plan(source, out)
    runs = [run] if isinstance(run, str | Path) else list(run)
    if not isinstance(run, str | Path):
        check_members(runs)
    with checked_runs(runs, device, resize, source_check) as members:
        model, preprocess = (
            ensemble_of(runs, members) if len(members) > 1 else (members[0].model, members[0].preprocess)
        )
        predictor = slab_predictor(model, preprocess, members[0].amp)
        created = [p for p in (out, *out.parents) if not p.exists()]
        try:
            with contextlib.nullcontext(out.parent) if not source.is_dir() else atomic_files_into(out) as folder:
                for path, target in tqdm(
                    list(zip(inputs, targets, strict=True)), desc="predict", leave=False, disable=None
                ):
                    _predict_file(predictor, path, folder / target.name)
        except BaseException:
            for folder in created:  # folders made on the way to a failed output, deepest first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise
    return targets


def _predict_file(predict: Predictor, source: Path, target: Path, slab: int = SLAB) -> None:
    """Predict one volume slab by slab into the mask file `target` (its grid, atomically): as
    `_score_case` predicts, a slab per task on torch's threads with torch itself on one (the same
    masks), written in order."""
    with contextlib.ExitStack() as stack:
        image = stack.enter_context(SlabReader(source, "image"))
        geometry = image.geometry
        write = stack.enter_context(volume_writer(target, geometry.shape, np.uint8, geometry.affine, image.header))
        threads = torch.get_num_threads()
        pool = stack.enter_context(ThreadPoolExecutor(threads))
        stack.enter_context(torch_threads(1))
        pending: collections.deque[Future] = collections.deque()
        for start in range(0, geometry.shape[0], slab):
            pending.append(pool.submit(binary, predict, image.read(start, start + slab)))
            if len(pending) > threads:
                write(pending.popleft().result())
        while pending:
            write(pending.popleft().result())
        image.finish()


def _prediction_plan(source: Path, out: Path) -> tuple[list[Path], list[Path]]:
    """(inputs, outputs) of a predict, after checking every input's header and that the outputs can be written."""

    if source.is_dir():
        inputs = nifti_files(source)
        strangers = [p for p in visible_entries(source) if p not in inputs]
        if strangers:  # a sub-folder, a link that leads nowhere, another file: refused, as prepare does
            raise MicrosegError(
                f"{strangers[0]}: unexpected entry in {source}/ (expected only .nii or .nii.gz volumes)"
            )
        if not inputs:
            raise MicrosegError(f"{source} holds no .nii or .nii.gz volume")
        if out.exists() and not out.is_dir():
            raise OptionError(f"`out` {out} is a file; for a folder of volumes give a folder")
        if out.resolve() == source.resolve():
            raise OptionError(f"`out` {out} is the input folder: the masks would replace the scans")
        targets = [out / p.name for p in inputs]
    elif source.exists():
        if not out.name.endswith(NIFTI_SUFFIXES):
            raise OptionError(f"`out` {out}: a NIfTI file name must end in .nii or .nii.gz")
        if out.exists() and out.resolve() == source.resolve():
            raise OptionError(f"`out` {out} is the input volume: the mask would replace the scan")
        inputs, targets = [source], [out]
    else:
        raise MicrosegError(f"input not found: {source}")
    for path in inputs:
        read_geometry(path)
    require_writable(targets[0])
    return inputs, targets
