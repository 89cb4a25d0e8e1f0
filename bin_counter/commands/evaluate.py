"""evaluate: any model URI on a prepared split -> metrics, plots and tables in MLflow (and --output JSON)."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from bin_counter import BinCounterError, plots, tracking
from bin_counter.commands.predict import count_images
from bin_counter.core import metrics
from bin_counter.core.files import atomic_write_text
from bin_counter.core.manifest import read_manifest, read_split
from bin_counter.pyfunc import load_model, predict_files

log = logging.getLogger(__name__)


@dataclass
class Report:
    metrics: dict
    predictions: pd.DataFrame  # the split's rows with predicted_count, confidence, error
    classes: list[int]


def evaluate_model(model, frame: pd.DataFrame, classes: list[int], batch_size: int = 64) -> Report:
    predictions = count_images(lambda paths: predict_files(model, paths), list(frame["abs_path"]), batch_size,
                               desc="evaluate")
    table = pd.concat([frame.reset_index(drop=True), predictions], axis=1)
    unreadable = table[table["error"] != ""]
    for row in unreadable.itertuples():
        log.warning("skipped %s: %s", row.image_id, row.error)
    scored = table[table["error"] == ""]
    if scored.empty:
        raise BinCounterError("no image of the split could be read")
    result = metrics.classification_metrics(scored["count"], scored["predicted_count"], classes)
    result["unreadable"] = len(unreadable)
    return Report(result, table, classes)


def log_report(report: Report, prefix: str = "") -> None:
    """Metrics (macro, weighted, per class, ordinal), plots and tables into the active MLflow run."""
    m = report.metrics
    mlflow.log_metrics(metrics.scalar_metrics(m, prefix))
    tracking.log_frame(m["per_class"], f"{prefix}per_class")
    tracking.log_figure(plots.confusion_matrices(m["confusion"], report.classes), f"{prefix}confusion_matrix.png")
    tracking.log_figure(plots.per_class_bars(m["per_class"]), f"{prefix}per_class.png")
    wrong = report.predictions[(report.predictions["error"] == "") &
                               (report.predictions["predicted_count"] != report.predictions["count"])]
    if len(wrong):
        worst = wrong.sort_values("confidence", ascending=False).head(24)
        titles = [f"{r.image_id}: true {r.count}, pred {r.predicted_count} ({r.confidence:.0%})"
                  for r in worst.itertuples()]
        tracking.log_figure(plots.image_grid(list(worst["abs_path"]), titles, title="Most confident mistakes"),
                            f"{prefix}misclassified.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{prefix}predictions.csv"
        report.predictions.drop(columns=["abs_path"]).to_csv(path, index=False)
        mlflow.log_artifact(str(path))
    mlflow.log_dict(metrics.json_ready(m), f"{prefix}metrics.json")


def evaluate_into_run(run_id: str, model_uri: str, data: str, split: str = "test") -> Report:
    """Evaluate a just-trained model and log the report into its own (already finished) run."""
    report = evaluate_model(load_model(model_uri), *read_split(Path(data), split))
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        log_report(report)
    return report


def summary_lines(m: dict) -> str:
    absent = len(m["counts_scored"]) < len(m["per_class"])
    scored = f", macro over counts {','.join(map(str, m['counts_scored']))} (the others are absent)" if absent else ""
    return (f"accuracy {m['accuracy']:.4f}  macro P/R/F1 {m['precision_macro']:.4f}/{m['recall_macro']:.4f}/"
            f"{m['f1_macro']:.4f}  weighted F1 {m['f1_weighted']:.4f}  MAE {m['mae']:.3f}  RMSE {m['rmse']:.3f}  "
            f"within one {m['within_one']:.3f}  (n={m['n']}{scored})")


def evaluate(model_uri: str, data: str, split: str = "test", output: str | None = None, batch_size: int = 64) -> Report:
    """`bin-counter evaluate`."""
    frame, classes = read_split(Path(data), split)
    model = load_model(model_uri)
    with tracking.run("evaluate", model_uri=model_uri, split=split):
        tracking.log_params({"model_uri": model_uri, "data": str(data), "split": split})
        tracking.log_dataset(frame, str(Path(data).resolve()), "abid", context=split)
        report = evaluate_model(model, frame, classes, batch_size)
        full = read_manifest(Path(data))
        reference = full[full["split"] == "train"] if (full["split"] == "train").any() else full
        baseline = metrics.majority_baseline(reference["count"], frame["count"])
        mlflow.log_metric("majority_baseline_accuracy", baseline)
        log_report(report)
    print(summary_lines(report.metrics))
    print(f"majority-class baseline accuracy {baseline:.4f}")
    print(report.metrics["per_class"].to_string(index=False))
    if output:
        atomic_write_text(Path(output), json.dumps(metrics.json_ready(report.metrics), indent=2) + "\n")
    return report


