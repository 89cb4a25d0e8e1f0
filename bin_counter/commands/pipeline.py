"""main: the embedded default, prepare -> train -> evaluate, as child runs of one MLflow run."""
from __future__ import annotations

import os
import time

import mlflow

from bin_counter import tracking
from bin_counter.commands.evaluate import evaluate
from bin_counter.commands.prepare import run as run_prepare
from bin_counter.commands.train import train
from bin_counter.config import PrepareConfig, TrainConfig


def main_pipeline(source: str, cfg: TrainConfig) -> None:
    start = time.perf_counter()
    with tracking.run("main") as parent:
        run_prepare(PrepareConfig(source=source, out=cfg.data))
        result = train(cfg)
        report = evaluate(result.model_uri, cfg.data, "test")
        mlflow.log_metrics({"test_accuracy": report.metrics["accuracy"], "test_f1_macro": report.metrics["f1_macro"],
                            "test_mae": report.metrics["mae"], "wall_seconds": time.perf_counter() - start})
        mlflow.set_tag("model_uri", result.model_uri)
    print(f"model: {result.model_uri}")
    print(f"done in {time.perf_counter() - start:.0f} s. {where_to_look()}")
    print(f"run_id: {parent.info.run_id}")


def where_to_look() -> str:
    """How to see the runs; the store's password is not printed (logs and CI output are widely readable)."""
    uri = tracking.redact_uri(os.environ.get("MLFLOW_TRACKING_URI", tracking.DEFAULT_TRACKING_URI))
    return f"See the runs with:  mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
