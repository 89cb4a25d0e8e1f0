"""MLflow set-up and the logging helpers shared by the commands."""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from bin_counter.core.uris import has_credentials, redact_uri  # noqa: F401 (commands use them from here)

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_EXPERIMENT = "bin-counter"
EXPERIMENT_DESCRIPTION = (
    "Counting the objects in Amazon Bin Image Dataset photos (bin_counter). Each `main` run holds its prepare, "
    "train and evaluate runs; compare runs on `test/accuracy`, `test/f1_macro` and `test/mae` beside "
    "`test/majority_accuracy`. Models: the Models tab (one per training run, tagged with backbone and recipe) and "
    "the registry (`bin-counter-sample@champion` after `make run`).")


def configure(experiment_name: str | None = None) -> str:
    """Use a local sqlite store in the working directory unless the user chose a tracking server, and log to the
    project's experiment (or `experiment_name` / MLFLOW_EXPERIMENT_NAME) rather than MLflow's "Default"."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    if experiment_name:
        os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment_name
    # `mlflow run` creates its run in the experiment it was given before our code starts: keep it
    if os.environ.get("MLFLOW_RUN_ID"):
        describe_experiment(lambda: mlflow.get_experiment(
            mlflow.MlflowClient().get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id))
    elif not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
        describe_experiment(lambda: experiment)
    return os.environ["MLFLOW_TRACKING_URI"]


def describe_experiment(experiment_of) -> None:
    """A description and the classic ML view (not the GenAI one) for the experiment; a user's own are kept."""
    wanted = {"mlflow.note.content": EXPERIMENT_DESCRIPTION, "mlflow.experimentKind": "custom_model_development"}
    try:
        experiment = experiment_of()
        for key, value in wanted.items():
            if key not in experiment.tags:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    except mlflow.exceptions.MlflowException as exc:  # a read-only user, an old server: the runs matter, not this
        log.debug("experiment not described: %s", exc)


def run_title(*parts: str | None) -> str:
    """`train efficientnet-lite0 counting 1a2b3c4`: what the run did and from which commit, as its name."""
    commit = git_commit()
    return " ".join([*(p for p in parts if p), *([commit[:7]] if commit != "unknown" else [])])


@contextmanager
def run(name: str, parent_run_id: str | None = None, run_id: str | None = None, title: str | None = None,
        **tags: str) -> Iterator[mlflow.ActiveRun]:
    """A run of its own, or a child of the active one (so `main` shows prepare/train/evaluate beneath it).

    `name` is the command; the run is called `title` (default: the command and the commit). `parent_run_id`
    makes a child from another thread (Optuna's n_jobs), where no run is active; `run_id` continues an existing
    run (a resumed training).
    """
    nested = mlflow.active_run() is not None
    project_run = bool(os.environ.get("MLFLOW_RUN_ID")) and not nested and not parent_run_id and not run_id
    # System metrics (CPU, memory, disk, network; GPU through nvidia-ml-py) show as charts in the MLflow UI.
    # Our runs can be short: the default 10 s sampling would miss most of them.
    mlflow.set_system_metrics_sampling_interval(1)
    title = title or run_title(name)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else title, nested=nested,
                          parent_run_id=None if run_id else parent_run_id, log_system_metrics=True) as active:
        run_tags = {"bin_counter.command": name, "git_commit": git_commit(), **tags}
        if not run_id:
            run_tags["mlflow.runName"] = title  # also the run `mlflow run` created with a random name
        if not project_run:  # `mlflow run` records the project and entry point itself; ours would say __main__.py
            run_tags["mlflow.source.name"] = f"bin-counter {name}"
        mlflow.set_tags(run_tags)
        yield active


def runs_link(experiment_id: str, run_id: str | None = None) -> str:
    """Where `mlflow ui` (its default address) shows an experiment's runs, or one run."""
    return f"http://127.0.0.1:5000/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_params(params: dict[str, Any]) -> None:
    """`params` into the active run, except those it already has: under `mlflow run` the project logged what the
    user passed (`-P lr=1e-2`), and MLflow refuses a second value even when it is the same number spelt `0.01`."""
    run = mlflow.active_run()
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({key: value for key, value in params.items() if key not in logged})


def log_figure(figure, name: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, name)
    plt.close(figure)


def log_frame(frame: pd.DataFrame, name: str) -> None:
    """Log a table as CSV and markdown (the markdown reads well in the MLflow artifact view)."""
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / f"{name}.csv", index=False)
        (Path(tmp) / f"{name}.md").write_text(frame.to_markdown(index=False) + "\n")
        mlflow.log_artifact(str(Path(tmp) / f"{name}.csv"))
        mlflow.log_artifact(str(Path(tmp) / f"{name}.md"))


@contextmanager
def quiet_dataset_hints() -> Iterator[None]:
    """MLflow's hints about source guessing and integer columns are noise for our manifests."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def dataset_of(manifest: pd.DataFrame, **kwargs):
    return mlflow.data.from_pandas(manifest.drop(columns=["abs_path"], errors="ignore"), **kwargs)


def dataset_digest(manifest: pd.DataFrame) -> str:
    """MLflow's digest of a manifest, the same one `log_dataset` records on runs."""
    with quiet_dataset_hints():
        return dataset_of(manifest).digest


def linkable_model_id(model) -> str | None:
    """The loaded model's MLflow 3 model id when this tracking store holds that logged model, else None: a model
    registered from copied artifacts (or logged in another store) names a model id the store has never seen, and
    linking a metric to it fails the whole run."""
    model_id = getattr(model, "model_id", None)
    if not model_id:
        return None
    try:
        mlflow.get_logged_model(model_id)
    except mlflow.exceptions.MlflowException:
        log.info("model %s is not in this tracking store: its metrics are logged unlinked", model_id)
        return None
    return model_id


def log_dataset(manifest: pd.DataFrame, source: str, name: str, context: str, model_id: str | None = None):
    """Log the manifest as an MLflow dataset input (`count` its target), linked to the logged model it feeds or
    evaluates when `model_id` is given; returns the dataset."""
    from mlflow.entities import LoggedModelInput

    with quiet_dataset_hints():
        dataset = dataset_of(manifest, source=source, name=name, targets="count")
        model = LoggedModelInput(model_id) if model_id else None
        try:
            mlflow.log_input(dataset, context=context, model=model)
        except mlflow.exceptions.MlflowException as exc:
            # Two runs logging the same new dataset at once (tune's workers) race on its insert; the loser
            # retries and links to the row the winner wrote.
            if "UNIQUE constraint" not in str(exc):
                raise
            mlflow.log_input(dataset, context=context, model=model)
    return dataset
