"""The `microseg` command: one verb per stage of the pipeline.

Errors a user can cause (MicrosegError) and errors of the machine (OSError: a folder that cannot
be written, a full disk) end with one line on stderr naming the file and exit status 2; Ctrl-C
ends with status 130 (SIGTERM or SIGHUP, where a command handles them: 128 + the signal's
number). Nothing else is caught: a traceback means a bug.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

from microseg import __version__
from microseg.core.errors import MicrosegError, OptionError, os_error_line

EXAMPLES = """examples:
  microseg demo                                              # everything on phantom data, CPU
  microseg simulate --out data/phantom --train 10 --test 4
  microseg prepare --data data/phantom --out data/phantom.h5 --size 224
  microseg train --cache data/phantom.h5 --loss adaptive_focal --model small --run runs/af
  microseg evaluate --run runs/af --data data/phantom
  microseg predict --run runs/af --input scan.nii.gz --out scan_mask.nii.gz
  microseg compare runs/af runs/ag_bce --out reports/losses
  microseg compare exp/ --out reports/exp                     # an experiment: losses x seeds x folds

'microseg VERB --help' describes each verb's options."""


SIZED_JOBS = "one per core and patient while each process's share of the work outweighs a worker's start, else 1"


class Parser(argparse.ArgumentParser):
    """argparse with the project's error form: one line `microseg: error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"microseg: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="microseg",
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"microseg {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in VERBS:
        add(verbs)
    return parser


def _add_simulate(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("simulate", help="write a phantom micro-US dataset in the real layout")
    p.add_argument("--out", required=True, help="dataset folder to write (empty, new, or an earlier phantom)")
    p.add_argument("--train", type=int, default=10, metavar="N", help="training patients (default 10, at least 1)")
    p.add_argument("--test", type=int, default=4, metavar="M", help="test patients (default 4; 0 for none)")
    p.add_argument("--slices", type=int, default=24, metavar="S", help="slices per sweep (default 24, at least 3)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[962, 1372],
        metavar=("H", "W"),
        help="slice size in pixels, at least 32 32 (default 962 1372, the real size; the demo uses 240 343)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--preview", action="store_true", help="also write preview.png: slices with both contours")
    _add_jobs_option(p, "1 (its threads image slices on every core)")

    def run(args: argparse.Namespace) -> int:
        from microseg.data.phantom import simulate_dataset
        from microseg.reporting.figures import plot_case_preview

        out = simulate_dataset(args.out, args.train, args.test, args.slices, tuple(args.size), args.seed, args.jobs)
        if args.preview:
            plot_case_preview(out)
        print(f"wrote phantom dataset: {out}")
        return 0

    p.set_defaults(func=run)


def _add_prepare(verbs: argparse._SubParsersAction) -> None:
    from microseg.core.preprocess import SIZE_MULTIPLE

    p = verbs.add_parser("prepare", help="build the HDF5 slice cache of a dataset folder")
    p.add_argument("--data", required=True, help="dataset folder holding train/ (and test/)")
    p.add_argument("--out", required=True, help="cache file to write, e.g. cache.h5")
    p.add_argument(
        "--size",
        type=int,
        default=224,
        help=f"slice size in the cache, a multiple of {SIZE_MULTIPLE} (the models' patch stride; default 224)",
    )
    _add_jobs_option(p, SIZED_JOBS)

    def run(args: argparse.Namespace) -> int:
        from microseg.data.prepare import prepare_cache

        prepare_cache(args.data, args.out, args.size, args.jobs)
        return 0

    p.set_defaults(func=run)


def _add_train(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "train",
        help="train a model on a slice cache (--recipe: a paper's settings)",
        description="Train a model on a slice cache. Defaults are the `default` recipe "
        "(MicroSegNet's optimisation, the adaptive focal loss, augmentation); --recipe "
        "microsegnet or adaptive-focal sets a paper's settings (the --config file and "
        "the options win over it). Without a paper recipe, the default model "
        "R50-ViT-B_16 trains from scratch unless --weights R50-ViT-B_16 gives it the "
        "paper's ImageNet-21k encoder (fetch it once with "
        "`microseg download weights R50-ViT-B_16`). --cache and --run are required, "
        "on the command line or in the --config file.",
    )
    p.add_argument("--config", help="YAML file holding any of the options below (the command line wins)")
    _add_config_options(p)
    p.add_argument("--resume", action="store_true", help="continue the run from its last.pt")
    p.add_argument("--force", action="store_true", help="overwrite an existing run")

    def run(args: argparse.Namespace) -> int:
        from microseg.runs.checkpoint import train_config
        from microseg.training.trainer import train

        options = {k: v for k, v in vars(args).items() if k not in ("verb", "func", "config", "resume", "force")}
        config = train_config(args.config, options, args.resume)
        run_dir = train(config, resume=args.resume, force=args.force)
        print(f"run written: {run_dir}")
        return 0

    p.set_defaults(func=run)


def _add_config_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, skip: tuple[str, ...] = ()) -> None:
    """One option per TrainConfig field (but `skip`): its help and default come from the field (None = not given)."""
    import dataclasses

    from microseg.runs.config import TrainConfig

    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        extra = dict(field.metadata)
        flag = extra.pop("flag", "--" + field.name.replace("_", "-"))
        default = getattr(defaults, field.name)
        text = extra.pop("help")
        if default not in ("", None, []) and not isinstance(default, bool):
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            text += f" (default {shown})".replace("%", "%%")
        if isinstance(default, bool):
            extra |= {"action": argparse.BooleanOptionalAction}  # --x / --no-x: either can undo a recipe's
        elif isinstance(default, list):
            extra = {"nargs": "+", "type": type(default[0]) if default else str, **extra}
        elif default is not None and "nargs" not in extra:
            extra["type"] = type(default)
        p.add_argument(flag, dest=field.name, help=text, **extra)


def _add_jobs_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help=f"patients processed at once, one per process (default: $MICROSEG_JOBS, else {default}; 1: in "
        "this process)",
    )


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-source-check",
        dest="source_check",
        action="store_false",
        help="use the run(s) even if a training cache's source files changed since it was prepared",
    )
    p.add_argument(
        "--resize",
        help="how probabilities return to native size: bilinear or nearest (the reference's) "
        "(default: the run's, bilinear)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")


def _run_or_ensemble(args: argparse.Namespace) -> str | list[str]:
    """--run RUN or --ensemble RUN...: exactly one of them."""
    if bool(args.run) == bool(args.ensemble):
        raise MicrosegError("give either --run RUN or --ensemble RUN RUN...")
    return args.run or args.ensemble


def _add_evaluate(verbs: argparse._SubParsersAction) -> None:
    from microseg.metrics import PROTOCOLS

    p = verbs.add_parser(
        "evaluate",
        help="predict a split volume by volume and score each patient (DSC, HD95 mm)",
        description="Predict every volume of a split with the run's best.pt (the best validation "
        "DSC; last.pt when training had no validation) and score each patient. "
        "Overwrites the run's metrics/ and predictions/ (predictions/ is replaced "
        "whole), and prints the checkpoint used and the mean DSC and HD95. Holds "
        "the run's lock: refused, naming the pid, while `train` writes the run.",
    )
    p.add_argument("--run", help="trained run folder (uses its best.pt, else last.pt)")
    p.add_argument(
        "--ensemble",
        nargs="+",
        metavar="RUN",
        help="instead of --run: several runs (folds, seeds) whose probability maps are averaged before "
        "the 0.5 threshold; written into --out like a run's metrics/ and predictions/",
    )
    p.add_argument("--out", help="with --ensemble: the folder its metrics/ and predictions/ go to")
    p.add_argument("--data", required=True, help="dataset folder holding the split")
    p.add_argument("--split", default="test", help="split to evaluate: train or test (default test)")
    p.add_argument(
        "--protocol", default=PROTOCOLS[0], help=f"scoring protocol: {', '.join(PROTOCOLS)} (default %(default)s)"
    )
    _add_inference_options(p)
    _add_jobs_option(p, "one per visible GPU, else 1")

    def run(args: argparse.Namespace) -> int:
        from microseg.evaluation.evaluate import evaluate

        _run_or_ensemble(args)  # exactly one of them
        if args.ensemble and not args.out:
            raise MicrosegError("--ensemble needs --out DIR: the folder its evaluation is written into")
        if args.out and not args.ensemble:
            raise MicrosegError("--out is for --ensemble; a run's evaluation goes into the run (--run)")
        path = evaluate(
            Path(args.out or args.run),
            args.data,
            args.split,
            args.protocol,
            args.resize,
            args.device,
            ensemble=args.ensemble,
            jobs=args.jobs,
            source_check=args.source_check,
        )
        print(f"per-patient scores: {path}")
        return 0

    p.set_defaults(func=run)


def _add_predict(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("predict", help="segment a volume or a folder of volumes with a trained run")
    p.add_argument("--run", help="trained run folder")
    p.add_argument(
        "--ensemble",
        nargs="+",
        metavar="RUN",
        help="instead of --run: several runs whose probability maps are averaged before the threshold",
    )
    p.add_argument("--input", required=True, help="a .nii/.nii.gz volume or a folder of them")
    p.add_argument(
        "--out",
        required=True,
        help="output mask file ending in .nii or .nii.gz (for one volume), or folder (for a folder: "
        "its masks keep the input names and appear only once every volume is predicted)",
    )
    _add_inference_options(p)

    def run(args: argparse.Namespace) -> int:
        from microseg.inference.predict import predict

        written = predict(_run_or_ensemble(args), args.input, args.out, args.device, args.resize, args.source_check)
        print(f"wrote {len(written)} mask(s) to {args.out}")
        return 0

    p.set_defaults(func=run)


def _add_compare(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "compare",
        help="compare runs, or the losses of an experiment: curves, tables, tests",
        description="Compare runs: what was compared, a results paragraph (paired differences, "
        "bootstrap CIs, Wilcoxon tests Holm-adjusted over every pair and metric), loss "
        "curves, per-epoch and per-patient tables, raters, hard region, strata. "
        "Evaluated runs must share the split and protocol of their `microseg evaluate` "
        "(patients are paired by case). Given an experiment folder (one holding "
        "experiment.json; several when they split the patients alike), compare its "
        "losses over their seeds and folds, a missing score counting as the worst value: "
        "the verdict on the plan's primary metric from a test with patients and seeds as "
        "crossed random effects (Holm-adjusted, CIs at the matching level), challengeR's "
        "two rankings and their bootstrap stability, the ANOVA of the run means, and the "
        "smallest difference the design can detect.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_OR_EXPERIMENT",
        help="run folders (evaluated ones on the same split and protocol), or experiment folders",
    )
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--overlays", action="store_true", help="also draw contour overlays of image, expert and each run")
    p.add_argument(
        "--cases", help="overlay these cases (and slices): e.g. 01,03:12,03:40 (default: where runs differ most)"
    )
    p.add_argument(
        "--missing",
        choices=("worst", "drop"),
        help="experiments: a score that is not there (empty prediction, failed or unevaluated cell) counts as "
        "the metric's worst value (worst, the default: DSC 0, HD95 the image diagonal) or is dropped (drop)",
    )

    def run(args: argparse.Namespace) -> int:
        from microseg.reporting.compare import compare

        print(f"report: {compare(args.runs, args.out, args.overlays, args.cases, args.missing)}")
        return 0

    p.set_defaults(func=run)


def _add_demo(verbs: argparse._SubParsersAction) -> None:
    from microseg.demo import DEMO_TRAIN

    p = verbs.add_parser("demo", help="simulate, prepare, train three losses, evaluate and compare, on a CPU")
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default ./demo)")
    p.add_argument(
        "--epochs", type=int, default=None, help=f"epochs per run (default {DEMO_TRAIN['epochs']}, at least 1)"
    )

    def run(args: argparse.Namespace) -> int:
        from microseg.demo import run_demo

        run_demo(args.out, epochs=args.epochs)
        return 0

    p.set_defaults(func=run)


def _add_download(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("download", help="fetch the real dataset or the pretrained encoder (the only network use)")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    data = what.add_parser("dataset", help="Zenodo record 10475293: md5-checked, resumable, unpacked atomically")
    data.add_argument("--out", default="data", help="folder to unpack into (default data/)")
    data.add_argument("--api", help="Zenodo API root (default $MICROSEG_ZENODO_API or https://zenodo.org/api)")
    data.add_argument("--keep-archive", action="store_true", help="keep the zip after unpacking it")
    weights = what.add_parser("weights", help="pretrained encoder weights by name, verified, into weights/")
    weights.add_argument("name", help="R50-ViT-B_16 (ImageNet-21k)")
    weights.add_argument("--out", help="weights folder (default $MICROSEG_WEIGHTS or weights/)")
    weights.add_argument(
        "--source",
        default="hub",
        choices=("hub", "npz"),
        help="hub: timm's vit_base_r50_s16_224.orig_in21k (default); npz: Google's R50+ViT-B_16.npz",
    )

    def run_dataset(args: argparse.Namespace) -> int:
        from microseg.data.download import download_dataset

        download_dataset(args.out, args.api, args.keep_archive)
        return 0

    def run_weights(args: argparse.Namespace) -> int:
        from microseg.models.pretrained import download_weights

        download_weights(args.name, args.out, args.source)
        return 0

    data.set_defaults(func=run_dataset)
    weights.set_defaults(func=run_weights)


def _add_check(verbs: argparse._SubParsersAction) -> None:
    from microseg.metrics import PROTOCOLS

    p = verbs.add_parser("check", help="dataset check: sizes, spacings, intensities, raters' DSC/HD95, problems")
    p.add_argument("--data", required=True, help="dataset folder holding train/ and/or test/")
    p.add_argument("--json", help="report file to write (default <data>.check.json beside the folder)")
    p.add_argument(
        "--protocol", default="microsegnet", choices=PROTOCOLS, help="rater scoring protocol (default microsegnet)"
    )
    _add_jobs_option(p, SIZED_JOBS)

    def run(args: argparse.Namespace) -> int:
        from microseg.data.check import check_dataset, data_check_path, format_check, require_clean, write_check

        report = check_dataset(args.data, args.protocol, args.jobs)
        print(format_check(report))
        path = write_check(report, args.json or data_check_path(args.data))
        print(f"report: {path}")
        require_clean(report, f"details in {path}")
        return 0

    p.set_defaults(func=run)


def _add_experiment(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("experiment", help="losses x seeds x folds as one resumable plan, locally or on SLURM")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    _add_experiment_run(what)
    _add_experiment_status(what)
    _add_experiment_cell(what)
    _add_experiment_power(what)


def _add_experiment_run(what: argparse._SubParsersAction) -> None:
    from microseg.experiments.plan import SET_BY_EXPERIMENT

    run = what.add_parser(
        "run",
        help="run (or continue) an experiment's plan",
        description="Run a plan: every (loss, seed, fold) cell is an ordinary run folder under OUT/runs/. The plan "
        "file (YAML: losses, seeds, folds, cache, data, protocol, base: {train option: value}) and the "
        "options below make the plan (an option wins over the file); a train option is a base option "
        "of every cell. OUT/experiment.json and OUT/splits.json are written first. Run again, the same "
        "plan skips finished cells, resumes interrupted ones from last.pt and retries failed ones; a "
        "different plan is refused naming the field (--add adds seeds or losses).",
    )
    run.add_argument("plan", nargs="?", help="plan file (YAML); optional when OUT already holds the experiment")
    run.add_argument("--out", required=True, help="experiment folder (new or empty, or the experiment to continue)")
    _add_plan_fields(run.add_argument_group("plan fields (override the plan file's)"))
    run.add_argument("--add", action="store_true", help="add the given --losses / --seeds to the experiment")
    run.add_argument(
        "--executor",
        default="local",
        help="local (default: worker processes here) or slurm (submit a job array and return)",
    )
    run.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="local workers (default: $MICROSEG_JOBS, else 1): one GPU each when there are GPUs, else the CPU "
        "cores divided",
    )
    run.add_argument(
        "--device",
        default="auto",
        help="where the cells train and evaluate: auto (default), cpu, cuda (not part of the plan)",
    )
    _add_slurm_options(run.add_argument_group("SLURM (--executor slurm)"))
    base = run.add_argument_group("base train options (every cell; see `microseg train --help`)")
    _add_config_options(base, skip=SET_BY_EXPERIMENT)

    def run_verb(args: argparse.Namespace) -> int:
        from microseg.core.parallel import resolve_jobs
        from microseg.experiments.plan import given_plan
        from microseg.experiments.runner import run_experiment

        values = given_plan(args.plan, vars(args))
        slurm_options = {"partition": args.partition, "time": args.time, "gpus": args.gpus, "extra": args.sbatch}
        jobs = resolve_jobs(args.jobs, "experiment", args.device)
        run_experiment(args.out, values, args.add, args.executor, jobs, args.device, slurm_options)
        return 0

    run.set_defaults(func=run_verb)


def _add_plan_fields(plan: argparse._ArgumentGroup) -> None:
    """`experiment run`'s options that set a plan field (over the plan file's)."""
    plan.add_argument("--losses", nargs="+", metavar="SPEC", help="loss specs, one cell row each")
    plan.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="training seeds (default 1234)")
    plan.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="k-fold cross-validation of the training patients, K >= 2 (default 0: the fixed train/test split)",
    )
    plan.add_argument("--cache", help="slice cache from `microseg prepare`")
    plan.add_argument("--data", help="dataset folder (its test split, and the held-out patients with folds)")
    plan.add_argument("--protocol", help="evaluation protocol (default microsegnet)")
    plan.add_argument("--primary", help="the metric the report's verdict rests on: dsc (default) or hd95_mm")


def _add_slurm_options(slurm: argparse._ArgumentGroup) -> None:
    """`experiment run --executor slurm`'s sbatch options."""
    slurm.add_argument("--partition", help="sbatch --partition")
    slurm.add_argument("--time", help="sbatch --time per cell, e.g. 4:00:00")
    slurm.add_argument("--gpus", type=int, metavar="N", help="GPUs per cell (sbatch --gpus-per-task)")
    slurm.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="any other sbatch option, passed through (repeatable), e.g. --sbatch=--mem=32G",
    )


def _add_experiment_status(what: argparse._SubParsersAction) -> None:
    status = what.add_parser("status", help="every cell's state, read from its run folder")
    status.add_argument("experiment", help="experiment folder")

    def status_verb(args: argparse.Namespace) -> int:
        from microseg.experiments.runner import experiment_status

        print(experiment_status(args.experiment))
        return 0

    status.set_defaults(func=status_verb)


def _add_experiment_cell(what: argparse._SubParsersAction) -> None:
    cell = what.add_parser("cell", help="run one cell of an experiment (what each worker and SLURM job runs)")
    cell.add_argument("experiment", help="experiment folder")
    cell.add_argument("cell", help="cell id (experiment.json's cells)")
    cell.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")

    def cell_verb(args: argparse.Namespace) -> int:
        from microseg.experiments.cell import run_cell_job

        run_cell_job(args.experiment, args.cell, args.device)
        return 0

    cell.set_defaults(func=cell_verb)


def _add_experiment_power(what: argparse._SubParsersAction) -> None:
    power = what.add_parser(
        "power",
        help="the seeds a planned experiment needs to resolve a difference, from a pilot experiment",
        description="From the pilot EXP's primary-metric differences (their patient, seed and residual variance, "
        "pooled over its pairs of losses), simulate the report's test for each design: one line per design "
        "with its power at --delta and the smallest difference it detects with 80% power, then the fewest "
        "seeds that resolve --delta.",
    )
    power.add_argument("experiment", help="the pilot experiment folder (evaluated cells)")
    power.add_argument("--delta", type=float, required=True, help="the difference to resolve, in the metric's unit")
    power.add_argument("--patients", type=int, metavar="N", help="test patients of the planned experiment")
    power.add_argument(
        "--seeds", type=int, nargs="+", metavar="S", help="designs: numbers of seeds (default 1x, 2x, 4x the pilot's)"
    )
    power.add_argument("--losses", type=int, metavar="K", help="losses of the planned experiment (its Holm family)")

    def power_verb(args: argparse.Namespace) -> int:
        from microseg.reporting.planner import power_lines

        print("\n".join(power_lines(args.experiment, args.delta, args.patients, args.seeds, args.losses)))
        return 0

    power.set_defaults(func=power_verb)


# Each entry adds one verb: add(subparsers) registers a parser whose `func` runs it.
VERBS: list = [
    _add_simulate,
    _add_prepare,
    _add_train,
    _add_evaluate,
    _add_predict,
    _add_compare,
    _add_experiment,
    _add_demo,
    _add_download,
    _add_check,
]


def flag_names(err: MicrosegError) -> str:
    """An error's message as the command line says it: an OptionError's `option` names become --option flags."""
    if not isinstance(err, OptionError):
        return str(err)
    return re.sub(r"`(\w+)`", lambda match: "--" + match[1].replace("_", "-"), str(err))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MicrosegError as err:
        print(f"microseg: error: {flag_names(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"microseg: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM / SIGHUP where the command handles them
        from microseg.core.stop import exit_status

        print("microseg: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return exit_status(err)
