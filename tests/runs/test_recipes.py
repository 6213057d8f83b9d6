"""Named recipes: each one's resolved settings against what its paper states, precedence
(command line > YAML > recipe > defaults), the record in config.yaml, and unknown names."""

from __future__ import annotations

import pytest
import yaml

from microseg.cli import build_parser, main
from microseg.models.configs import resolve_config
from microseg.runs.config import TrainConfig, resolve_train_config
from microseg.runs.recipes import RECIPES
from train_helpers import TINY_TRAIN, tiny_train_argv

# MicroSegNet's trainer (and the micro-US adaptive focal paper's training setup): SGD lr 0.01,
# momentum 0.9, weight decay 1e-4, batch 8, 10 epochs, poly power 0.9, seed 1234, deep supervision
# at four scales with kernels 1, 2, 3, 4 and a plain sum; ImageNet-21k R50+ViT-B/16 encoder.
PAPER_OPTIMISATION = dict(
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    batch_size=8,
    epochs=10,
    poly_power=0.9,
    seed=1234,
    ds_kernel_sizes=[1, 2, 3, 4],
    ds_weights=[1.0] * 4,
    weights="R50-ViT-B_16",
)
PAPERS = {
    # MicroSegNet: AG-BCE, the TransUNet port, no augmentation, nearest resize back (its test script)
    "microsegnet": dict(PAPER_OPTIMISATION, loss="ag_bce", augment=False, prediction_resize="nearest"),
    # micro-US adaptive focal: rotations, flips, intensity variations; evaluated as MicroSegNet
    "adaptive-focal": dict(PAPER_OPTIMISATION, loss="adaptive_focal", augment=True, prediction_resize="nearest"),
}
VARIANT = {"microsegnet": "port", "adaptive-focal": "google"}


def resolve(recipe: str | None = None, yaml_path: str | None = None, **options) -> TrainConfig:
    return resolve_train_config(yaml_path, {"cache": "c.h5", "run": "runs/x", "recipe": recipe, **options})


def from_command_line(*argv: str) -> TrainConfig:
    """What `microseg train ARGV` resolves (the CLI's own parser)."""
    args = build_parser().parse_args(["train", "--cache", "c.h5", "--run", "runs/x", *argv])
    options = {k: v for k, v in vars(args).items() if k not in ("verb", "func", "config", "resume", "force")}
    return resolve_train_config(args.config, options)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_paper_recipes_resolve_to_the_papers_settings(name):
    config = resolve(name)
    for key, value in PAPERS[name].items():
        assert getattr(config, key) == value, key
    assert resolve_config(config.model).variant == VARIANT[name]
    assert resolve_config(config.model).hidden == 768 and resolve_config(config.model).depth == 12  # ViT-B/16
    assert config.preprocess(224).prediction_resize == PAPERS[name]["prediction_resize"]
    assert config.recipe == name


def test_the_default_recipe_is_the_config_defaults():
    assert resolve().to_dict() == resolve("default").to_dict() == TrainConfig(cache="c.h5", run="runs/x").to_dict()
    assert resolve().recipe == "default" and resolve().preprocess(224).prediction_resize == "bilinear"


def test_every_recipe_sets_only_config_fields():
    known = {f for f in TrainConfig().to_dict()}
    for recipe in RECIPES.values():
        assert set(recipe.settings) <= known - {"recipe", "cache", "run"}


def test_command_line_beats_yaml_beats_recipe_beats_defaults(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("recipe: microsegnet\nepochs: 3\naugment: true\n")
    config = resolve(None, str(yaml_file), lr=0.05)
    assert config.recipe == "microsegnet"
    assert config.lr == 0.05  # command line over the recipe
    assert (config.epochs, config.augment) == (3, True)  # YAML over the recipe
    assert (config.loss, config.model, config.batch_size) == ("ag_bce", "R50-ViT-B_16-port", 8)  # the recipe's
    assert config.val_fraction == TrainConfig.val_fraction and config.amp == TrainConfig.amp  # no recipe sets them
    # a recipe named on the command line wins over the YAML's, and the YAML's values still win over it
    config = resolve("adaptive-focal", str(yaml_file))
    assert (config.recipe, config.loss, config.epochs) == ("adaptive-focal", "adaptive_focal", 3)


def test_the_command_line_can_turn_a_recipes_augmentation_either_way():
    assert from_command_line("--recipe", "microsegnet").augment is False
    assert from_command_line("--recipe", "microsegnet", "--augment").augment is True
    assert from_command_line("--recipe", "adaptive-focal", "--no-augment").augment is False
    assert from_command_line("--prediction-resize", "nearest").preprocess(64).prediction_resize == "nearest"


def test_the_recipe_is_recorded_in_the_run(cache, tmp_path):
    from microseg.runs.checkpoint import load_checkpoint

    run = tmp_path / "msn"
    argv = tiny_train_argv(
        cache,
        run,
        "--recipe",
        "microsegnet",
        "--weights",
        "",
        "--batch-size",
        "4",
        "--val-fraction",
        str(TINY_TRAIN["val_fraction"]),
    )
    assert main(argv) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"] == "microsegnet"
    assert (saved["augment"], saved["loss"], saved["prediction_resize"], saved["model"]) == (
        False,
        "ag_bce",
        "nearest",
        "tiny",
    )
    assert load_checkpoint(run / "last.pt").preprocess.prediction_resize == "nearest"  # what evaluate uses


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_an_unknown_recipe_is_one_error_line(where, tmp_path, capsys):
    argv = ["train", "--cache", str(tmp_path / "c.h5"), "--run", str(tmp_path / "r")]
    if where == "yaml":
        (tmp_path / "run.yaml").write_text("recipe: transunet\n")
        argv += ["--config", str(tmp_path / "run.yaml")]
    else:
        argv += ["--recipe", "transunet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("microseg: error:")
    assert "transunet" in err[0] and all(name in err[0] for name in RECIPES)
