"""main: the embedded default, prepare -> train -> evaluate -> register -> promote, as child runs of one MLflow
run, so a first `make run` shows the whole used-by flow: runs to compare, a model, and a registered champion."""
from __future__ import annotations

import dataclasses
import os
import time

import mlflow

from bin_counter import tracking
from bin_counter.commands.evaluate import evaluate
from bin_counter.commands.prepare import prepare
from bin_counter.commands.registry import promote
from bin_counter.commands.train import train
from bin_counter.config import EvaluateConfig, PrepareConfig, PromoteConfig, TrainConfig
from bin_counter.core import metrics

# never the production model's name: `make run` against a team server must not take its @champion
SAMPLE_MODEL = "bin-counter-sample"


def main_pipeline(source: str, cfg: TrainConfig) -> None:
    start = time.perf_counter()
    name = cfg.register_as or SAMPLE_MODEL
    title = tracking.run_title("main", cfg.backbone, cfg.recipe)
    with tracking.run("main", title=title, backbone=cfg.backbone, recipe=cfg.recipe) as parent:
        prepare(PrepareConfig(source=source, out=cfg.data))
        result = train(dataclasses.replace(cfg, register_as=name))
        report = evaluate(EvaluateConfig(model_uri=result.model_uri, data=cfg.data, split="test"))
        headline = {metrics.metric_key("test", k): report.metrics[k] for k in metrics.HEADLINE}
        mlflow.log_metrics({**headline, "main/wall_seconds": time.perf_counter() - start})
        mlflow.set_tag("model_uri", result.model_uri)
        decision = promote(PromoteConfig(name=name, data=cfg.data, run_id=result.run_id))
        mlflow.set_tag("registered_model", f"{name}/{decision['version']}@{decision['alias']}")
    print(f"model: {result.model_uri}  registered: models:/{name}/{decision['version']} (@{decision['alias']})")
    print(f"done in {time.perf_counter() - start:.0f} s.")
    print(where_to_look(parent.info.experiment_id, parent.info.run_id, name))
    print(f"run_id: {parent.info.run_id}")


def where_to_look(experiment_id: str, run_id: str, model_name: str) -> str:
    """How to see what the job made; the store's password is not printed (logs and CI output are widely read)."""
    uri = tracking.redact_uri(os.environ.get("MLFLOW_TRACKING_URI", tracking.DEFAULT_TRACKING_URI))
    runs, experiment = tracking.runs_link(experiment_id, run_id), tracking.runs_link(experiment_id)
    return "\n".join([
        f"See it in the MLflow UI:  mlflow ui --backend-store-uri {uri}",
        f"  this run:   {runs}",
        f"  runs:       {experiment}  (columns test/accuracy, test/f1_macro, test/mae)",
        "  compare:    tick the runs, then Compare",
        f"  models:     {experiment}/models",
        f"  registry:   http://127.0.0.1:5000/#/models/{model_name}",
    ])
