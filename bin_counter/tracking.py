"""MLflow set-up and the logging helpers shared by the commands."""
from __future__ import annotations

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

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_EXPERIMENT = "bin-counter"
def configure() -> str:
    """Use a local sqlite store in the working directory unless the user chose a tracking server."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    # `mlflow run` passes the experiment and run through the environment; keep them.
    if not any(os.environ.get(var) for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")):
        mlflow.set_experiment(DEFAULT_EXPERIMENT)
    return os.environ["MLFLOW_TRACKING_URI"]


@contextmanager
def run(name: str, parent_run_id: str | None = None, run_id: str | None = None,
        **tags: str) -> Iterator[mlflow.ActiveRun]:
    """A run of its own, or a child of the active one (so `main` shows prepare/train/evaluate beneath it).

    `parent_run_id` makes a child from another thread (Optuna's n_jobs), where no run is active; `run_id`
    continues an existing run (a resumed training).
    """
    nested = mlflow.active_run() is not None
    run_name = None if os.environ.get("MLFLOW_RUN_ID") and not nested and not parent_run_id else name
    # System metrics (CPU, memory, disk, network; GPU through nvidia-ml-py) show as charts in the MLflow UI.
    # Our runs can be short: the default 10 s sampling would miss most of them.
    mlflow.set_system_metrics_sampling_interval(1)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested,
                          parent_run_id=None if run_id else parent_run_id, log_system_metrics=True) as active:
        mlflow.set_tags({"bin_counter.command": name, "git_commit": git_commit(), **tags})
        yield active


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


def log_dataset(manifest: pd.DataFrame, source: str, name: str, context: str) -> str:
    """Log the manifest as an MLflow dataset input; returns its digest (also tagged on the run)."""
    with quiet_dataset_hints():
        dataset = dataset_of(manifest, source=source, name=name)
        try:
            mlflow.log_input(dataset, context=context)
        except mlflow.exceptions.MlflowException as exc:
            # Two runs logging the same new dataset at once (tune's workers) race on its insert; the loser
            # retries and links to the row the winner wrote.
            if "UNIQUE constraint" not in str(exc):
                raise
            mlflow.log_input(dataset, context=context)
    mlflow.set_tag("dataset_digest", dataset.digest)
    return dataset.digest
