"""main: the embedded default, prepare -> train -> evaluate, as child runs of one MLflow run."""
from __future__ import annotations

import os
import time

import mlflow

from bin_counter import tracking
from bin_counter.config import PrepareConfig, TrainConfig
from bin_counter.evaluate import evaluate
from bin_counter.prepare import run as run_prepare
from bin_counter.train import train


def main_pipeline(source: str, cfg: TrainConfig) -> None:
    start = time.perf_counter()
    with tracking.run("main") as parent:
        run_prepare(PrepareConfig(source=source, out=cfg.data))
        result = train(cfg)
        report = evaluate(result.model_uri, cfg.data, "test")
        mlflow.log_metrics({"test_accuracy": report.metrics["accuracy"], "test_f1_macro": report.metrics["f1_macro"],
                            "test_mae": report.metrics["mae"], "wall_seconds": time.perf_counter() - start})
        mlflow.set_tag("model_uri", result.model_uri)
    uri = os.environ.get("MLFLOW_TRACKING_URI", tracking.DEFAULT_TRACKING_URI)
    print(f"model: {result.model_uri}")
    print(f"done in {time.perf_counter() - start:.0f} s. See the runs with:  mlflow ui --backend-store-uri {uri}"
          f"  (then open http://127.0.0.1:5000)")
    print(f"run_id: {parent.info.run_id}")
