"""Wall time of a 5-trial `tune` (feature cache shared by the trials) vs the same 5 configurations trained
without the cache (full forward pass every epoch), one run.

    python experiments/benchmarks/bench_tune.py [--per-class 20] [--trials 5]
The study's search space is used as is (epochs 5-15), on a class-balanced slice of the bundled sample.
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
import optuna  # noqa: E402

from bin_counter.commands.prepare import prepare  # noqa: E402
from bin_counter.commands.train import train  # noqa: E402
from bin_counter.commands.tune import SearchSpace, TuneConfig, tune  # noqa: E402
from bin_counter.config import PrepareConfig, TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp())
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    mlflow.set_experiment("bench-tune")
    data = work / "data"
    prepare(PrepareConfig(out=str(data), limit_per_class=args.per_class, workers=2))
    base = TrainConfig(data=str(data), cache_dir=str(work / "cache"), num_workers=2)
    storage = f"sqlite:///{work / 'optuna.db'}"

    start = time.perf_counter()
    with redirect_stdout(StringIO()):
        tune(TuneConfig(base=base, space=SearchSpace(), n_trials=args.trials, storage=storage, study_name="bench"))
    tuned = time.perf_counter() - start
    trials = optuna.load_study(study_name="bench", storage=storage).trials
    configs = [t.params for t in trials]
    epochs = [t.params["epochs"] for t in trials]

    start = time.perf_counter()
    with redirect_stdout(StringIO()):
        for params in configs:
            train(dataclasses.replace(base, feature_cache=False, **params), save_model=False)
    uncached = time.perf_counter() - start
    print(f"{len(configs)} trials on {args.per_class * 5} images (epochs {epochs}, pruned trials run to the end "
          f"without the cache)")
    print(f"tune with feature cache (incl. extraction, best-config training, evaluation): {tuned:.1f} s")
    print(f"the same {len(configs)} configurations without the cache: {uncached:.1f} s")
    print(f"speed-up: {uncached / tuned:.1f}x")


if __name__ == "__main__":
    main()
