"""Classification and counting metrics (scikit-learn), and the study's printed lines."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

# SageMaker metric definitions parse these lines; keep the labels exactly as the study printed them.
STUDY_REGEXES = {
    "Average loss": r"Average loss: ([0-9\.]+)",
    "Accuracy": r"Accuracy: ([0-9\.]+)",
    "Precision": r"Precision: ([0-9\.]+)",
    "Recall": r"Recall: ([0-9\.]+)",
    "F1 Score": r"F1 Score: ([0-9\.]+)",
}


def decode(probs: np.ndarray, classes: list[int], how: str = "argmax", cost: float = 1.0,
           tail_boost: float = 0.0) -> np.ndarray:
    """Counts from class probabilities.

    argmax: the most likely count. expected: the count nearest the expected count (lower MAE, but the end counts
    are rarely predicted). ordinal: the count k minimising the expected cost sum_j p_j ([k != j] + cost * |k - j|),
    so being off by three costs more than being off by one; the end counts' probabilities are first raised by
    exp(tail_boost) because an ordinal cost pulls every hesitation towards the middle."""
    values = np.asarray(classes)
    probs = np.asarray(probs, dtype=float)
    if how == "expected":
        expected = probs @ values
        return values[np.abs(expected[:, None] - values[None, :]).argmin(1)]
    if how == "ordinal":
        boost = np.ones(len(values))
        boost[[0, -1]] = np.exp(tail_boost)
        weighted = probs * boost
        distance = np.abs(values[:, None] - values[None, :]).astype(float)
        costs = weighted @ ((distance > 0) + cost * distance).T  # (N, K): expected cost of answering each count
        return values[costs.argmin(1)]
    return values[probs.argmax(1)]


def classification_metrics(y_true, y_pred, classes: list[int]) -> dict:
    """Accuracy, macro/weighted P/R/F1, per-class table, confusion matrix, and the ordinal errors.

    Labels are counts (not class indices), so RMSE/MAE are in objects per bin. Macro averages are over the counts
    present in y_true (`counts_scored`): a count the split lacks has no recall to average, and scoring it 0 would
    put perfect predictions at 0.8. The per-class table keeps every class.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    present = [c for c in classes if c in set(y_true.tolist())]
    out: dict = {"accuracy": float(accuracy_score(y_true, y_pred)), "n": int(len(y_true)), "counts_scored": present}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=present or classes, average=average,
                                                     zero_division=0)
        out.update({f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)})
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, average=None, zero_division=0)
    out["per_class"] = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})
    out["confusion"] = confusion_matrix(y_true, y_pred, labels=classes)
    error = y_pred - y_true
    out["rmse"] = float(np.sqrt(np.mean(error ** 2)))
    out["mae"] = float(np.mean(np.abs(error)))
    out["within_one"] = float(np.mean(np.abs(error) <= 1))
    return out


HEADLINE = ("accuracy", "f1_macro", "mae")  # what the runs table and a promotion look at first


def metric_key(split: str, name: str) -> str:
    """One vocabulary for every run: `test/accuracy`, `val/loss`, `train/loss`. MLflow's chart view groups keys by
    the part before the `/` (as it does for `system/`), so each split's figures sit together."""
    return f"{split}/{name}"


def per_class_key(split: str, name: str, count: int) -> str:
    """Per-count figures get a group of their own, so they do not bury the headline ones."""
    return f"{split}_per_class/{name}_{count}"


# The names logged before 0.2 (`test_accuracy`, `candidate_f1_macro`...), accepted where a user names a metric.
def bare_metric_name(name: str) -> str:
    """`test/f1_macro`, `test_f1_macro` or `f1_macro` -> `f1_macro`: the quantity, whatever split named it."""
    name = name.split("/", 1)[-1]
    for old_prefix in ("test_", "val_", "candidate_", "champion_", "best_test_"):
        if name.startswith(old_prefix) and name[len(old_prefix):]:
            return name[len(old_prefix):]
    return name


def scalar_metrics(metrics: dict, split: str) -> dict[str, float]:
    """The numbers of `classification_metrics` flattened for mlflow.log_metrics under the split's names."""
    flat = {metric_key(split, k): v for k, v in metrics.items() if isinstance(v, (int, float))}
    table = metrics["per_class"]
    for name in ("precision", "recall", "f1"):
        for count, value in zip(table["class"], table[name]):
            flat[per_class_key(split, name, int(count))] = float(value)
    return flat


def majority_baseline(train_counts, test_counts) -> float:
    """Accuracy of always answering the most common training count."""
    values, frequency = np.unique(np.asarray(train_counts), return_counts=True)
    return float(np.mean(np.asarray(test_counts) == values[frequency.argmax()]))


def study_lines(loss: float, metrics: dict) -> str:
    return "\n".join([
        f"Average loss: {loss:.4f}",
        f"Accuracy: {metrics['accuracy']:.4f}",
        f"Precision: {metrics['precision_macro']:.4f}",
        f"Recall: {metrics['recall_macro']:.4f}",
        f"F1 Score: {metrics['f1_macro']:.4f}",
    ])


def json_ready(metrics: dict) -> dict:
    """What `evaluate --output` writes: plain numbers, per_class keyed by count."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    out["per_class"] = {
        str(int(row["class"])): {"precision": row["precision"], "recall": row["recall"], "f1": row["f1"],
                                 "support": int(row["support"])}
        for _, row in metrics["per_class"].iterrows()
    }
    out["confusion_matrix"] = metrics["confusion"].tolist()
    if "sets_per_count" in metrics:
        out["count_sets"] = {str(int(r["count"])): {"coverage": r["coverage"], "mean_set_size": r["mean_set_size"],
                                                    "images": int(r["images"])}
                             for _, r in metrics["sets_per_count"].iterrows()}
    out["counts_scored"] = [int(c) for c in metrics["counts_scored"]]
    return out
