"""What a run shows about a model on one split: the headline metrics under one vocabulary (`test/accuracy`), the
per-count figures in their own group, the plots people look at and the tables behind them. `train` logs it for
its test split and `evaluate` for any split, so the two runs carry the same keys and the same pictures."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from bin_counter import BinCounterError, plots, tracking
from bin_counter.core import calibration, metrics

log = logging.getLogger(__name__)


@dataclass
class Report:
    metrics: dict
    predictions: pd.DataFrame  # the split's rows with predicted_count, confidence, error (and prob_<count>)
    classes: list[int]


def probability_columns(table: pd.DataFrame, classes: list[int]) -> np.ndarray | None:
    columns = [f"prob_{c}" for c in classes]
    return table[columns].to_numpy(dtype=float) if set(columns) <= set(table.columns) else None


def set_members(table: pd.DataFrame, classes: list[int]) -> np.ndarray | None:
    """The count sets of `table` as an (N, K) boolean matrix, or None where the model made none (before 0.2)."""
    if "count_set" not in table.columns or (table["count_set"].fillna("") == "").all():
        return None
    sets = [set(map(int, str(text).split("|"))) if text else set() for text in table["count_set"].fillna("")]
    return np.array([[c in members for c in classes] for members in sets], dtype=bool)


def split_report(table: pd.DataFrame, classes: list[int]) -> Report:
    """Accuracy, P/R/F1 and ordinal errors of the readable rows of `table` (a split's rows with the model's
    answers), and, where it has probabilities, their calibration and the count sets' coverage."""
    scored = table[table["error"] == ""]
    if scored.empty:
        raise BinCounterError("no image of the split could be read")
    result = metrics.classification_metrics(scored["count"], scored["predicted_count"], classes)
    result["unreadable"] = int(len(table) - len(scored))
    probs = probability_columns(scored, classes)
    if probs is not None:
        labels = np.searchsorted(classes, scored["count"].to_numpy())
        members = set_members(scored, classes)
        result.update(calibration.probability_metrics(probs, labels, members))
        judged = scored["record_check"].isin(["suspect", "consistent"]) if "record_check" in scored else []
        if len(judged) and judged.any():  # the split's labels sent as records: how many right records are doubted
            result["record_suspect_rate"] = float((scored.loc[judged, "record_check"] == "suspect").mean())
        if members is not None:
            covered = members[np.arange(len(labels)), labels]
            result["sets_per_count"] = pd.DataFrame([
                {"count": c, "images": int((labels == k).sum()), "coverage": float(covered[labels == k].mean()),
                 "mean_set_size": float(members[labels == k].sum(1).mean())}
                for k, c in enumerate(classes) if (labels == k).any()])
    return Report(result, table, classes)


def log_calibration(report: Report, split: str, model_id: str | None, dataset) -> None:
    """The reliability diagram, the risk-coverage curve and the count sets per count, as images and tables."""
    scored = report.predictions[report.predictions["error"] == ""]
    probs = probability_columns(scored, report.classes)
    if probs is None:
        return
    labels = np.searchsorted(report.classes, scored["count"].to_numpy())
    reliability = pd.DataFrame(calibration.reliability_table(probs, labels))
    correct = (scored["predicted_count"] == scored["count"]).to_numpy()
    uncertainty = scored["uncertainty"].to_numpy() if "uncertainty" in scored else calibration.entropy(probs)
    risk = pd.DataFrame(calibration.risk_coverage(correct, uncertainty))
    tracking.log_frame(reliability, f"{split}_reliability")
    tracking.log_frame(risk, f"{split}_risk_coverage")
    tracking.log_figure(plots.reliability_diagram(reliability, report.metrics["ece_top_label"]), "reliability.png")
    tracking.log_figure(plots.risk_coverage(risk), "risk_coverage.png")
    per_count = report.metrics.get("sets_per_count")
    if per_count is not None:
        tracking.log_frame(per_count, f"{split}_count_sets")
        mlflow.log_metrics({metrics.per_class_key(split, f"set_{name}", int(row["count"])): float(row[column])
                            for _, row in per_count.iterrows()
                            for name, column in (("coverage", "coverage"), ("size", "mean_set_size"))},
                           model_id=model_id, dataset=dataset)


def log_report(report: Report, split: str, model_id: str | None = None, dataset=None) -> None:
    """Metrics, plots and tables of `report` into the active run; the metrics are linked to the logged model and
    the dataset they were measured on when those are given (the model's page then lists them)."""
    m = report.metrics
    mlflow.log_metrics(metrics.scalar_metrics(m, split), model_id=model_id, dataset=dataset)
    tracking.log_frame(m["per_class"], f"{split}_per_class")
    tracking.log_figure(plots.confusion_matrices(m["confusion"], report.classes), "confusion_matrix.png")
    tracking.log_figure(plots.per_class_bars(m["per_class"]), "per_class.png")
    predictions = report.predictions
    wrong = predictions[(predictions["error"] == "") & (predictions["predicted_count"] != predictions["count"])]
    if len(wrong) and "abs_path" in wrong:
        worst = wrong.sort_values("confidence", ascending=False).head(24)
        titles = [f"{r.image_id}: true {r.count}, pred {r.predicted_count} ({r.confidence:.0%})"
                  for r in worst.itertuples()]
        tracking.log_figure(plots.image_grid(list(worst["abs_path"]), titles, title="Most confident mistakes"),
                            "misclassified.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{split}_predictions.csv"
        predictions.drop(columns=["abs_path"], errors="ignore").to_csv(path, index=False)
        mlflow.log_artifact(str(path))
    mlflow.log_dict(metrics.json_ready(m), f"{split}_metrics.json")
    log_calibration(report, split, model_id, dataset)


def summary_lines(m: dict) -> str:
    absent = len(m["counts_scored"]) < len(m["per_class"])
    scored = f", macro over counts {','.join(map(str, m['counts_scored']))} (the others are absent)" if absent else ""
    return (f"accuracy {m['accuracy']:.4f}  macro P/R/F1 {m['precision_macro']:.4f}/{m['recall_macro']:.4f}/"
            f"{m['f1_macro']:.4f}  weighted F1 {m['f1_weighted']:.4f}  MAE {m['mae']:.3f}  RMSE {m['rmse']:.3f}  "
            f"within one {m['within_one']:.3f}  (n={m['n']}{scored})")


def model_card(cfg, test_metrics: dict | None, datasets: dict, model_uri: str) -> str:
    """A registered version's description (markdown): what it was trained on, how well it counts, how it
    decodes, and what it is not for."""
    sizes = ", ".join(f"{split} {dataset.profile.get('num_rows', '?') if dataset.profile else '?'}"
                      for split, dataset in datasets.items())
    digests = ", ".join(f"{split} `{dataset.digest}`" for split, dataset in datasets.items())
    scores = "not measured (no test split)"
    if test_metrics is not None:
        scores = ", ".join(f"{k} {test_metrics[k]:.3f}" for k in ("accuracy", "f1_macro", "mae", "within_one"))
        scores += f" on {test_metrics['n']} test photos"
    return "\n".join([
        f"**{cfg.backbone} · recipe {cfg.recipe} · {cfg.head} head** ({model_uri})",
        "",
        f"- **Data**: Amazon Bin Image Dataset photos from `{cfg.data}` (images: {sizes}; digests: {digests}); "
        "labels are EXPECTED_QUANTITY, the quantity the warehouse system records. Licence of the ABID photos: "
        "CC BY-NC-SA 3.0 US.",
        f"- **Test metrics**: {scores}. The cross-validated figures with their intervals are in "
        "experiments/studies/recipes_crossval/crossval.md.",
        f"- **Input**: base64 JPEG/PNG in an `image` column, {cfg.image_size} px, "
        f"{'4 test-time views averaged' if cfg.tta else 'one view'}; decoding `{cfg.decode}`.",
        "- **Request limits**: bytes per image BIN_COUNTER_MAX_IMAGE_BYTES (every caller); no row limit in the "
        "model (in-process and Spark batches of any size); requests bounded at the server: `bin-counter serve` "
        "(BIN_COUNTER_MAX_REQUEST_BYTES, BIN_COUNTER_MAX_REQUEST_ROWS), a SageMaker endpoint's 6 MB.",
        f"- **Serving**: {cfg.serve_device} — "
        f"{'ONNX Runtime, requirements without torch' if cfg.serve_device == 'cpu' else 'PyTorch with AMP'}.",
        "- **Intended use**: counting 1–5 objects in ABID-like bin photos and choosing which bins a person checks. "
        "**Known limits**: right about one time in three on unseen photos; counts outside the classes (empty bins, "
        "dozens) are answered with the nearest class.",
    ])
