"""Optuna tuning end to end on real sample images; MLflow child runs; shared storage; pruning; resume."""
import os
import subprocess
import sys

import mlflow
import optuna
import pytest

from bin_counter.commands.tune import SearchSpace, TuneConfig, objective_for, open_study, tune
from bin_counter.config import TrainConfig

pytestmark = pytest.mark.slow


def small(tiny_data, tmp_path, **kwargs) -> TuneConfig:
    base = TrainConfig(data=str(tiny_data), head="sgd", image_size=224, feature_views=2, num_workers=0,
                       cache_dir=str(tmp_path / "cache"))
    return TuneConfig(base=base, space=SearchSpace(batch_size=(8, 16), lr=(1e-4, 5e-2), epochs=(2, 3)), **kwargs)


def child_runs(parent_id: str):
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              output_format="list")


def test_three_trial_tune_end_to_end(tiny_data, tmp_path):
    out = tune(small(tiny_data, tmp_path, n_trials=3, n_jobs=2, register_as="tuned"))
    children = child_runs(out["parent_run_id"])
    trials = [r for r in children if r.info.run_name.startswith("trial-")]
    assert len(trials) == 3 and {r.data.tags["trial_state"] for r in trials} <= {"COMPLETE", "PRUNED"}
    assert any(r.info.run_name == "best" for r in children)
    parent = mlflow.get_run(out["parent_run_id"])
    assert {"best_batch_size", "best_lr", "best_epochs"} <= set(parent.data.params)
    assert 8 <= int(parent.data.params["best_batch_size"]) <= 16
    assert parent.data.metrics["best_value"] == pytest.approx(out["best_value"])
    assert "best_test_accuracy" in parent.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(out["parent_run_id"])}
    assert {"optimization_history.png", "trials.csv"} <= artifacts
    assert mlflow.pyfunc.load_model(out["model_uri"]) is not None
    assert mlflow.MlflowClient().get_registered_model("tuned").latest_versions


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
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")) == 2


def test_rerun_with_same_storage_resumes(tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tune(small(tiny_data, tmp_path, n_trials=2, storage=storage, study_name="resume"))
    tune(small(tiny_data, tmp_path, n_trials=3, storage=storage, study_name="resume"))
    study = optuna.load_study(study_name="resume", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2]


def test_two_workers_share_one_study(tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # warm the feature cache first so the workers race on trials, not on extraction
    tune(small(tiny_data, tmp_path, n_trials=1, storage=f"sqlite:///{tmp_path / 'warm.db'}"))
    command = [sys.executable, "-m", "bin_counter", "tune", "--data", str(tiny_data), "--n-trials", "4",
               "--storage", storage, "--study-name", "shared", "--batch-size-range", "8,16", "--epochs-range", "2,3",
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
    assert len([r for r in trial_runs if r.data.params.get("cache_dir") == str(tmp_path / "cache")]) == 4 + 1
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == 4, "a trial was duplicated"


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


def test_a_dead_workers_trial_is_failed_and_retried_with_its_parameters(tiny_data, tmp_path):
    """A worker killed mid-trial (SIGKILL: no cleanup) leaves a RUNNING trial whose heartbeat stops; the next
    worker fails it and runs its parameters again."""
    import signal
    import sqlite3
    import time

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    database = tmp_path / "optuna.db"
    storage = f"sqlite:///{database}"
    command = [sys.executable, "-m", "bin_counter", "tune", "--data", str(tiny_data), "--n-trials", "1",
               "--storage", storage, "--study-name", "retry", "--batch-size-range", "8,16", "--epochs-range", "2,3",
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
