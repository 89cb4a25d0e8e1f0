"""`tune --n-trials 8` (the model search) on a prepared ABID set: its wall time beside the distinct feature passes
its trials needed, and what a trial costs when it shares a pass against one that needs a new pass. With --study,
also the study's search with the feature cache against the same configurations trained without it, one run.

    python experiments/benchmarks/bench_tune.py [--source sample|DIR] [--per-class N] [--trials 8] [--study]
The dev sample: --source ../shared/abid-sample (1,481 images); --per-class keeps a class-balanced slice of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402

from bin_counter.commands.prepare import build_data_dir  # noqa: E402
from bin_counter.commands.train import train  # noqa: E402
from bin_counter.commands.tune import SearchSpace, TuneConfig, tune  # noqa: E402
from bin_counter.config import RECIPES, PrepareConfig, TrainConfig  # noqa: E402


def model_search(base: TrainConfig, trials: int, storage: str) -> None:
    start = time.perf_counter()
    with redirect_stdout(StringIO()):
        out = tune(TuneConfig(base=base, space=SearchSpace(), n_trials=trials, storage=storage, study_name="model"))
    total = time.perf_counter() - start
    parent = mlflow.get_run(out["parent_run_id"]).data
    done = [t for t in optuna.load_study(study_name="model", storage=storage).trials if "seconds" in t.user_attrs]
    shared = [t.user_attrs["seconds"] for t in done if t.user_attrs["new_feature_passes"] == 0]
    new = [t.user_attrs["seconds"] for t in done if t.user_attrs["new_feature_passes"] > 0]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in done)
    searched = parent.metrics["tune/search_seconds"]
    print(f"tune --n-trials {trials} (model search): {total:.1f} s in all; the search {searched:.1f} s, then the "
          f"chosen configuration trained by `train` and evaluated: {total - searched:.1f} s")
    print(f"distinct feature passes: {int(parent.metrics['tune/feature_passes'])} for {len(done)} trials "
          f"({pruned} pruned; an SGD-head trial needs two: evaluation and training views)")
    print(f"a trial needing a new pass: median {np.median(new) if new else float('nan'):.1f} s ({len(new)} trials); "
          f"a trial sharing its passes: median {np.median(shared) if shared else float('nan'):.2f} s ({len(shared)})")
    for t in done:
        figures = (f"accuracy {t.user_attrs['accuracy']:.3f}, MAE {t.user_attrs['mae']:.3f}" if "mae" in t.user_attrs
                   else "pruned")
        print(f"  trial {t.number}: {t.user_attrs['seconds']:6.1f} s, new passes {t.user_attrs['new_feature_passes']}, "
              f"{figures}, {t.params}")
    print(f"chosen: {parent.tags['chosen']} (paired gain {parent.metrics['tune/paired_gain']:+.4f} ± "
          f"{parent.metrics['tune/paired_standard_error']:.4f}); test accuracy {out['test']['accuracy']:.3f}, "
          f"MAE {out['test']['mae']:.3f}")


def study_search(base: TrainConfig, trials: int, storage: str) -> None:
    study_base = dataclasses.replace(base, **RECIPES["study"])
    start = time.perf_counter()
    with redirect_stdout(StringIO()):
        tune(TuneConfig(base=study_base, space=SearchSpace(), n_trials=trials, storage=storage, study_name="study",
                        search="study"))
    tuned = time.perf_counter() - start
    configs = [t.params for t in optuna.load_study(study_name="study", storage=storage).trials]
    start = time.perf_counter()
    with redirect_stdout(StringIO()):
        for params in configs:
            train(dataclasses.replace(study_base, feature_cache=False, **params), save_model=False)
    uncached = time.perf_counter() - start
    print(f"study search, {len(configs)} trials (epochs {[c['epochs'] for c in configs]}): with the feature cache "
          f"{tuned:.1f} s (incl. extraction, best-config training, evaluation); the same configurations without it "
          f"{uncached:.1f} s; speed-up {uncached / tuned:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="sample")
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--study", action="store_true", help="also the study's search, cached vs not")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp())
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    mlflow.set_experiment("bench-tune")
    data = work / "data"
    manifest = build_data_dir(PrepareConfig(source=args.source, out=str(data), limit_per_class=args.per_class,
                                           workers=2)).manifest
    print(f"{len(manifest)} images of {args.source} ({os.cpu_count()} CPUs)")
    base = TrainConfig(data=str(data), cache_dir=str(work / "cache"), num_workers=2)
    storage = f"sqlite:///{work / 'optuna.db'}"
    model_search(base, args.trials, storage)
    if args.study:
        study_search(base, 5, storage)


if __name__ == "__main__":
    main()
