"""Optuna tuning: the model search's decision on synthetic features (a known truth), and end to end on real sample
images; MLflow child runs; shared storage; pruning; resume (the study's search)."""
import os
import subprocess
import sys

import mlflow
import optuna
import pytest
import torch

from bin_counter.commands.tune import (
    Folds,
    ModelSpace,
    SearchSpace,
    TuneConfig,
    objective_for,
    open_study,
    search_model,
    tune,
)
from bin_counter.config import RECIPES, TrainConfig

slow = pytest.mark.slow
LITE = ("efficientnet-lite0", "efficientnet-lite1")


def small(tiny_data, tmp_path, **kwargs) -> TuneConfig:
    """The study's search on the tiny split (its storage, pruning and worker features are tested on it)."""
    base = TrainConfig(data=str(tiny_data), head="sgd", image_size=224, feature_views=2, num_workers=0,
                       cache_dir=str(tmp_path / "cache"))
    return TuneConfig(base=base, space=SearchSpace(batch_size=(8, 16), lr=(1e-4, 5e-2), epochs=(2, 3)),
                      search="study", **kwargs)


def synthetic_folds(strengths: dict[str, float], seed: int, n: int = 300, dim: int = 16) -> Folds:
    """Features of each "backbone": the count along one direction times its strength, plus unit noise. Equal
    strengths mean no backbone is truly better; independent noise still makes their scores differ."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    direction = torch.randn(dim, generator=generator)
    features = {(name, 224, "", "eval views"): (labels[:, None].float() * direction * strength
                                                 + torch.randn(n, dim, generator=generator))[:, None, :]
                for name, strength in strengths.items()}
    return Folds.of(labels, [1, 2, 3, 4, 5], 5, 0, features=features)


def synthetic_search(folds: Folds, n_trials: int = 6):
    cfg = TuneConfig(base=TrainConfig(decode="argmax", image_size=224), space=SearchSpace(), n_trials=n_trials,
                     model=ModelSpace(heads=("logistic",), backbones=LITE, image_sizes=(224,), decodes=("argmax",)))
    study = open_study(cfg)
    with mlflow.start_run() as parent:
        chosen, _ = search_model(cfg, study, parent.info.run_id, folds)
    trials = {t.number: t for t in study.trials}
    return chosen, trials, mlflow.get_run(parent.info.run_id)


def test_trial_zero_is_the_default_configuration():
    cfg = TuneConfig(base=TrainConfig(), space=SearchSpace())
    (waiting,) = open_study(cfg).trials
    defaults = {k: v for k, v in RECIPES["counting"].items() if k in ("head", "image_size", "balance", "decode",
                                                                      "decode_cost", "decode_tail_boost")}
    assert waiting.number == 0 and waiting.state == optuna.trial.TrialState.WAITING
    assert waiting.system_attrs["fixed_params"] == {**defaults, "backbone": "efficientnet-lite0"}
    assert waiting.user_attrs["default"] is True
    assert set(cfg.model.backbones) >= set(LITE) and 320 in cfg.model.image_sizes  # the space holds the default


@pytest.mark.parametrize("given, search, head", [({}, "model", "logistic"), ({"recipe": "study"}, "study", "sgd")])
def test_mlflow_run_tune_searches_the_default_model_or_with_recipe_study_the_studys(given, search, head):
    """Before: `mlflow run . -e tune` forced --head sgd and searched the study's space on top of the default."""
    import shlex
    from pathlib import Path

    from mlflow.projects import _project_spec

    from bin_counter.cli import parse, tune_config

    root = Path(__file__).resolve().parents[1]
    argv = shlex.split(_project_spec.load_project(str(root)).get_entry_point("tune").compute_command(given, "/tmp"))
    cfg = tune_config(parse(argv[3:]))
    assert (cfg.search, cfg.base.head) == (search, head) and cfg.n_trials == 5
    if search == "model":
        assert cfg.base == TrainConfig() and cfg.objective == "accuracy"
    else:
        assert {k: getattr(cfg.base, k) for k in RECIPES["study"]} == RECIPES["study"]
        assert (cfg.space.batch_size, cfg.space.lr, cfg.space.epochs) == ((32, 128), (1e-4, 5e-2), (5, 15))


def test_sagemaker_backend_keeps_the_studys_search():
    from bin_counter import BinCounterError
    from bin_counter.cli import parse, tune_config

    cfg = tune_config(parse(["tune", "--backend", "sagemaker"]))
    assert cfg.search == "study" and cfg.base.head == "sgd"
    with pytest.raises(BinCounterError, match="no conditional space"):
        tune_config(parse(["tune", "--backend", "sagemaker", "--recipe", "counting"]))


def test_a_trial_better_only_by_noise_does_not_replace_the_default():
    # equal strengths: lite1's independent noise (seed 2) makes it score 4 points higher, within two s.e.
    chosen, trials, parent = synthetic_search(synthetic_folds(dict.fromkeys(LITE, 0.3), seed=2))
    assert trials[0].params["backbone"] == LITE[0] and trials[0].user_attrs["default"]
    best = max((t for t in trials.values() if t.value is not None), key=lambda t: t.value)
    assert best.params["backbone"] == LITE[1] and best.value > trials[0].value, "the noise case must tempt"
    assert chosen.number == 0 and parent.data.tags["chosen"] == "the default (trial 0)"
    assert 0 < parent.data.metrics["tune/paired_gain"] < 2 * parent.data.metrics["tune/paired_standard_error"]
    assert parent.data.metrics["tune/feature_passes"] == 2  # six trials, two distinct feature passes


def test_a_clearly_better_trial_replaces_the_default():
    chosen, trials, parent = synthetic_search(synthetic_folds({LITE[0]: 0.1, LITE[1]: 1.0}, seed=0))
    assert chosen.params["backbone"] == LITE[1] and chosen.number != 0
    assert parent.data.tags["chosen"] == f"trial {chosen.number}"
    assert parent.data.metrics["tune/paired_gain"] > 2 * parent.data.metrics["tune/paired_standard_error"]
    assert parent.data.params["default_backbone"] == LITE[0] and parent.data.params["best_backbone"] == LITE[1]


def sgd_search(n_trials: int, pruner=None):
    folds = synthetic_folds({LITE[0]: 1.0}, seed=0)
    for (backbone, size, weights, _), features in list(folds.features.items()):  # the SGD head's training views
        folds.features[backbone, size, weights, "train views"] = features.repeat(1, 2, 1)
    cfg = TuneConfig(base=TrainConfig(head="sgd", decode="argmax", image_size=224, backbone=LITE[0], epochs=3),
                     space=SearchSpace(batch_size=(16, 32), epochs=(2, 4)), n_trials=n_trials,
                     model=ModelSpace(heads=("sgd",), backbones=(LITE[0],), image_sizes=(224,), decodes=("argmax",)))
    study = open_study(cfg, pruner)
    with mlflow.start_run() as parent:
        search_model(cfg, study, parent.info.run_id, folds)
    return study, parent


def test_sgd_trials_search_batch_lr_epochs_and_are_scored_on_the_same_folds():
    study, parent = sgd_search(2)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert trials[0].params == {"head": "sgd", "backbone": LITE[0], "image_size": 224, "balance": True,
                                "decode": "argmax", "batch_size": 32, "lr": 1e-3, "epochs": 3}
    assert all({"batch_size", "lr", "epochs"} <= set(t.params) for t in trials)
    assert len(trials) == 2 and all(len(t.user_attrs["fold_values"]) == 5 for t in trials)
    assert mlflow.get_run(parent.info.run_id).data.metrics["tune/feature_passes"] == 2  # eval and training views


def test_an_sgd_trial_is_pruned_between_folds_but_never_the_default():
    # every accuracy below 0.99 is hopeless, from the first fold on
    study, parent = sgd_search(2, optuna.pruners.ThresholdPruner(lower=0.99, n_warmup_steps=0))
    default, pruned = study.trials
    assert default.state == optuna.trial.TrialState.COMPLETE and default.user_attrs["default"]
    assert pruned.state == optuna.trial.TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    (run,) = [r for r in child_runs(parent.info.run_id) if r.info.run_name == "trial-1"]
    assert run.data.tags["trial_state"] == "PRUNED" and run.info.status == "KILLED"


def test_a_trial_that_gives_up_a_count_is_not_eligible():
    """The default decodes every image to the middle count (no end count recalled): never chosen, whatever
    its accuracy; the ordinal decoding with a huge cost does that."""
    folds = synthetic_folds({LITE[0]: 0.05, LITE[1]: 0.05}, seed=0)
    cfg = TrainConfig(image_size=224, decode="ordinal", decode_cost=50.0, decode_tail_boost=0.0)
    score = folds.score(folds.probabilities(cfg), cfg, "accuracy")
    assert score.min_recall == 0 and not score.eligible


def child_runs(parent_id: str):
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              output_format="list")


@slow
def test_model_search_end_to_end_registers_the_chosen_configuration_trained_by_train(tiny_data, tmp_path):
    base = TrainConfig(data=str(tiny_data), num_workers=0, feature_views=2, cache_dir=str(tmp_path / "cache"))
    cfg = TuneConfig(base=base, space=SearchSpace(batch_size=(8, 16), epochs=(2, 3)), n_trials=4,
                     register_as="tuned", model=ModelSpace(backbones=(LITE[0],), image_sizes=(320,)))
    out = tune(cfg)
    children = {r.info.run_name: r for r in child_runs(out["parent_run_id"])}
    trial0 = children["trial-0"]
    for key in ("head", "backbone", "image_size", "balance", "decode", "decode_cost", "decode_tail_boost"):
        assert trial0.data.params[key] == str(getattr(TrainConfig(), key)), key
    assert trial0.data.tags["default_configuration"] == "True" and "oof/accuracy" in trial0.data.metrics
    chosen = children["chosen"]  # trained by `train`: the logistic head on train+val, its test metrics
    assert chosen.data.tags["bin_counter.command"] == "train" and "test/accuracy" in chosen.data.metrics
    assert {k: chosen.data.params[k] for k in out["best_params"]} == {k: str(v) for k, v in out["best_params"].items()}
    parent = mlflow.get_run(out["parent_run_id"])
    assert parent.data.params["default_head"] == "logistic" and "best_head" in parent.data.params
    assert parent.data.metrics["tune/feature_passes"] >= 1 and "test/accuracy" in parent.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(out["parent_run_id"])}
    assert {"optimization_history.png", "trials.csv", "default_vs_best.csv"} <= artifacts
    version = mlflow.MlflowClient().get_registered_model("tuned").latest_versions[0]
    assert version.run_id == chosen.info.run_id


@slow
def test_three_trial_study_search_end_to_end(tiny_data, tmp_path):
    out = tune(small(tiny_data, tmp_path, n_trials=3, n_jobs=2, register_as="tuned"))
    children = child_runs(out["parent_run_id"])
    trials = [r for r in children if r.info.run_name.startswith("trial-")]
    assert len(trials) == 3 and {r.data.tags["trial_state"] for r in trials} <= {"COMPLETE", "PRUNED"}
    assert any(r.info.run_name == "best" for r in children)
    parent = mlflow.get_run(out["parent_run_id"])
    assert {"best_batch_size", "best_lr", "best_epochs"} <= set(parent.data.params)
    assert 8 <= int(parent.data.params["best_batch_size"]) <= 16
    assert parent.data.metrics["best/value"] == pytest.approx(out["best_value"])
    assert "test/accuracy" in parent.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(out["parent_run_id"])}
    assert {"optimization_history.png", "trials.csv"} <= artifacts
    assert mlflow.pyfunc.load_model(out["model_uri"]) is not None
    assert mlflow.MlflowClient().get_registered_model("tuned").latest_versions


@slow
def test_pruned_trial_is_stopped_and_marked(tiny_data, tmp_path):
    cfg = small(tiny_data, tmp_path, n_trials=1)
    cfg.space = SearchSpace(batch_size=(8, 8), lr=(1e-3, 1e-3), epochs=(6, 6))
    # any validation loss above 0.01 is hopeless: the trial must stop at epoch 2, the first the pruner may act on
    # (steps < n_warmup_steps are spared)
    study = open_study(cfg, pruner=optuna.pruners.ThresholdPruner(upper=0.01, n_warmup_steps=2))
    with mlflow.start_run() as parent:
        study.optimize(objective_for(cfg, parent.info.run_id), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and max(trial.intermediate_values) == 2
    (run,) = child_runs(parent.info.run_id)
    assert run.data.tags["trial_state"] == "PRUNED" and run.info.status == "KILLED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/loss")) == 2


@slow
def test_rerun_with_same_storage_resumes(tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tune(small(tiny_data, tmp_path, n_trials=2, storage=storage, study_name="resume"))
    tune(small(tiny_data, tmp_path, n_trials=3, storage=storage, study_name="resume"))
    study = optuna.load_study(study_name="resume", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2]


@slow
def test_two_workers_share_one_study(tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # warm the feature cache first so the workers race on trials, not on extraction
    tune(small(tiny_data, tmp_path, n_trials=1, storage=f"sqlite:///{tmp_path / 'warm.db'}"))
    command = [sys.executable, "-m", "bin_counter", "tune", "--recipe", "study", "--data", str(tiny_data),
               "--n-trials", "4", "--storage", storage, "--study-name", "shared", "--batch-size-range", "8,16",
               "--epochs-range", "2,3",
               "--feature-views", "2", "--num-workers", "0", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    workers = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [[line for line in e.splitlines() if "rror" in line][-3:]
                                                       for e in errors]
    study = optuna.load_study(study_name="shared", storage=storage)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4 and sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    # a worker that lost the race for the last slot records at most one refused (FAIL) trial, never a 5th run
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials if t not in finished)
    trial_runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.trial_state = 'COMPLETE'",
                                    output_format="list")
    trial_runs += mlflow.search_runs(search_all_experiments=True, filter_string="tags.trial_state = 'PRUNED'",
                                     output_format="list")
    assert len(trial_runs) == 4 + 1  # the workers' four and the warm-up's one, in this test's own store
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == 4, "a trial was duplicated"


@slow
@pytest.mark.parametrize("args, message", [
    (["--lr-range", "0.1,0.01"], "bad lr range"),
    (["--batch-size-range", "x"], "LOW,HIGH"),
    (["--backbone", "nope"], "unknown backbone"),
    (["--storage", "sqlite:////no/such/dir/optuna.db"], "cannot open Optuna storage"),
])
def test_tune_errors_are_one_line(tiny_data, tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "bin_counter", "tune", "--data", str(tiny_data), *args],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr


@slow
def test_a_dead_workers_trial_is_failed_and_retried_with_its_parameters(tiny_data, tmp_path):
    """A worker killed mid-trial (SIGKILL: no cleanup) leaves a RUNNING trial whose heartbeat stops; the next
    worker fails it and runs its parameters again."""
    import signal
    import sqlite3
    import time

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    database = tmp_path / "optuna.db"
    storage = f"sqlite:///{database}"
    command = [sys.executable, "-m", "bin_counter", "tune", "--recipe", "study", "--data", str(tiny_data),
               "--n-trials", "1", "--storage", storage, "--study-name", "retry", "--batch-size-range", "8,16",
               "--epochs-range", "2,3",
               "--image-size", "224", "--feature-views", "2", "--num-workers", "0",
               "--cache-dir", str(tmp_path / "cache")]
    worker = subprocess.Popen(command, env={**os.environ, "TQDM_DISABLE": "1"}, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def training() -> bool:
        """The worker's trial is running, has sent a heartbeat and drawn its parameters."""
        if not database.exists():
            return False
        with sqlite3.connect(database) as db:
            try:
                return db.execute("SELECT count(DISTINCT trial_params.param_name) FROM trials JOIN trial_heartbeats "
                                  "USING (trial_id) JOIN trial_params USING (trial_id) "
                                  "WHERE trials.state = 'RUNNING'").fetchone()[0] == 3
            except sqlite3.OperationalError:  # the worker has not created the tables yet
                return False

    deadline = time.time() + 300
    while time.time() < deadline and worker.poll() is None and not training():
        time.sleep(0.2)
    assert worker.poll() is None, worker.stderr.read()[-2000:]
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=60)
    # its last heartbeat is older than the grace period (180 s): time passes here rather than in the test
    with sqlite3.connect(database) as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-10 minutes')")

    tune(small(tiny_data, tmp_path, n_trials=1, storage=storage, study_name="retry"))
    dead, retried = optuna.load_study(study_name="retry", storage=storage).trials
    assert dead.state == optuna.trial.TrialState.FAIL and retried.state == optuna.trial.TrialState.COMPLETE
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retried) == dead.number
    assert retried.params == dead.params
