"""Settings are defined once (TrainConfig's fields): the CLI's options, the recipes and a run's config.yaml all
resolve through them."""
from __future__ import annotations

import dataclasses

import mlflow
import pytest
import yaml

from bin_counter.cli import TRAIN_ONLY, build_commands, config_of, crossval_config, main, parse, train_config
from bin_counter.config import (
    RECIPES,
    CrossvalConfig,
    DeployConfig,
    EvaluateConfig,
    LaunchConfig,
    PredictConfig,
    PromoteConfig,
    TrainConfig,
    TransformConfig,
)


def train_options() -> dict[str, object]:
    train = build_commands()[1]["train"]
    return {action.dest: action for action in train._actions}


def test_every_training_setting_is_an_option_with_the_fields_help_and_no_copied_default():
    options = train_options()
    for f in dataclasses.fields(TrainConfig):
        assert f.name in options, f"--{f.name.replace('_', '-')} is missing"
        assert f.metadata["help"], f"{f.name} has no help"
        if f.name != "resume":
            assert options[f.name].help.startswith(f.metadata["help"].replace("%", "%%"))
        # the default lives in the dataclass only: an option that was not given is absent, so a recipe applies
        assert options[f.name].default is dataclasses.MISSING or options[f.name].default == "==SUPPRESS==" \
            or f.name == "resume"
    assert train_config(parse(["train"])) == TrainConfig()


@pytest.mark.parametrize("argv, expected", [
    (["--hflip"], True), (["--no-hflip"], False), (["--hflip", "false"], False), (["--hflip", "true"], True),
    (["--hflip", ""], RECIPES["study"]["hflip"]),  # MLproject's "not given": the recipe's value
])
def test_boolean_options_take_flags_and_mlproject_values(argv, expected):
    assert train_config(parse(["train", "--recipe", "study", *argv])).hflip is expected


def test_a_runs_config_yaml_trains_the_same_again_and_options_still_win(tiny_data, tmp_path):
    cfg = TrainConfig.from_recipe("study", data=str(tiny_data), epochs=1, batch_size=8, feature_views=1,
                                  num_workers=0, cache_dir=str(tmp_path / "cache"), run_name="original")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.reproducible()))
    again = train_config(parse(["train", "--config", str(path)]))
    assert again == dataclasses.replace(cfg, run_name=None)  # every setting back, recipe or not
    assert train_config(parse(["train", "--config", str(path), "--epochs", "4"])).epochs == 4
    path.write_text("epochz: 3\n")
    with pytest.raises(Exception, match=r"unknown keys \['epochz'\]"):
        parse(["train", "--config", str(path)])


@pytest.mark.slow
def test_training_logs_its_config_yaml_artifact(tiny_data, tmp_path):
    from bin_counter.commands.train import train

    cfg = TrainConfig.from_recipe("study", data=str(tiny_data), epochs=1, batch_size=8, feature_views=1,
                                  num_workers=0, cache_dir=str(tmp_path / "cache"))
    result = train(cfg, save_model=False)
    path = mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/config.yaml", dst_path=str(tmp_path / "a"))
    assert train_config(parse(["train", "--config", path])) == cfg  # the artifact trains the same run again


def test_train_only_settings_are_not_options_of_pipelines():
    compare = build_commands()[1]["compare"]
    dests = {action.dest for action in compare._actions}
    assert not (set(TRAIN_ONLY) - {"register_as"}) & dests


def test_prepare_options_are_prepare_configs_fields():
    from bin_counter.config import PrepareConfig

    prepare = build_commands()[1]["prepare"]
    dests = {action.dest for action in prepare._actions}
    assert {f.name for f in dataclasses.fields(PrepareConfig)} <= dests
    args = parse(["prepare", "--split", "0.6,0.2,0.2", "--top-bucket", "--seed", "3.0"])
    assert (args.split, args.top_bucket, args.seed) == ((0.6, 0.2, 0.2), True, 3)


# each verb with the fewest options it needs, and the config they make: every other setting is the dataclass's
VERBS = {
    "evaluate": (["--model-uri", "runs:/r/model"], EvaluateConfig(model_uri="runs:/r/model")),
    "promote": (["--name", "bins", "--min-gain", "0.0"], PromoteConfig(name="bins")),
    "predict": (["--url", "http://127.0.0.1:5001", "--input", "photos"],
                PredictConfig(url="http://127.0.0.1:5001", input="photos")),
    "deploy": (["--endpoint", "bins", "--region", "eu-west-1"], DeployConfig(endpoint="bins", region="eu-west-1")),
    "launch": ([], LaunchConfig()),
    "crossval": (["--folds", "5.0"], CrossvalConfig()),  # MLproject passes numbers as floats
    "transform": (["--join", "s3://b/job"], TransformConfig(join="s3://b/job")),
}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verbs_options_are_its_configs_fields_with_their_help_and_no_copied_default(verb):
    argv, expected = VERBS[verb]
    options = {action.dest: action for action in build_commands()[1][verb]._actions}
    for f in dataclasses.fields(expected):
        if f.name == "base":  # crossval's training settings: TrainConfig's fields, below
            continue
        assert options[f.name].help.startswith(f.metadata["help"].replace("%", "%%")), f.name
        assert options[f.name].default == "==SUPPRESS==", f"--{f.name} states its default again"
    args = parse([verb, *argv])
    assert (crossval_config(args) if verb == "crossval" else config_of(args, type(expected))) == expected


def test_crossval_trains_each_fold_from_train_configs_defaults_but_for_the_options_given():
    """The CLI cached 2 views per training image where TrainConfig (and crossval called from Python) cached 4."""
    assert crossval_config(parse(["crossval"])).base == TrainConfig()
    given = crossval_config(parse(["crossval", "--feature-views", "2", "--num-workers", "0", "--seed", "3"]))
    assert given.base == TrainConfig(feature_views=2, num_workers=0) and given.seed == 3  # the folds' seed only


def test_a_required_option_given_empty_is_one_line(capsys):
    with pytest.raises(SystemExit) as ended:  # `mlflow run -e evaluate -P model_uri=`
        main(["evaluate", "--model-uri", ""])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.strip() == "error: --model-uri needs a value"


def test_settings_file_with_exponential_yaml_aliases_is_refused(tmp_path, capsys):
    lines = ["run_name:", "- &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"- &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 8)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")  # 271 bytes; before: a 5.1 MB run name
    with pytest.raises(SystemExit) as ended:  # (an S3 --data without --stream stops the old code right after)
        main(["train", "--config", str(tmp_path / "bomb.yaml"), "--data", "s3://bucket/data"])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "aliases (*name) are not accepted" in err and len(err.splitlines()) == 1
