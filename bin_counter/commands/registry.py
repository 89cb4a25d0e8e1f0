"""promote: move the `champion` alias only to a model version that beats the current champion on the same data.

Both versions are evaluated on the same test split; the decision, both scores and the data digest are recorded as
tags of the candidate version, so the registry itself says why an alias moved (or did not).
"""
from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from bin_counter import BinCounterError, tracking
from bin_counter.commands.evaluate import evaluate_model
from bin_counter.config import PromoteConfig
from bin_counter.core import metrics
from bin_counter.core.manifest import read_split
from bin_counter.serving.model import load_model

log = logging.getLogger(__name__)
LOWER_IS_BETTER = {"mae", "rmse"}
PROMOTABLE = ("f1_macro", "accuracy", "mae", "rmse", "within_one", "precision_macro", "recall_macro", "f1_weighted")
CHAMPION, CHALLENGER = "champion", "challenger"


def candidate_version(client: mlflow.MlflowClient, name: str, version: str | None, run_id: str | None):
    """The version named, the version of a run (registered now if it is not yet), or the newest one."""
    try:
        if version:
            return client.get_model_version(name, str(version))
        if run_id:
            found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
            if found:
                return max(found, key=lambda v: int(v.version))
            return mlflow.register_model(f"runs:/{run_id}/model", name)
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise BinCounterError(f"model {name!r}: {exc.message.splitlines()[0]}") from None
    if not found:
        raise BinCounterError(f"registered model {name!r} has no versions; train with --register-as {name}")
    return max(found, key=lambda v: int(v.version))


def current_champion(client: mlflow.MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def score(name: str, version, frame, classes, metric: str, role: str, dataset) -> float:
    """The version's `metric` on the split, logged as `<role>/<metric>` and linked to the version's model."""
    model = load_model(f"models:/{name}/{version.version}")
    report = evaluate_model(model, frame, classes)
    value = float(report.metrics[metric])
    mlflow.log_metric(metrics.metric_key(role, metric), value, model_id=tracking.linkable_model_id(model),
                      dataset=dataset)
    return value


def metric_name(metric: str) -> str:
    """The quantity a promotion compares; `test/f1_macro` and the names before 0.2 (`test_f1_macro`) say the same."""
    name = metrics.bare_metric_name(metric)
    if name not in PROMOTABLE:
        raise BinCounterError(f"unknown metric {metric!r}; use one of {', '.join(PROMOTABLE)}")
    return name


def is_better(candidate: float, champion: float, metric: str, min_gain: float) -> bool:
    gain = champion - candidate if metric in LOWER_IS_BETTER else candidate - champion
    return gain > min_gain


def promote(config: PromoteConfig) -> dict:
    """`bin-counter promote`; returns the decision and both scores."""
    name, data, min_gain = config.name, config.data, config.min_gain
    split = "test"  # both models are judged on the held-out test split
    metric = metric_name(config.metric)
    client = mlflow.MlflowClient()
    frame, classes = read_split(Path(data), split)
    candidate = candidate_version(client, name, config.version, config.run_id)
    champion = current_champion(client, name)
    with tracking.run("promote", title=tracking.run_title("promote", name, f"v{candidate.version}"), model=name):
        dataset = tracking.log_dataset(frame, str(Path(data).resolve()), f"abid-{split}", context=split)
        digest = dataset.digest
        candidate_score = score(name, candidate, frame, classes, metric, "candidate", dataset)
        champion_score = None
        if champion is None:
            decision, alias = "first champion", CHAMPION
        elif champion.version == candidate.version:
            decision, alias = "already champion", CHAMPION
            champion_score = candidate_score
        else:
            champion_score = score(name, champion, frame, classes, metric, "champion", dataset)
            better = is_better(candidate_score, champion_score, metric, min_gain)
            decision, alias = ("better than champion", CHAMPION) if better else ("not better than champion", CHALLENGER)
        client.set_registered_model_alias(name, alias, candidate.version)
        tags = {"promotion_decision": decision, "promotion_metric": metric,
                f"candidate/{metric}": f"{candidate_score:.4f}",
                "data_digest": digest, "promotion_split": split}
        if champion is not None:
            tags.update({f"champion/{metric}": f"{champion_score:.4f}", "compared_with_version": str(champion.version)})
        for key, value in tags.items():
            client.set_model_version_tag(name, candidate.version, key, value)
        tracking.log_params({"model": name, "candidate_version": candidate.version, "metric": metric,
                             "min_gain": min_gain, **({"champion_version": str(champion.version)} if champion else {})})
    versus = f" vs champion v{champion.version} {champion_score:.4f}" if champion is not None else ""
    print(f"{name} v{candidate.version}: {metric} {candidate_score:.4f}{versus} -> {decision}; alias @{alias}")
    return {"decision": decision, "alias": alias, "candidate": candidate_score, "champion": champion_score,
            "version": candidate.version}
