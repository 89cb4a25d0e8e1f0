"""compare: the study's comparison — each backbone trained and evaluated on the same split and seed, as child
runs of one parent whose table and bar chart sit side by side like the study's results."""
from __future__ import annotations

import dataclasses
import logging

import pandas as pd

from bin_counter import plots, tracking
from bin_counter.commands.evaluate import evaluate_into_run, summary_lines
from bin_counter.commands.train import train
from bin_counter.config import TrainConfig
from bin_counter.core.models import backbone_spec

log = logging.getLogger(__name__)
TABLE_METRICS = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "mae", "rmse", "within_one"]


def compare(base: TrainConfig, backbones: list[str]) -> pd.DataFrame:
    for name in backbones:
        backbone_spec(name)  # an unknown name fails before any training
    rows = []
    with tracking.run("compare") as parent:
        tracking.log_params({"backbones": ",".join(backbones), "data": base.data, "seed": base.seed})
        for name in backbones:
            cfg = dataclasses.replace(base, backbone=name, run_name=f"compare-{name}")
            result = train(cfg)
            report = evaluate_into_run(result.run_id, result.model_uri, base.data)
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
