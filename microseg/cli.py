"""The `microseg` command: one verb per stage of the pipeline.

Errors a user can cause (MicrosegError) end with one line on stderr and exit status 2;
Ctrl-C ends with status 130. Nothing else is caught: a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys

from microseg import __version__
from microseg.errors import MicrosegError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"microseg {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in VERBS:
        add(verbs)
    return parser


def _add_simulate(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("simulate", help="write a phantom micro-US dataset in the real layout")
    p.add_argument("--out", required=True, help="dataset folder to write (empty, new, or an earlier phantom)")
    p.add_argument("--train", type=int, default=10, metavar="N", help="training patients (default 10)")
    p.add_argument("--test", type=int, default=4, metavar="M", help="test patients (default 4)")
    p.add_argument("--slices", type=int, default=24, metavar="S", help="slices per sweep (default 24)")
    p.add_argument("--size", type=int, nargs=2, default=[962, 1372], metavar=("H", "W"),
                   help="slice size in pixels (default 962 1372, the real size; the demo uses 240 343)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--preview", action="store_true", help="also write preview.png: slices with both contours")

    def run(args: argparse.Namespace) -> int:
        from microseg.data.phantom import simulate_dataset

        out = simulate_dataset(args.out, args.train, args.test, args.slices, tuple(args.size), args.seed, args.preview)
        print(f"wrote phantom dataset: {out}")
        return 0

    p.set_defaults(func=run)


def _add_prepare(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("prepare", help="build the HDF5 slice cache of a dataset folder")
    p.add_argument("--data", required=True, help="dataset folder holding train/ (and test/)")
    p.add_argument("--out", required=True, help="cache file to write, e.g. cache.h5")
    p.add_argument("--size", type=int, default=224, help="slice size in the cache (default 224)")

    def run(args: argparse.Namespace) -> int:
        from microseg.data.cache import prepare_cache

        prepare_cache(args.data, args.out, args.size)
        return 0

    p.set_defaults(func=run)


def _add_train(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("train", help="train a model on a slice cache (defaults: the reference recipe)")
    p.add_argument("--config", help="YAML file holding any of the options below (the command line wins)")
    p.add_argument("--cache", help="slice cache from `microseg prepare`")
    p.add_argument("--run", required=True, help="run folder to write, e.g. runs/NAME")
    p.add_argument("--loss", help="loss spec, e.g. adaptive_focal, ag_bce:w=4, 0.5*dice+focal (default adaptive_focal)")
    p.add_argument("--model", help="model config: R50-ViT-B_16 (default), R50-ViT-L_16, small, tiny")
    p.add_argument("--weights", help="pretrained weights file (Google .npz, timm/safetensors state dict, microseg checkpoint)")
    p.add_argument("--epochs", type=int, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, help="batch size (default 8)")
    p.add_argument("--lr", type=float, help="base learning rate (default 0.01), poly decay")
    p.add_argument("--optimizer", help="sgd (default) or adam")
    p.add_argument("--val-fraction", type=float, help="fraction of training patients held out for validation (default 0)")
    p.add_argument("--seed", type=int, help="random seed (default 1234)")
    p.add_argument("--amp", nargs="?", const="bf16", help="mixed precision: bf16 (default with --amp) or fp16 (CUDA)")
    p.add_argument("--channels-last", action="store_const", const=True, help="channels_last memory format")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="train without augmentation")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default 2)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last.pt")
    p.add_argument("--force", action="store_true", help="overwrite an existing run")

    def run(args: argparse.Namespace) -> int:
        from microseg.config import resolve_config
        from microseg.train import resume_overrides, train

        options = {k: v for k, v in vars(args).items() if k not in ("verb", "func", "config", "resume", "force")}
        if args.resume:
            config = resume_overrides(args.run, args.config, options)
        else:
            config = resolve_config(args.config, options)
        run_dir = train(config, resume=args.resume, force=args.force)
        print(f"run written: {run_dir}")
        return 0

    p.set_defaults(func=run)


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", default="bilinear", choices=("bilinear", "nearest"),
                   help="how probabilities return to native size (default bilinear; the reference: nearest)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")


def _add_evaluate(verbs: argparse._SubParsersAction) -> None:
    from microseg.metrics import PROTOCOLS

    p = verbs.add_parser("evaluate", help="predict a split volume by volume and score each patient (DSC, HD95 mm)")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--data", required=True, help="dataset folder holding the split")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--protocol", default="microsegnet", choices=PROTOCOLS, help="scoring protocol (default microsegnet)")
    _add_inference_options(p)

    def run(args: argparse.Namespace) -> int:
        from microseg.evaluate import evaluate

        path = evaluate(args.run, args.data, args.split, args.protocol, args.resize, args.device)
        print(f"per-patient scores: {path}")
        return 0

    p.set_defaults(func=run)


def _add_predict(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("predict", help="segment a volume or a folder of volumes with a trained run")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--input", required=True, help="a .nii/.nii.gz volume or a folder of them")
    p.add_argument("--out", required=True, help="output mask file (for one volume) or folder")
    _add_inference_options(p)

    def run(args: argparse.Namespace) -> int:
        from microseg.evaluate import predict

        written = predict(args.run, args.input, args.out, args.device, args.resize)
        print(f"wrote {len(written)} mask(s) to {args.out}")
        return 0

    p.set_defaults(func=run)


def _add_compare(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("compare", help="compare runs: loss curves, per-epoch and per-patient tables, tests")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--overlays", action="store_true", help="also draw contour overlays of image, expert and each run")
    p.add_argument("--cases", help="overlay these cases (and slices): e.g. 01,03:12,03:40 (default: where runs differ most)")

    def run(args: argparse.Namespace) -> int:
        from microseg.report import compare

        print(f"report: {compare(args.runs, args.out, args.overlays or bool(args.cases), args.cases)}")
        return 0

    p.set_defaults(func=run)


def _add_demo(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("demo", help="simulate, prepare, train three losses, evaluate and compare, on a CPU")
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default ./demo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's own)")

    def run(args: argparse.Namespace) -> int:
        from microseg.demo import run_demo

        run_demo(args.out, epochs=args.epochs)
        return 0

    p.set_defaults(func=run)


# Each entry adds one verb: add(subparsers) registers a parser whose `func` runs it.
VERBS: list = [_add_simulate, _add_prepare, _add_train, _add_evaluate, _add_predict, _add_compare, _add_demo]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MicrosegError as err:
        print(f"microseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("microseg: interrupted", file=sys.stderr)
        return 130
