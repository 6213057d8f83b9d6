"""Per-patient evaluation and prediction at native resolution, with the run's own preprocessing.

Each volume is predicted slice by slice as the run was trained (its checkpoint's `Preprocess`):
the slice is resized as the cache resizes it, intensity / intensity_max; the probability map is
brought back to the native slice size on the device (the run's `prediction_resize`, bilinear by
default, or the reference's nearest when asked), thresholded at 0.5, and scored per patient
against the expert mask in mm with the spacing from the NIfTI header
(`microseg.metrics.score_case`, protocols microsegnet | all-slices | volume).

`evaluate` writes into the run folder (`microseg.run.RunFolder`):
- `metrics/per_patient.csv` (one row per patient, then mean, std and median rows) and `.md`:
  the model's DSC / HD95 and slice counts, the expert volume (`volume_ml`) and its smoothness
  (`gamma_msa`, `microseg.analysis.patient_descriptors`), its DSC and error rate inside the hard
  region, and every other annotator's DSC / HD95 against the expert (`<rater>_dsc`, `<rater>_hd95_mm`);
- `metrics/per_slice.csv`: every scored or expert-non-empty slice: DSC, HD95, expert area (mm^2),
  roughness (P^2 / 4 pi A) and gamma_mSa, for the stratified analyses;
- `metrics/evaluation.json`: the data folder, split, protocol and resize mode used, the
  checkpoint file (best.pt, else last.pt) and its epoch, the cases scored;
- `predictions/<file>.nii.gz`, the predicted masks on the source geometry, built in a temporary
  folder that replaces `predictions/` whole at the end (no file of an earlier evaluation stays).
An expert volume empty on every slice is legitimate but suspicious: one warning line names the
case and evaluation goes on (under the microsegnet protocol the patient's DSC and HD95 are NaN).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from microseg.atomic import atomic_folder, make_folder, write_text
from microseg.checkpoint import Checkpoint, load_run_model
from microseg.errors import MicrosegError, OptionError, warn
from microseg.metrics import check_protocol, score_case, summarize
from microseg.preprocess import Preprocess, resize_image, resize_prediction, scale_intensity
from microseg.run import RunFolder
from microseg.tables import SUMMARY_ROWS, markdown_table, write_csv

SLICE_HEADER = ["case_id", "z", "dsc", "hd95_mm", "area_mm2", "roughness", "gamma_msa"]


@torch.no_grad()
def predict_volume(model: torch.nn.Module, volume: np.ndarray, device: torch.device, preprocess: Preprocess,
                   batch_size: int = 16) -> np.ndarray:
    """Binary prediction [Z,H,W] for a uint8 volume [Z,H,W] (0..intensity_max), slice by slice."""
    size, resize = preprocess.size, preprocess.prediction_resize
    z, h, w = volume.shape
    out = np.empty((z, h, w), dtype=bool)
    model.eval()
    for start in range(0, z, batch_size):
        chunk = np.stack([resize_image(s, size) for s in volume[start:start + batch_size]])
        x = scale_intensity(torch.from_numpy(chunk).to(device), preprocess.intensity_max)[:, None]
        prob = resize_prediction(torch.sigmoid(model(x).logits.float()), (h, w), resize)
        out[start:start + batch_size] = (prob[:, 0] > 0.5).cpu().numpy()
    return out


def _other_annotations(case, image) -> dict[str, np.ndarray]:
    """Non-expert and extra raters' masks of a case, by rater name (those present), each on the image's grid."""
    from microseg.data.volumes import read_mask_for

    paths = ({"non_expert": case.non_expert} if case.non_expert else {}) | case.raters
    return {name: read_mask_for(image, path).array.astype(bool) for name, path in paths.items()}


def evaluate(run: Path, data: Path, split: str = "test", protocol: str = "microsegnet", resize: str | None = None,
             device: str = "auto", batch_size: int = 16) -> Path:
    """Predict and score every case of `split` (train or test); returns the per-patient CSV path.

    Besides the model, every other annotation found (non-expert, clinician, master and medical
    student) is scored against the expert with the same protocol (the inter-rater baseline), and
    the model is scored inside the hard region where those annotations disagree with the expert
    (`microseg.analysis`; the training's main-output dilation kernel scaled to native pixels).
    `resize` (bilinear, nearest) overrides the run's prediction resize. Prints the checkpoint
    used first and the mean DSC and HD95 at the end.
    """
    from microseg.check import SPLITS
    from microseg.data.layout import find_cases

    if split not in SPLITS:
        raise OptionError(f"`split` {split!r} is not one of {', '.join(SPLITS)}")
    check_protocol(protocol)
    folder = RunFolder(run)
    loaded = load_run_model(folder.path, device, resize)
    model, preprocess, checkpoint, checkpoint_file = loaded.model, loaded.preprocess, loaded.checkpoint, loaded.path
    cases = find_cases(Path(data), split, require_non_expert=False)
    missing = [c.case_id for c in cases if c.expert is None]
    if missing:
        raise MicrosegError(f"{data}/{split} has no expert mask for case(s) {', '.join(missing)}: cannot score")
    print(f"evaluate {folder.path} with {checkpoint_file.name} ({_describe(checkpoint, checkpoint_file, folder)}) on "
          f"{data}/{split}, protocol {protocol}; overwrites {folder.metrics}/ and {folder.predictions}/", flush=True)
    make_folder(folder.metrics)  # a metrics/ that cannot be written fails before any prediction
    patients, slices = [], []
    with atomic_folder(folder.predictions) as predictions:  # replaces predictions/ once the metrics are written
        for case in tqdm(cases, desc=f"evaluate {split}", leave=False, disable=None):
            row, rows = _score_case(case, model, preprocess, protocol, predictions, batch_size)
            patients.append(row)
            slices += rows
        _write_metrics(folder, patients, slices, title=f"{folder.path.name}: {split}, protocol {protocol}")
        record = {"data": str(Path(data).resolve()), "split": split, "protocol": protocol,
                  "resize": preprocess.prediction_resize, "checkpoint": checkpoint_file.name,
                  "checkpoint_epoch": checkpoint.epoch, "cases": [c.case_id for c in cases]}
        write_text(folder.evaluation, json.dumps(record, indent=1))
    print(mean_line(patients, protocol))
    return folder.per_patient


def _describe(checkpoint: Checkpoint, path: Path, folder: RunFolder) -> str:
    """'epoch 5, best validation DSC 0.8123' (best.pt), 'epoch 6' (last.pt; with its step if saved mid-epoch)."""
    if path == folder.best:
        return f"epoch {checkpoint.epoch}, best validation DSC {checkpoint.best_dsc:.4f}"
    return f"epoch {checkpoint.epoch}" + (f", step {checkpoint.step}" if checkpoint.step else "")


def mean_line(patients: list[dict], protocol: str) -> str:
    """'mean over 3 of 4 patients: DSC 0.9012, HD95 2.345 mm (NaN: 02)' from per-patient rows."""
    dsc, hd = (summarize([row[key] for row in patients]) for key in ("dsc", "hd95_mm"))
    nan = [row["case_id"] for row in patients if math.isnan(row["dsc"])]
    note = f" (NaN under protocol {protocol}, left out: {', '.join(nan)})" if nan else ""
    if not dsc["n"]:
        return f"no patient could be scored{note}"
    return (f"mean over {dsc['n']} of {len(patients)} patients: DSC {dsc['mean']:.4f}, "
            f"HD95 {hd['mean']:.3f} mm{note}")


def _score_case(case, model, preprocess: Preprocess, protocol: str, predictions: Path,
                batch_size: int) -> tuple[dict, list[list]]:
    """Predict one case, write its mask, score it, its other annotators and its hard region; describe its slices."""
    from microseg.analysis import hard_region_kernel, hard_region_mask, hard_region_score, patient_descriptors
    from microseg.data.volumes import read_volume, require_same_geometry, write_mask

    image = read_volume(case.image, "image")
    expert_volume = read_volume(case.expert, "mask")  # read_mask_for, with a warning that says what follows
    require_same_geometry(expert_volume.geometry, image.geometry)
    expert = expert_volume.array.astype(bool)
    if not expert.any():
        warn(f"case {case.case_id}: expert mask {case.expert} is empty on every slice"
             + ("; its DSC and HD95 are NaN under protocol microsegnet" if protocol == "microsegnet" else ""))
    pred = predict_volume(model, image.array, next(model.parameters()).device, preprocess, batch_size)
    write_mask(predictions / case.image.name, pred, image)
    score = score_case(pred, expert, image.spacing, protocol)
    row = {"case_id": case.case_id, "dsc": score.dsc, "hd95_mm": score.hd95_mm,
           "n_slices": score.n_slices, "n_one_sided": score.n_one_sided}
    row |= patient_descriptors(expert, image.spacing, preprocess.size)
    others = _other_annotations(case, image)
    hard = {"dsc": math.nan, "error_rate": math.nan}
    if others:
        kernel = hard_region_kernel(preprocess.main_kernel, preprocess.size, expert.shape[1])
        hard = hard_region_score(pred, expert, hard_region_mask(expert, list(others.values()), kernel))
    row |= {"hard_dsc": hard["dsc"], "hard_error_rate": hard["error_rate"]}
    for name, mask in others.items():
        rater = score_case(mask, expert, image.spacing, protocol)
        row |= {f"{name}_dsc": rater.dsc, f"{name}_hd95_mm": rater.hd95_mm}
    return row, _slice_rows(case.case_id, score, expert, image.spacing)


def _slice_rows(case_id: str, score, expert: np.ndarray, spacing: tuple[float, float, float]) -> list[list]:
    """per_slice.csv rows of one case: every scored or expert-non-empty slice, with its descriptors."""
    from microseg.analysis import slice_descriptors

    scored = {s.z: s for s in score.per_slice}
    described = {d["z"]: d for d in slice_descriptors(expert, spacing[1:])}
    slices = []
    for z in sorted(set(scored) | set(described)):
        s, d = scored.get(z), described.get(z, {})
        slices.append([case_id, z, s.dsc if s else math.nan, s.hd95_mm if s else math.nan,
                       d.get("area_mm2", math.nan), d.get("roughness", math.nan), d.get("gamma_msa", math.nan)])
    return slices


def _write_metrics(folder: RunFolder, patients: list[dict], slices: list[list], title: str) -> None:
    """per_patient.csv / .md (patients, then the summary rows) and per_slice.csv."""
    header = list(dict.fromkeys(key for row in patients for key in row))
    rows = [[row.get(key, math.nan) for key in header] for row in patients]
    stats = {key: summarize([row.get(key, math.nan) for row in patients]) for key in header[1:]}
    rows += [[name] + [stats[key][name] for key in header[1:]] for name in SUMMARY_ROWS]
    write_csv(folder.per_patient, header, rows)
    write_csv(folder.per_slice, SLICE_HEADER, slices)
    write_text(folder.per_patient_md, f"# {title}\n\n{markdown_table(header, rows)}\n")


def predict(run: Path, source: Path, out: Path, device: str = "auto", resize: str | None = None) -> list[Path]:
    """Predict one volume (out = a .nii/.nii.gz file) or every visible .nii/.nii.gz in a folder (out = a folder).

    Before the model is loaded, every input's NIfTI header is read and the output place checked.
    A folder is all or nothing: its masks are written into a temporary folder beside `out` and
    move into `out` (other files there stay) only once every volume has been predicted, so a
    volume that turns out truncated stops the command with nothing half-written.
    """
    from microseg.atomic import atomic_files_into
    from microseg.data.volumes import read_volume, write_mask

    source, out = Path(source), Path(out)
    inputs, targets = _prediction_plan(source, out)
    loaded = load_run_model(run, device, resize)
    model, preprocess = loaded.model, loaded.preprocess
    dev = next(model.parameters()).device
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        with contextlib.nullcontext(out.parent) if not source.is_dir() else atomic_files_into(out) as folder:
            for path, target in tqdm(list(zip(inputs, targets)), desc="predict", leave=False, disable=None):
                volume = read_volume(path, "image")
                write_mask(folder / target.name, predict_volume(model, volume.array, dev, preprocess), volume)
    except BaseException:
        for folder in created:  # folders made on the way to a failed output, deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return targets


def _prediction_plan(source: Path, out: Path) -> tuple[list[Path], list[Path]]:
    """(inputs, outputs) of a predict, after checking every input's header and that the outputs can be written."""
    from microseg.atomic import require_writable
    from microseg.data.layout import NIFTI_SUFFIXES, nifti_files
    from microseg.data.volumes import read_geometry

    if source.is_dir():
        inputs = nifti_files(source)
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
