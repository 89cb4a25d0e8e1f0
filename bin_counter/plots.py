"""matplotlib figures: what people would rather look at than read. Each function returns a Figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bin_counter.core.abid import read_image


def subplots(*grid: int, figsize: tuple[float, float], **options):
    """A figure outside pyplot: no GUI backend to choose (servers, CI, SageMaker) and nothing global to close."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **options)


def class_histogram(manifest: pd.DataFrame, classes: list[int]):
    table = manifest.groupby(["count", "split"]).size().unstack(fill_value=0).reindex(classes, fill_value=0)
    fig, ax = subplots(figsize=(7, 4))
    table.plot.bar(ax=ax, rot=0)
    ax.set_xlabel("objects in bin (EXPECTED_QUANTITY)")
    ax.set_ylabel("images")
    ax.set_title("Class balance per split")
    fig.tight_layout()
    return fig


def confusion_matrices(matrix: np.ndarray, classes: list[int]):
    """Counts beside the row-normalised matrix: the second shows recall per class at a glance."""
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    fig, axes = subplots(1, 2, figsize=(11, 4.6))
    for ax, values, title, fmt in ((axes[0], matrix, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
        image = ax.imshow(values, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted count")
        ax.set_ylabel("true count")
        ax.set_title(f"Confusion matrix ({title})")
        threshold = values.max() / 2 if values.max() else 0.5
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, format(value, fmt), ha="center", va="center",
                    color="white" if value > threshold else "black", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def per_class_bars(per_class: pd.DataFrame):
    fig, ax = subplots(figsize=(7, 4))
    per_class.set_index("class")[["precision", "recall", "f1"]].plot.bar(ax=ax, rot=0)
    ax.set_ylim(0, 1)
    ax.set_xlabel("objects in bin")
    ax.set_title("Per-class precision, recall and F1")
    fig.tight_layout()
    return fig


def history(frame: pd.DataFrame):
    """Train/validation loss and accuracy per epoch; the best epoch is marked."""
    fig, axes = subplots(1, 2, figsize=(11, 4))
    best = frame["val_loss"].idxmin()
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(frame["epoch"], frame[f"train_{metric}"], marker="o", label="train")
        ax.plot(frame["epoch"], frame[f"val_{metric}"], marker="o", label="validation")
        ax.axvline(frame.loc[best, "epoch"], color="grey", linestyle="--", label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    return fig


def image_grid(paths: list[str], titles: list[str], columns: int = 6, title: str = ""):
    rows = max(1, -(-len(paths) // columns))
    fig, axes = subplots(rows, columns, figsize=(2.4 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, caption in zip(axes.flat, paths, titles):
        ax.imshow(read_image(path))  # the one decoder: JPEG/PNG only, upright by EXIF
        ax.set_title(caption, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def comparison_bars(table: pd.DataFrame, metrics: list[str], label: str = "backbone"):
    fig, ax = subplots(figsize=(8, 4))
    table.set_index(label)[metrics].T.plot.bar(ax=ax, rot=0)
    ax.set_ylim(0, 1)
    ax.set_title("Test-split metrics")
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_diagram(table: pd.DataFrame, ece: float):
    """Accuracy against confidence per bin: on the diagonal, a count said with 60% is right 60% of the time."""
    fig, ax = subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    ax.bar(table["confidence"], table["accuracy"], width=0.08, alpha=0.7, label="accuracy per bin")
    for row in table.itertuples():
        ax.annotate(str(row.images), (row.confidence, row.accuracy), ha="center", va="bottom", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the most likely count")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (top-label ECE {ece:.3f}; labels: images per bin)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def risk_coverage(table: pd.DataFrame):
    """Accuracy of the bins accepted without a check, against the share accepted (least certain sent first)."""
    fig, ax = subplots(figsize=(6, 4.5))
    ax.plot(table["coverage"], table["accuracy"], marker="o")
    ax.axhline(table["accuracy"].iloc[-1], color="grey", linestyle="--", label="accept every bin")
    ax.set_xlabel("share of bins accepted without a check")
    ax.set_ylabel("accuracy of the accepted bins")
    ax.set_title("Risk-coverage: the least certain bins go to people first")
    ax.legend()
    fig.tight_layout()
    return fig
