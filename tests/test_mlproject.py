"""`mlflow run . -e ENTRY` means what the CLI means: MLflow's own code builds each entry point's command, and the
config it resolves to must equal a plain CLI call's, with defaults and with every recipe."""
import shlex
from pathlib import Path

import pytest
from mlflow.projects import _project_spec

from bin_counter.cli import parse, train_config
from bin_counter.config import RECIPES

ROOT = Path(__file__).resolve().parents[1]


def resolved(command: str):
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "bin_counter"]
    return train_config(parse(argv[3:]))


def entry_command(entry: str, **parameters) -> str:
    return _project_spec.load_project(str(ROOT)).get_entry_point(entry).compute_command(parameters, "/tmp")


@pytest.mark.parametrize("recipe", [None, *RECIPES])
def test_mlproject_train_resolves_to_the_cli_config(recipe):
    """Before: MLproject always passed --epochs 10 --unfreeze-last 0, so `-P recipe=finetune` trained a frozen
    backbone and `-P recipe=study` ran 10 epochs instead of the study's 5."""
    given = {"recipe": recipe} if recipe else {}
    cli = ["train", "--data", "data", *(["--recipe", recipe] if recipe else [])]
    assert resolved(entry_command("train", **given)) == train_config(parse(cli))


@pytest.mark.parametrize("recipe", [None, "study", "counting"])
def test_mlproject_main_resolves_to_the_cli_config(recipe):
    given = {"recipe": recipe} if recipe else {}
    cli = ["main", "--out", "data", "--data", "data", *(["--recipe", recipe] if recipe else [])]
    assert resolved(entry_command("main", **given)) == train_config(parse(cli))


def test_mlproject_parameters_the_user_sets_still_win_over_the_recipe():
    cfg = resolved(entry_command("train", recipe="study", epochs="3", lr="0.01"))
    assert (cfg.epochs, cfg.lr, cfg.head, cfg.rotation_degrees) == (3, 0.01, "sgd", 30.0)
    finetune = resolved(entry_command("train", recipe="finetune"))
    assert finetune.unfreeze_last == RECIPES["finetune"]["unfreeze_last"] and finetune.image_size == 320


def test_the_study_definition_yaml_is_the_study_recipe():
    """compare --experiment experiments/efficientnet_vs_resnet50.yaml must train the study, whatever the default."""
    cfg = train_config(parse(["compare", "--experiment", str(ROOT / "experiments" / "efficientnet_vs_resnet50.yaml")]))
    assert {key: getattr(cfg, key) for key in RECIPES["study"]} == RECIPES["study"]
