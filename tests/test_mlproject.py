"""`mlflow run . -e ENTRY` means what the CLI means: MLflow's own code builds each entry point's command, and the
config it resolves to must equal a plain CLI call's, with defaults and with every recipe."""
import shlex
from pathlib import Path

import pytest
from mlflow.projects import _project_spec

from bin_counter.cli import parse, train_config
from bin_counter.config import RECIPES

ROOT = Path(__file__).resolve().parents[1]
STUDY_YAML = ROOT / "experiments/studies/efficientnet_vs_resnet50/efficientnet_vs_resnet50.yaml"


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
    cli = ["main", "--data", "data", *(["--recipe", recipe] if recipe else [])]
    assert resolved(entry_command("main", **given)) == train_config(parse(cli))


def test_mlproject_parameters_the_user_sets_still_win_over_the_recipe():
    cfg = resolved(entry_command("train", recipe="study", epochs="3", lr="0.01", image_size="160",
                                 decode_tail_boost="1.5"))
    assert (cfg.epochs, cfg.lr, cfg.head, cfg.rotation_degrees) == (3, 0.01, "sgd", 30.0)
    assert (cfg.image_size, cfg.decode_tail_boost) == (160, 1.5)  # passed on by MLflow as --image_size 160
    finetune = resolved(entry_command("train", recipe="finetune"))
    assert finetune.unfreeze_last == RECIPES["finetune"]["unfreeze_last"] and finetune.image_size == 320


def test_the_study_definition_yaml_is_the_study_recipe():
    """compare --experiment experiments/studies/efficientnet_vs_resnet50/efficientnet_vs_resnet50.yaml must train
    the study, whatever the default."""
    cfg = train_config(parse(["compare", "--experiment", str(STUDY_YAML)]))
    assert {key: getattr(cfg, key) for key in RECIPES["study"]} == RECIPES["study"]


@pytest.mark.slow
def test_mlflow_run_prepare_train_evaluate_on_a_tiny_split(tmp_path, mlflow_store):
    """The entry points as a user runs them: `mlflow run . -e NAME -P ... --env-manager local`, one after another."""
    import os
    import subprocess
    import sys

    import mlflow

    from conftest import make_abid_dir

    source = make_abid_dir(tmp_path / "abid", per_class=4)
    data = tmp_path / "data"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")},
           "MLFLOW_TRACKING_URI": mlflow_store, "PATH": path}

    def mlflow_run(entry: str, **parameters) -> None:
        argv = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", entry, "--env-manager", "local",
                "--experiment-name", "entry-points"]
        for key, value in parameters.items():
            argv += ["-P", f"{key}={value}"]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    mlflow_run("prepare", source=source, out=data, split="0.5,0.25,0.25")
    assert (data / "manifest.csv").exists()
    mlflow_run("train", data=data, recipe="study", epochs=1, image_size=64, batch_size=4)
    runs = mlflow.search_runs(experiment_names=["entry-points"],
                              filter_string="tags.mlflow.project.entryPoint = 'train'")
    (run_id,) = runs["run_id"]
    params = mlflow.MlflowClient().get_run(run_id).data.params
    assert (params["head"], params["epochs"], params["image_size"], params["rotation_degrees"]) == ("sgd", "1", "64",
                                                                                                     "30.0")
    model_uri = f"runs:/{run_id}/model"
    mlflow_run("evaluate", model_uri=model_uri, data=data)
    evaluations = mlflow.search_runs(experiment_names=["entry-points"],
                                     filter_string="tags.mlflow.project.entryPoint = 'evaluate'")
    assert len(evaluations) == 1 and 0 <= evaluations["metrics.test/accuracy"].iloc[0] <= 1


def test_mlproject_compare_lets_the_study_yaml_and_recipes_decide():
    """compare declared --backbones and --epochs 5 with defaults, which beat the --experiment file and recipes."""
    yaml_path = STUDY_YAML
    argv = shlex.split(entry_command("compare", experiment=str(yaml_path)))[3:]
    assert parse(argv).backbones == parse(["compare", "--experiment", str(yaml_path)]).backbones
    finetune = resolved(entry_command("compare", recipe="finetune"))
    assert finetune.epochs == RECIPES["finetune"]["epochs"]


def test_main_has_no_option_it_would_ignore(capsys):
    """`main --out foo` was parsed and ignored: prepare wrote to --data (default data)."""
    with pytest.raises(SystemExit):
        parse(["main", "--out", "elsewhere"])
    assert "unrecognized arguments: --out" in capsys.readouterr().err
    assert train_config(parse(["main", "--data", "elsewhere"])).data == "elsewhere"


def test_mlproject_tune_takes_a_storage_url_without_a_password_and_refuses_one_with():
    """The password reaches libpq from PGPASSFILE/PGPASSWORD; one in `-P storage=` would be logged by MLflow."""
    import subprocess
    import sys

    from bin_counter.commands.tune import refuse_password_in

    command = entry_command("tune", storage="postgresql://postgres@127.0.0.1:5432/optuna")
    args = parse(shlex.split(command)[3:])
    assert args.storage == "postgresql://postgres@127.0.0.1:5432/optuna"
    refuse_password_in(args.storage)  # accepted
    command = entry_command("tune", storage="postgresql://postgres:hunter2@127.0.0.1:5432/optuna", n_trials="1")
    result = subprocess.run([sys.executable, *shlex.split(command)[1:]], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "PGPASSFILE" in result.stderr
    assert "hunter2" not in result.stderr
