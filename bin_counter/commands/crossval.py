"""crossval: decide between recipes by evidence. Repeated stratified k-fold over a real ABID set, the same folds
for every recipe, reporting the mean and 95% interval of accuracy, macro F1, MAE and RMSE next to the
majority-class baseline. Each fold is a child MLflow run; the table lands in the parent run and, with --output,
in a markdown file (experiments/studies/recipes_crossval/crossval.md is made this way)."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split

from bin_counter import BinCounterError, plots, tracking
from bin_counter.commands.prepare import build_data_dir
from bin_counter.commands.train import train
from bin_counter.config import RECIPES, CrossvalConfig, PrepareConfig
from bin_counter.core import metrics
from bin_counter.core.files import atomic_write_text
from bin_counter.core.manifest import DATASET_JSON, MANIFEST, classes_of, write_csv

log = logging.getLogger(__name__)
SHOWN = ["accuracy", "f1_macro", "mae", "rmse", "recall per count", "min per fold"]
REPORTED = ["accuracy", "f1_macro", "mae", "rmse"]
# what the calibration and the conformal sets are judged on, on test folds they were not fitted on
EVIDENCE = ["accuracy_uncalibrated", "mae_uncalibrated", "ece_uncalibrated", "ece_top_label", "ece_pooled",
            "ece_classwise",
            "coverage_80", "set_size_80", "coverage_90", "set_size_90", "suspect_correct", "caught_off_by_one",
            "caught_off_by_two", "accuracy_top80_entropy", "accuracy_top80_confidence"]
FALSE_ALARM = 0.05


def fold_row(recipe: str, fold: int, m: dict, minutes: float = 0.0) -> dict:
    """One recipe on one fold: the reported metrics, each count's recall (no count may be given up) and the
    wall-clock minutes it took (features are cached, so the first recipe of a fold pays for extraction)."""
    recalls = {f"recall_{c}": float(r) for c, r in zip(m["per_class"]["class"], m["per_class"]["recall"])}
    return {"recipe": recipe, "fold": fold, **{k: m[k] for k in REPORTED}, **recalls, "minutes": minutes}


def simulated_records(truth: np.ndarray, classes: list[int], rng: np.random.Generator, off: int) -> np.ndarray:
    """Class indices of records that are right (off=0), off by exactly one, or off by two or more (off=2), drawn
    among the counts the model knows, so the check is judged on records it could be fooled by."""
    k = len(classes)
    out = np.empty(len(truth), dtype=int)
    for i, y in enumerate(truth):
        choices = [j for j in range(k) if (abs(j - y) == 1 if off == 1 else abs(j - y) >= 2 if off == 2 else j == y)]
        out[i] = rng.choice(choices) if choices else -1
    return out


def calibration_evidence(test: dict, calibration, classes: list[int], decoding: dict, seed: int) -> dict:
    """Before and after calibration, the count sets at 0.8 and 0.9, the record check at 5% false alarms on
    simulated records, and how well two uncertainty scores rank the errors (accuracy of the 80% most certain)."""
    from bin_counter.core import calibration as cal

    raw, truth = test["raw_probs"], test["y_true"]
    calibrated = calibration.probabilities(raw)
    raw_pred = np.searchsorted(classes, metrics.decode(raw, classes, **decoding))
    values = np.asarray(classes)
    out = {"accuracy_uncalibrated": float((raw_pred == truth).mean()),
           "mae_uncalibrated": float(np.abs(values[raw_pred] - values[truth]).mean()),
           "ece_uncalibrated": cal.top_label_ece(raw, truth), "ece_top_label": cal.top_label_ece(calibrated, truth),
           "ece_classwise": cal.classwise_ece(calibrated, truth)}
    for coverage in (0.8, 0.9):
        members = calibration.count_sets(calibrated, coverage)
        out[f"coverage_{round(coverage * 100)}"] = float(members[np.arange(len(truth)), truth].mean())
        out[f"set_size_{round(coverage * 100)}"] = float(members.sum(1).mean())
    p_values = calibration.record_p_values(calibrated)
    rng = np.random.default_rng(seed)
    for name, off in (("suspect_correct", 0), ("caught_off_by_one", 1), ("caught_off_by_two", 2)):
        records = simulated_records(truth, classes, rng, off)
        judged = records >= 0
        out[name] = float((p_values[np.flatnonzero(judged), records[judged]] < FALSE_ALARM).mean())
    predicted = np.searchsorted(classes, metrics.decode(calibrated, classes, **decoding))
    correct = predicted == truth
    for name, uncertainty in (("entropy", cal.entropy(calibrated)),
                              ("confidence", -calibrated[np.arange(len(truth)), predicted])):
        kept = np.argsort(uncertainty, kind="stable")[:int(round(0.8 * len(truth)))]
        out[f"accuracy_top80_{name}"] = float(correct[kept].mean())
    return out


def pooled_ece(folds: list | None) -> float:
    """Top-label ECE over every test fold's predictions at once: a fold of ~300 photos alone reads about 0.045 for
    perfectly calibrated probabilities (binning noise), all 1,481 x 2 about 0.015."""
    from bin_counter.core.calibration import top_label_ece

    if not folds:
        return float("nan")
    return top_label_ece(np.concatenate([p for p, _ in folds]), np.concatenate([y for _, y in folds]))


def fold_dir(work: Path, manifest: pd.DataFrame, train_idx, test_idx, seed: int, name: str) -> Path:
    """A DATA_DIR for one fold: the test fold, a stratified 10% of the rest for validation, the rest to train."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    labels = manifest["count"].iloc[train_idx]
    n_val = max(round(0.1 * len(train_idx)), labels.nunique())  # stratifying needs one image per count at least
    train_part, val_part = train_test_split(train_idx, test_size=n_val, random_state=seed, stratify=labels)
    frame = manifest.copy()
    frame.loc[frame.index[train_part], "split"] = "train"
    frame.loc[frame.index[val_part], "split"] = "val"
    frame.loc[frame.index[test_idx], "split"] = "test"
    write_csv(frame, out / MANIFEST)
    atomic_write_text(out / DATASET_JSON, (work / "all" / DATASET_JSON).read_text())
    if not (out / "images").exists():
        os.symlink((work / "all" / "images").resolve(), out / "images")
    return out


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t-interval half-width per recipe."""
    out = []
    for recipe, group in rows.groupby("recipe", sort=False):
        entry = {"recipe": recipe, "folds": len(group)}
        for name in [*REPORTED, *(e for e in EVIDENCE if e in group)]:
            values = group[name].to_numpy(dtype=float)
            if np.isnan(values).all():
                entry[name], entry[f"{name}_mean"] = "", float("nan")
                continue
            half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)) \
                if len(values) > 1 else float("nan")
            entry[name] = f"{values.mean():.3f} ± {half:.3f}"
            entry[f"{name}_mean"] = values.mean()
        recalls = [c for c in group.columns if c.startswith("recall_")]
        entry["recall per count"] = " / ".join(f"{group[c].mean():.2f}" for c in recalls)
        entry["min per fold"] = f"{group['minutes'].mean():.1f}"
        out.append(entry)
    return pd.DataFrame(out)


def crossval(config: CrossvalConfig) -> pd.DataFrame:
    source, recipes, folds, repeats, seed = config.source, config.recipes, config.folds, config.repeats, config.seed
    base, output, classes = config.base, config.output, config.classes
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise BinCounterError(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    if folds < 2 or repeats < 1:
        raise BinCounterError(f"--folds must be at least 2 and --repeats at least 1 (got {folds} and {repeats})")
    work = Path(".cache") / "crossval" / hashlib.sha256(f"{source}:{classes}".encode()).hexdigest()[:12]
    manifest = build_data_dir(PrepareConfig(source=source, out=str(work / "all"), split=(1.0, 0.0, 0.0),
                                            classes=classes, seed=seed)).manifest
    if manifest["count"].value_counts().min() < folds:
        raise BinCounterError(f"a count has fewer than {folds} images: use fewer --folds")
    splits = list(RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
                  .split(manifest, manifest["count"]))
    rows, pooled = [], {}
    with tracking.run("crossval", source=source):
        tracking.log_params({"source": source, "recipes": ",".join(recipes), "folds": folds, "repeats": repeats,
                           "seed": seed, "images": len(manifest)})
        for i, (train_idx, test_idx) in enumerate(splits):
            truth = manifest["count"].iloc[test_idx]
            majority = np.full(len(truth), manifest["count"].iloc[train_idx].mode().iloc[0])
            m = metrics.classification_metrics(truth, majority, sorted(manifest["count"].unique()))
            rows.append(fold_row("majority class", i, m))
            data = fold_dir(work, manifest, train_idx, test_idx, seed + i, f"fold-{i}")
            for recipe in recipes:
                cfg = dataclasses.replace(base, **RECIPES[recipe], data=str(data), run_name=f"{recipe}-fold{i}",
                                          checkpoint_dir=None, register_as=None)
                start = time.perf_counter()
                result = train(cfg, save_model=False)
                rows.append({**fold_row(recipe, i, result.test_metrics, (time.perf_counter() - start) / 60),
                             **calibration_evidence(result.test_metrics, result.calibration,
                                                    sorted(manifest["count"].unique()), cfg.decoding, seed + i)})
                pooled.setdefault(recipe, []).append((result.test_metrics["probs"], result.test_metrics["y_true"]))
                log.info("fold %d %s: accuracy %.3f, MAE %.3f", i, recipe, rows[-1]["accuracy"], rows[-1]["mae"])
        per_fold = pd.DataFrame(rows)
        table = summarise(per_fold)
        table["ece_pooled"] = [pooled_ece(pooled.get(recipe)) for recipe in table["recipe"]]
        table["ece_pooled_mean"] = table["ece_pooled"]
        tracking.log_frame(per_fold, "crossval_folds")
        tracking.log_frame(table[["recipe", "folds", *SHOWN]], "crossval")
        evidence = [e for e in EVIDENCE if e in table]
        if evidence:
            tracking.log_frame(table[["recipe", *evidence]], "crossval_calibration")
        means = pd.DataFrame({"recipe": table["recipe"], **{k: table[f"{k}_mean"] for k in ("accuracy", "f1_macro")}})
        tracking.log_figure(plots.comparison_bars(means, ["accuracy", "f1_macro"], label="recipe"), "crossval.png")
        for row in table.itertuples():
            mlflow.log_metrics({metrics.metric_key(row.recipe.replace(' ', '_'), k): getattr(row, f"{k}_mean")
                                for k in [*REPORTED, *evidence] if np.isfinite(getattr(row, f"{k}_mean"))})
    markdown = table[["recipe", "folds", *SHOWN]].to_markdown(index=False)
    if evidence:
        calibrated = table[table["recipe"] != "majority class"]
        markdown += "\n\nCalibration, count sets and record checks on the test folds (fitted on each fold's " \
                    "held-out training images, never on its test fold):\n\n" + \
            calibrated[["recipe", *evidence]].to_markdown(index=False)
    print(markdown)
    if output:
        header = (f"Repeated stratified {folds}-fold cross-validation ({repeats} repeat(s), seed {seed}) over "
                  f"{len(manifest)} images of `{source}`; mean ± 95% t-interval over folds; recall per count "
                  f"{'/'.join(map(str, classes_of(manifest)))}; wall-clock minutes per fold on this machine "
                  f"(the first recipe of a fold also extracts the features the others reuse).\n\n")
        atomic_write_text(Path(output), header + markdown + "\n")
    return table
