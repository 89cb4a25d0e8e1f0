"""evaluate: any model URI on a prepared split -> metrics, plots and tables in MLflow (and --output JSON)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd

from bin_counter import tracking
from bin_counter.config import EvaluateConfig
from bin_counter.core import metrics
from bin_counter.core.files import atomic_write_text
from bin_counter.core.manifest import read_manifest, read_split
from bin_counter.reports import Report, log_report, split_report, summary_lines  # noqa: F401 (tune and compare use them from here)
from bin_counter.serving.clients import LoadedModel, count_images
from bin_counter.serving.model import load_model

log = logging.getLogger(__name__)


def evaluate_model(model, frame: pd.DataFrame, classes: list[int],
                   batch_size: int = EvaluateConfig.batch_size) -> Report:
    # ABID's label is the recorded quantity: sent as the record, its check measures the false alarms on records
    # taken as right
    predictions = count_images(LoadedModel(model), list(frame["abs_path"]), batch_size, desc="evaluate",
                               records=frame["count"].astype(float))
    table = pd.concat([frame.reset_index(drop=True), predictions], axis=1)
    for row in table[table["error"] != ""].itertuples():
        log.warning("skipped %s: %s", row.image_id, row.error)
    return split_report(table, classes)


def evaluate_into_run(run_id: str, model_uri: str, data: str, split: str = "test") -> Report:
    """Evaluate a just-trained model and log the report into its own (already finished) run."""
    model = load_model(model_uri)
    frame, classes = read_split(Path(data), split)
    report = evaluate_model(model, frame, classes)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        log_report(report, split, model_id=tracking.linkable_model_id(model))
    return report


def evaluate(config: EvaluateConfig) -> Report:
    """`bin-counter evaluate`."""
    model_uri, data, split = config.model_uri, config.data, config.split
    frame, classes = read_split(Path(data), split)
    model = load_model(model_uri)
    with tracking.run("evaluate", model_uri=model_uri, split=split):
        model_id = tracking.linkable_model_id(model)
        tracking.log_params({"model_uri": model_uri, "data": str(data), "split": split})
        dataset = tracking.log_dataset(frame, str(Path(data).resolve()), f"abid-{split}", context=split,
                                       model_id=model_id)
        mlflow.set_tag("dataset_digest", dataset.digest)
        report = evaluate_model(model, frame, classes, config.batch_size)
        full = read_manifest(Path(data))
        reference = full[full["split"] == "train"] if (full["split"] == "train").any() else full
        baseline = metrics.majority_baseline(reference["count"], frame["count"])
        mlflow.log_metric(metrics.metric_key(split, "majority_accuracy"), baseline, model_id=model_id,
                          dataset=dataset)
        log_report(report, split, model_id=model_id, dataset=dataset)
    print(summary_lines(report.metrics))
    print(f"majority-class baseline accuracy {baseline:.4f}")
    print(report.metrics["per_class"].to_string(index=False))
    if config.output:
        atomic_write_text(Path(config.output), json.dumps(metrics.json_ready(report.metrics), indent=2) + "\n")
    return report


