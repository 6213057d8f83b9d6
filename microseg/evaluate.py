"""Per-patient evaluation and prediction at native resolution.

Each volume is predicted slice by slice at the model's training size (the slice is resized as
the cache resizes it, intensity / 254), the probability map is brought back to the native
slice size on the device (bilinear by default; the reference's nearest as an option),
thresholded at 0.5, and scored per patient against the expert mask in mm with the spacing from
the NIfTI header (`microseg.metrics.score_case`, protocols microsegnet | all-slices | volume).

`evaluate` writes into the run folder:
- `metrics/per_patient.csv` (one row per patient, then mean, std and median rows) and `.md`:
  the model's DSC / HD95 and slice counts, its DSC and error rate inside the hard region, and
  every other annotator's DSC / HD95 against the expert (`<rater>_dsc`, `<rater>_hd95_mm`);
- `metrics/per_slice.csv`: every scored or expert-non-empty slice: DSC, HD95, expert area (mm^2),
  roughness (P^2 / 4 pi A) and gamma_mSa, for the stratified analyses;
- `metrics/evaluation.json`: the data folder, split, protocol and resize mode used;
- `predictions/<file>.nii.gz`, the predicted masks on the source geometry.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from microseg.atomic import write_text
from microseg.checkpoint import load_checkpoint, model_from_checkpoint, run_checkpoint
from microseg.errors import MicrosegError
from microseg.metrics import PROTOCOLS, score_case, summarize
from microseg.report import SUMMARY_ROWS, markdown_table, write_csv

RESIZE_MODES = ("bilinear", "nearest")
HARD_REGION_KERNEL = 4  # the reference's dilation at the main output, when a run does not say
SLICE_HEADER = ["case_id", "z", "dsc", "hd95_mm", "area_mm2", "roughness", "gamma_msa"]


@torch.no_grad()
def predict_volume(model: torch.nn.Module, volume: np.ndarray, device: torch.device, batch_size: int = 16,
                   resize: str = "bilinear") -> np.ndarray:
    """Binary prediction [Z,H,W] for a uint8 volume [Z,H,W] (0..254), slice by slice."""
    from microseg.data.cache import resize_image

    if resize not in RESIZE_MODES:
        raise MicrosegError(f"--resize {resize!r} is not one of {', '.join(RESIZE_MODES)}")
    size = model.config.img_size
    z, h, w = volume.shape
    out = np.empty((z, h, w), dtype=bool)
    model.eval()
    for start in range(0, z, batch_size):
        chunk = np.stack([resize_image(s, size) for s in volume[start:start + batch_size]])
        x = torch.from_numpy(chunk).to(device).float().div_(254.0).clamp_(0, 1)[:, None]
        prob = torch.sigmoid(model(x).logits.float())
        kwargs = {"align_corners": False} if resize == "bilinear" else {}
        prob = F.interpolate(prob, size=(h, w), mode=resize, **kwargs)
        out[start:start + batch_size] = (prob[:, 0] > 0.5).cpu().numpy()
    return out


def load_run_model(run: Path, device: str) -> tuple[torch.nn.Module, dict]:
    """The run's best (else last) network on `device`, and its checkpoint's train config."""
    from microseg.train import resolve_device

    state = load_checkpoint(run_checkpoint(run))
    return model_from_checkpoint(state, resolve_device(device)), state.get("train_config", {})


def _other_annotations(case) -> dict[str, np.ndarray]:
    """Non-expert and extra raters' masks of a case, by rater name (those present)."""
    from microseg.data.volumes import read_volume

    paths = ({"non_expert": case.non_expert} if case.non_expert else {}) | case.raters
    return {name: read_volume(path, "mask").array.astype(bool) for name, path in paths.items()}


def evaluate(run: Path, data: Path, split: str = "test", protocol: str = "microsegnet", resize: str = "bilinear",
             device: str = "auto", batch_size: int = 16) -> Path:
    """Predict and score every case of `split`; returns the per-patient CSV path.

    Besides the model, every other annotation found (non-expert, clinician, master and medical
    student) is scored against the expert with the same protocol (the inter-rater baseline), and
    the model is scored inside the hard region where those annotations disagree with the expert
    (`microseg.analysis`; the training's main-output dilation kernel scaled to native pixels).
    """
    from microseg.analysis import hard_region_kernel, hard_region_mask, hard_region_score, slice_descriptors
    from microseg.data.layout import find_cases
    from microseg.data.volumes import read_volume, require_same_shape, write_mask

    if protocol not in PROTOCOLS:
        raise MicrosegError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    run = Path(run)
    model, train_config = load_run_model(run, device)
    train_kernel = int(train_config.get("ds_kernel_sizes", [HARD_REGION_KERNEL])[-1])
    cases = find_cases(Path(data), split, require_non_expert=False)
    missing = [c.case_id for c in cases if c.expert is None]
    if missing:
        raise MicrosegError(f"{data}/{split} has no expert mask for case(s) {', '.join(missing)}: cannot score")
    dev = next(model.parameters()).device
    patients, slices = [], []
    for case in tqdm(cases, desc=f"evaluate {split}", leave=False, disable=None):
        image = read_volume(case.image, "image")
        expert_volume = read_volume(case.expert, "mask")
        require_same_shape(expert_volume, image)
        expert = expert_volume.array.astype(bool)
        pred = predict_volume(model, image.array, dev, batch_size, resize)
        write_mask(run / "predictions" / case.image.name, pred, image)
        score = score_case(pred, expert, image.spacing, protocol)
        row = {"case_id": case.case_id, "dsc": score.dsc, "hd95_mm": score.hd95_mm,
               "n_slices": score.n_slices, "n_one_sided": score.n_one_sided}
        others = _other_annotations(case)
        hard = {"dsc": math.nan, "error_rate": math.nan}
        if others:
            kernel = hard_region_kernel(train_kernel, model.config.img_size, expert.shape[1])
            hard = hard_region_score(pred, expert, hard_region_mask(expert, list(others.values()), kernel))
        row |= {"hard_dsc": hard["dsc"], "hard_error_rate": hard["error_rate"]}
        for name, mask in others.items():
            if mask.shape != expert.shape:
                raise MicrosegError(f"{name} mask of case {case.case_id}: shape {mask.shape} does not match {expert.shape}")
            rater = score_case(mask, expert, image.spacing, protocol)
            row |= {f"{name}_dsc": rater.dsc, f"{name}_hd95_mm": rater.hd95_mm}
        patients.append(row)
        scored = {s.z: s for s in score.per_slice}
        described = {d["z"]: d for d in slice_descriptors(expert, image.spacing[1:])}
        for z in sorted(set(scored) | set(described)):
            s, d = scored.get(z), described.get(z, {})
            slices.append([case.case_id, z, s.dsc if s else math.nan, s.hd95_mm if s else math.nan,
                           d.get("area_mm2", math.nan), d.get("roughness", math.nan), d.get("gamma_msa", math.nan)])
    header = list(dict.fromkeys(key for row in patients for key in row))
    rows = [[row.get(key, math.nan) for key in header] for row in patients]
    stats = {key: summarize([row.get(key, math.nan) for row in patients]) for key in header[1:]}
    rows += [[name] + [stats[key][name] for key in header[1:]] for name in SUMMARY_ROWS]
    metrics = run / "metrics"
    write_csv(metrics / "per_patient.csv", header, rows)
    write_csv(metrics / "per_slice.csv", SLICE_HEADER, slices)
    write_text(metrics / "per_patient.md", f"# {run.name}: {split}, protocol {protocol}\n\n{markdown_table(header, rows)}\n")
    write_text(metrics / "evaluation.json", json.dumps(
        {"data": str(Path(data).resolve()), "split": split, "protocol": protocol, "resize": resize}, indent=1))
    return metrics / "per_patient.csv"


def predict(run: Path, source: Path, out: Path, device: str = "auto", resize: str = "bilinear") -> list[Path]:
    """Predict one volume (out = a file) or every .nii/.nii.gz in a folder (out = a folder)."""
    from microseg.data.volumes import read_volume, write_mask

    model, _ = load_run_model(Path(run), device)
    dev = next(model.parameters()).device
    source, out = Path(source), Path(out)
    if source.is_dir():
        inputs = sorted(p for p in source.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not inputs:
            raise MicrosegError(f"{source} holds no .nii or .nii.gz volume")
        targets = [out / p.name for p in inputs]
    elif source.exists():
        inputs, targets = [source], [out]
    else:
        raise MicrosegError(f"input not found: {source}")
    for path, target in tqdm(list(zip(inputs, targets)), desc="predict", leave=False, disable=None):
        volume = read_volume(path, "image")
        write_mask(target, predict_volume(model, volume.array, dev, resize=resize), volume)
    return targets
