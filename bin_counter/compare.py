"""compare: the study's comparison — each backbone trained and evaluated on the same split and seed, as child
runs of one parent whose table and bar chart sit side by side like the study's results."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import mlflow
import pandas as pd

from bin_counter import plots, tracking
from bin_counter.config import TrainConfig
from bin_counter.evaluate import evaluate_model, load_model, log_report, summary_lines
from bin_counter.manifest import read_manifest
from bin_counter.prepare import read_classes
from bin_counter.train import train

log = logging.getLogger(__name__)
TABLE_METRICS = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "mae", "rmse", "within_one"]


def compare(base: TrainConfig, backbones: list[str]) -> pd.DataFrame:
    classes = read_classes(Path(base.data))
    test = read_manifest(Path(base.data), "test")
    rows = []
    with tracking.run("compare") as parent:
        mlflow.log_params({"backbones": ",".join(backbones), "data": base.data, "seed": base.seed})
        for name in backbones:
            cfg = dataclasses.replace(base, backbone=name, run_name=f"compare-{name}")
            result = train(cfg)
            report = evaluate_model(load_model(result.model_uri), test, classes)
            with mlflow.start_run(run_id=result.run_id, nested=True):  # the evaluation joins the child's run
                log_report(report)
            print(f"{name}: {summary_lines(report.metrics)}")
            rows.append({"backbone": name, "run_id": result.run_id,
                         **{k: round(report.metrics[k], 4) for k in TABLE_METRICS}})
        table = pd.DataFrame(rows)
        tracking.log_frame(table, "comparison")
        tracking.log_figure(plots.comparison_bars(table, ["accuracy", "precision_macro", "recall_macro", "f1_macro"]),
                            "comparison.png")
        print(table.drop(columns=["run_id"]).to_markdown(index=False))
        print(f"run_id: {parent.info.run_id}")
    return table
