"""Per-patient evaluation at native resolution, with the run's own preprocessing.

Volumes stream: each is read, predicted, written and scored in slabs of `SLAB` slices (every
file decompressed once, `microseg.data.volumes.SlabReader`; masks scored, described and dilated
per slab as uint8, `microseg.metrics.CaseScorer`, `microseg.evaluation.analysis.ExpertDescriptors`), so
memory does not grow with the number of slices. Each slab is predicted as the run was trained
(`microseg.inference.predictor`: its checkpoint's `Preprocess`, the probability map back at the
native slice size, thresholded at 0.5) and scored per patient
against the expert mask in mm with the spacing from the NIfTI header
(`microseg.metrics.score_case`, protocols microsegnet | all-slices | volume).

`evaluate` writes into the run folder (`microseg.runs.folder.RunFolder`):
- `metrics/per_patient.csv` (one row per patient, then mean, std and median rows) and `.md`:
  the model's DSC / HD95 and slice counts, the expert volume (`volume_ml`) and its smoothness
  (`gamma_msa`, `microseg.evaluation.analysis.patient_descriptors`), its DSC and error rate inside the hard
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
import dataclasses
import functools
import json
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from microseg.core.atomic import atomic_folder, make_folder, write_text
from microseg.core.errors import MicrosegError, OptionError, warn
from microseg.core.parallel import resolve_jobs, run_jobs, visible_gpus
from microseg.core.preprocess import Preprocess
from microseg.core.tables import SUMMARY_ROWS, markdown_table, write_csv
from microseg.data.layout import Case, find_cases
from microseg.data.volumes import SlabReader, require_same_geometry, volume_writer
from microseg.evaluation.analysis import (
    ExpertDescriptors,
    hard_region_counts,
    hard_region_from_counts,
    hard_region_kernel,
    hard_region_mask,
)
from microseg.inference.ensemble import check_members, ensemble_of
from microseg.inference.predictor import (
    SLAB,
    Predictor,
    binary,
    checked_runs,
    run_predictor,
    slab_predictor,
    torch_threads,
)
from microseg.metrics import CaseScore, CaseScorer, check_protocol, summarize
from microseg.runs.checkpoint import Checkpoint, RunModel
from microseg.runs.folder import RunFolder, file_sha256

SLICE_HEADER = ["case_id", "z", "dsc", "hd95_mm", "area_mm2", "roughness", "gamma_msa"]


def evaluate(
    run: Path,
    data: Path,
    split: str = "test",
    protocol: str = "microsegnet",
    resize: str | None = None,
    device: str = "auto",
    batch_size: int = SLAB,
    jobs: int | None = 1,
    source_check: bool = True,
    cases: Sequence[str] | None = None,
    heldout: bool = False,
    ensemble: Sequence[Path] | None = None,
) -> Path:
    """Predict and score every case of `split` (train or test); returns the per-patient CSV path.

    Besides the model, every other annotation found (non-expert, clinician, master and medical
    student) is scored against the expert with the same protocol (the inter-rater baseline), and
    the model is scored inside the hard region where those annotations disagree with the expert
    (`microseg.evaluation.analysis`; the training's main-output dilation kernel scaled to native pixels).
    `resize` (bilinear, nearest) overrides the run's prediction resize. Prints the checkpoint
    used first and the mean DSC and HD95 at the end. `jobs` patients are evaluated at once, one
    per process (`microseg.core.parallel`; None: the default, `resolve_jobs`), each with the model on `device`. With
    `source_check`, a run whose training cache is on disk is refused when the cache's source
    files changed since it was prepared.
    `cases` restricts the split to those patient ids (an experiment's held-out fold); `heldout` writes
    the run's held-out evaluation (`RunFolder.held_out`: `heldout/`) instead of `metrics/`. With
    `ensemble` (run folders), their averaged probability maps are the prediction
    (`microseg.inference.ensemble`) and `run` is the folder the evaluation is written into (no run,
    so not locked; a trained run's folder is refused); every member gets the run's checks
    (`checked_runs`) and `evaluation.json` records each member's checkpoint.
    """
    from microseg.data.check import SPLITS

    folder = RunFolder(run, heldout)
    if ensemble and folder.config.exists():
        raise MicrosegError(f"--out {run} is a trained run: give the ensemble's evaluation its own folder")
    if split not in SPLITS:
        raise OptionError(f"`split` {split!r} is not one of {', '.join(SPLITS)}")
    check_protocol(protocol)
    jobs = resolve_jobs(jobs, "evaluate", device)
    if ensemble:
        check_members(ensemble)
    with checked_runs(ensemble or [folder.path], device, resize, source_check) as members:
        return _evaluate_locked(folder, data, split, protocol, device, resize, batch_size, jobs, members, cases)


def _scored(member: RunModel) -> dict[str, object]:
    """What evaluation.json records of a checkpoint scored: its file, epoch, step and sha256 (`compare`
    refuses metrics whose checkpoint has changed since)."""
    checkpoint = member.checkpoint
    return {
        "checkpoint": member.path.name,
        "checkpoint_epoch": checkpoint.epoch,
        "checkpoint_step": checkpoint.step,
        "checkpoint_sha256": file_sha256(member.path),
    }


def _evaluate_locked(
    folder: RunFolder,
    data: Path,
    split: str,
    protocol: str,
    device: str,
    resize: str | None,
    batch_size: int,
    jobs: int,
    members: list[RunModel],
    cases: Sequence[str] | None = None,
) -> Path:
    """`evaluate` while it holds the locks of the run or members it reads (`checked_runs`): the
    checkpoints it reads and the metrics it writes belong together (no `train` writes them meanwhile)."""
    model, preprocess, source, used, record = _model_of(folder, members)
    amp = members[0].amp
    cases = _select(find_cases(Path(data), split, require_non_expert=False), cases, f"{data}/{split}")
    missing = [c.case_id for c in cases if c.expert is None]
    if missing:
        raise MicrosegError(f"{data}/{split} has no expert mask for case(s) {', '.join(missing)}: cannot score")
    print(
        f"evaluate {folder.path} with {used} on {data}/{split}, protocol {protocol}; overwrites "
        f"{folder.metrics}/ and {folder.predictions}/",
        flush=True,
    )
    make_folder(folder.metrics)  # a metrics/ that cannot be written fails before any prediction
    _PREDICTORS[source, device, resize] = slab_predictor(model, preprocess, amp), preprocess
    with atomic_folder(folder.predictions) as predictions:  # replaces predictions/ once the metrics are written
        jobs_ = [_CaseJob(source, device, resize, case, protocol, predictions, batch_size) for case in cases]
        gpus = visible_gpus(device) if jobs > 1 and device in ("auto", "cuda") else []  # worker k: GPU k mod n
        scored = run_jobs(_evaluate_case, jobs_, jobs, desc=f"evaluate {split}", gpus=gpus)
        for message in (message for _, _, messages in scored for message in messages):
            warn(message)  # here, in case order: a worker's stderr is not this process's
        patients = [row for row, _, _ in scored]
        slices = [row for _, rows, _ in scored for row in rows]
        _write_metrics(folder, patients, slices, title=f"{folder.path.name}: {split}, protocol {protocol}")
        record = {
            "data": str(Path(data).resolve()),
            "split": split,
            "protocol": protocol,
            "resize": preprocess.prediction_resize,
            **record,
            "cases": [c.case_id for c in cases],
        }
        write_text(folder.evaluation, json.dumps(record, indent=1))
    print(mean_line(patients, protocol))
    return folder.per_patient


def _model_of(
    folder: RunFolder, members: list[RunModel]
) -> tuple[torch.nn.Module, Preprocess, Path | tuple[Path, ...], str, dict[str, object]]:
    """The network evaluate predicts with (the run's, or the ensemble of several members), its
    preprocessing, what a worker loads it from (the run, or the members' runs), how it is
    described, and what evaluation.json records of its checkpoints."""
    if len(members) == 1:
        (member,) = members
        used = f"{member.path.name} ({_describe(member.checkpoint, member.path)})"
        return member.model, member.preprocess, folder.path, used, _scored(member)
    runs = [member.path.parent for member in members]
    model, preprocess = ensemble_of(runs, members)
    used = "the ensemble of " + ", ".join(f"{m.path} ({_describe(m.checkpoint, m.path)})" for m in members)
    record: dict[str, object] = {
        "checkpoint": "ensemble",
        "ensemble": [str(r.resolve()) for r in runs],
        "members": [{"run": str(r.resolve()), **_scored(m)} for r, m in zip(runs, members, strict=True)],
    }
    return model, preprocess, tuple(runs), used, record


def _select(cases: list, wanted: Sequence[str] | None, where: str) -> list:
    """The cases whose ids are `wanted` (all when None); MicrosegError naming an id not found."""
    if wanted is None:
        return cases
    missing = sorted(set(wanted) - {c.case_id for c in cases})
    if missing:
        raise MicrosegError(f"{where} has no case {', '.join(missing)}")
    return [c for c in cases if c.case_id in set(wanted)]


def _describe(checkpoint: Checkpoint, path: Path) -> str:
    """'epoch 5, best validation DSC 0.8123' (best.pt), 'epoch 6' (last.pt; with its step if saved mid-epoch)."""
    if path.name == RunFolder(path.parent).best.name:
        return f"epoch {checkpoint.epoch}, best validation DSC {checkpoint.best_dsc:.4f}"
    return f"epoch {checkpoint.epoch}" + (f", step {checkpoint.step}" if checkpoint.step else "")


def mean_line(patients: list[dict], protocol: str) -> str:
    """'mean over 3 of 4 patients: DSC 0.9012, HD95 2.345 mm (NaN: 02)' from per-patient rows."""
    dsc, hd = (summarize([row[key] for row in patients]) for key in ("dsc", "hd95_mm"))
    nan = [row["case_id"] for row in patients if math.isnan(row["dsc"])]
    note = f" (NaN under protocol {protocol}, left out: {', '.join(nan)})" if nan else ""
    if not dsc["n"]:
        return f"no patient could be scored{note}"
    return f"mean over {dsc['n']} of {len(patients)} patients: DSC {dsc['mean']:.4f}, HD95 {hd['mean']:.3f} mm{note}"


@dataclasses.dataclass(frozen=True)
class _CaseJob:
    """One patient of an evaluation, as handed to a worker process."""

    run: Path | tuple[Path, ...]  # a run folder, or an ensemble's members
    device: str
    resize: str | None
    case: Case
    protocol: str
    predictions: Path
    slab: int


_PREDICTORS: dict[tuple, tuple[Predictor, Preprocess]] = {}
"""Per process: each run's predictor and preprocessing, (run, device, resize) -> loaded once."""


def _evaluate_case(job: _CaseJob) -> tuple[dict, list[list], list[str]]:
    """`_score_case` of one job, with the run's predictor of this process (loaded on first use)."""
    key = (job.run, job.device, job.resize)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = run_predictor(job.run, job.device, job.resize)
    predict, preprocess = _PREDICTORS[key]
    return _score_case(job.case, predict, preprocess, job.protocol, job.predictions, job.slab)


def _score_case(
    case: Case, predict: Predictor, preprocess: Preprocess, protocol: str, predictions: Path, slab: int = SLAB
) -> tuple[dict, list[list], list[str]]:
    """Predict one case, write its mask, score it, its other annotators and its hard region, and
    describe its expert's slices: slab by slab, every file read once, memory independent of Z.
    Returns its per_patient row, its per_slice rows and its warnings (masks empty on every slice).

    The work is pipelined as tasks on as many threads as torch had (the process's share of the
    cores; torch, OpenCV, NumPy, ISA-L and the k-d tree release the GIL), torch itself set to
    one thread meanwhile (`_pipeline`). Each consumer keeps its order (a scorer's slab k - 1 is
    done before its slab k starts), so the results are a sequential run's.
    """
    paths = {"expert": case.expert} | ({"non_expert": case.non_expert} if case.non_expert else {}) | case.raters
    with contextlib.ExitStack() as stack:
        image = stack.enter_context(SlabReader(case.image, "image"))
        masks = {name: stack.enter_context(SlabReader(path, "mask")) for name, path in paths.items()}
        for mask in masks.values():
            require_same_geometry(mask.geometry, image.geometry)
        readers = {"image": image} | masks
        geometry = image.geometry
        scoring = _CaseScoring.of(geometry.shape, geometry.spacing, protocol, preprocess, list(masks))
        write = stack.enter_context(
            volume_writer(predictions / case.image.name, geometry.shape, np.uint8, geometry.affine, image.header)
        )
        pool = stack.enter_context(ThreadPoolExecutor(torch.get_num_threads()))
        stack.enter_context(torch_threads(1))  # one per task: the tasks share the cores, not OpenMP
        _pipeline(readers, geometry.shape[0], slab, pool, predict, functools.partial(scoring.submit, pool, write))
        for reader in readers.values():
            reader.finish()
    warnings = _empty_mask_warnings(case, protocol, masks)
    score = scoring.scores["model"].result()
    return (
        scoring.patient_row(case.case_id, score),
        _slice_rows(case.case_id, score, scoring.described.slices),
        warnings,
    )


def _pipeline(
    readers: dict[str, SlabReader],
    z: int,
    slab: int,
    pool: ThreadPoolExecutor,
    predict: Predictor,
    submit: Callable[[np.ndarray, dict[str, np.ndarray]], list[Future]],
) -> None:
    """Every slab of `z` slices read, predicted and handed to `submit` (with its masks as bool) on `pool`:
    while the model predicts slab k, slab k + 1 is read and slab k - 1 written and scored, one task per
    file and per scorer; slab k's tasks are submitted once slab k - 1's are done. One forward at a time."""

    def read(start: int) -> dict[str, Future]:
        return {name: pool.submit(reader.read, start, start + slab) for name, reader in readers.items()}

    forward = threading.Lock()

    def predict_slab(image: np.ndarray) -> np.ndarray:
        with forward:  # one slab's activations in memory at a time
            return binary(predict, image)

    def score_slab(predicted: Future, slabs: dict[str, np.ndarray], scoring: list[Future]) -> list[Future]:
        """Submit a slab's writing and scoring once its prediction and the previous slab's scoring are done."""
        pred = predicted.result()
        for task in scoring:
            task.result()
        return submit(pred, {name: m.view(bool) for name, m in slabs.items()})  # the files' own 0/1 bytes

    scoring: list[Future] = []
    upcoming, previous = read(0), None
    for start in range(0, z, slab):
        slabs = {name: task.result() for name, task in upcoming.items()}
        if start + slab < z:
            upcoming = read(start + slab)
        predicted = pool.submit(predict_slab, slabs.pop("image"))
        if previous is not None:  # slab k - 1 is scored while slab k is predicted
            scoring = score_slab(*previous, scoring)
        previous = (predicted, slabs)
    for task in score_slab(*previous, scoring) if previous is not None else scoring:
        task.result()


@dataclasses.dataclass
class _CaseScoring:
    """What one case's slabs add up to: the model's and every other annotator's scorer (against the
    expert), the expert's descriptors, and each slab's hard-region counts (from the other annotators)."""

    scores: dict[str, CaseScorer]
    described: ExpertDescriptors
    others: list[str]
    kernel: int
    hard: list[Future] = dataclasses.field(default_factory=list)

    @classmethod
    def of(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        protocol: str,
        preprocess: Preprocess,
        annotators: list[str],
    ) -> _CaseScoring:
        """Scorers for the model and the annotators but the expert; the hard region's kernel at native size."""
        others = [name for name in annotators if name != "expert"]
        scores = {name: CaseScorer(shape, spacing, protocol) for name in ["model", *others]}
        described = ExpertDescriptors(spacing, preprocess.size)
        return cls(scores, described, others, hard_region_kernel(preprocess.main_kernel, preprocess.size, shape[1]))

    def submit(
        self,
        pool: ThreadPoolExecutor,
        write: Callable[[np.ndarray], None],
        pred: np.ndarray,
        masks: dict[str, np.ndarray],
    ) -> list[Future]:
        """One slab's tasks: its prediction written, the expert described, every scorer fed, the hard region counted."""
        expert, scored = masks["expert"], {"model": pred} | {name: masks[name] for name in self.others}
        tasks = [pool.submit(write, pred), pool.submit(self.described.add, expert)]
        tasks += [pool.submit(self.scores[name].add, scored[name], expert) for name in self.scores]
        if self.others:
            others = [masks[name] for name in self.others]
            self.hard.append(pool.submit(_hard_counts, pred, expert, others, self.kernel))
        return tasks

    def patient_row(self, case_id: str, score: CaseScore) -> dict:
        """The case's per_patient row: the model's `score`, the expert's descriptors, the hard region, the raters."""
        row = {
            "case_id": case_id,
            "dsc": score.dsc,
            "hd95_mm": score.hd95_mm,
            "n_slices": score.n_slices,
            "n_one_sided": score.n_one_sided,
        }
        row |= self.described.patient()
        counts = sum((task.result() for task in self.hard), np.zeros(5, np.int64))
        inside = hard_region_from_counts(counts) if self.others else {"dsc": math.nan, "error_rate": math.nan}
        row |= {"hard_dsc": inside["dsc"], "hard_error_rate": inside["error_rate"]}
        for name in self.others:
            rater = self.scores[name].result()
            row |= {f"{name}_dsc": rater.dsc, f"{name}_hd95_mm": rater.hd95_mm}
        return row


def _empty_mask_warnings(case: Case, protocol: str, masks: dict[str, SlabReader]) -> list[str]:
    """One warning per mask empty on every slice (the expert's: its scores are NaN under microsegnet)."""
    return [
        f"case {case.case_id}: expert mask {case.expert} is empty on every slice"
        + ("; its DSC and HD95 are NaN under protocol microsegnet" if protocol == "microsegnet" else "")
        if name == "expert"
        else f"{mask.path}: mask is empty on every slice"
        for name, mask in masks.items()
        if mask.empty
    ]


def _hard_counts(pred: np.ndarray, expert: np.ndarray, others: list[np.ndarray], kernel: int) -> np.ndarray:
    """`hard_region_counts` of one slab, its hard region dilated from the other annotations."""
    return hard_region_counts(pred, expert, hard_region_mask(expert, others, kernel))


def _slice_rows(case_id: str, score: CaseScore, described: list[dict]) -> list[list]:
    """per_slice.csv rows of one case: every scored or expert-non-empty slice, with its descriptors."""
    scored = {s.z: s for s in score.per_slice}
    by_z = {d["z"]: d for d in described}
    slices = []
    for z in sorted(set(scored) | set(by_z)):
        s, d = scored.get(z), by_z.get(z, {})
        slices.append(
            [
                case_id,
                z,
                s.dsc if s else math.nan,
                s.hd95_mm if s else math.nan,
                d.get("area_mm2", math.nan),
                d.get("roughness", math.nan),
                d.get("gamma_msa", math.nan),
            ]
        )
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
