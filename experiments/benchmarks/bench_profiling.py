"""Overhead of the debugger rules and of `--profile`, as ratios from one run on the same data.

    python experiments/benchmarks/bench_profiling.py
The SGD head's full forward pass (no feature cache) on a slice of the bundled sample, 2 epochs each; the profiler
only covers the first epoch (the solved head's profile is a feature pass: see README, Profiling). Rules run on
every epoch in every configuration (they read values training already computes), so their cost is measured
directly.
"""
from __future__ import annotations

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

from bin_counter.commands.prepare import build_data_dir  # noqa: E402
from bin_counter.commands.train import train  # noqa: E402
from bin_counter.config import PrepareConfig, TrainConfig  # noqa: E402
from bin_counter.core.debugger import Rules  # noqa: E402


def timed(cfg: TrainConfig) -> float:
    start = time.perf_counter()
    with redirect_stdout(StringIO()):
        train(cfg, save_model=False)
    return time.perf_counter() - start


def main() -> None:
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp())
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    data = work / "data"
    build_data_dir(PrepareConfig(out=str(data), limit_per_class=16, workers=2))
    base = TrainConfig(data=str(data), head="sgd", epochs=2, feature_cache=False, num_workers=2, batch_size=16)
    timed(base)  # warm-up: page cache, lazy imports
    plain = timed(base)
    profiled = timed(TrainConfig(**{**base.__dict__, "profile": True}))
    rules, history = Rules(), []
    start = time.perf_counter()
    for epoch in range(1, 1001):
        history.append({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.0 + epoch % 3, "grad_norm": 0.5})
        rules.check_epoch(history[-10:])
    per_epoch_us = (time.perf_counter() - start) / 1000 * 1e6
    print(f"train, 2 epochs, full forward, {base.batch_size}-image batches on {16 * 5 * 0.8:.0f} images:")
    print(f"  plain {plain:.1f} s, --profile {profiled:.1f} s: --profile costs {profiled / plain:.2f}x")
    print(f"  debugger rules: {per_epoch_us:.0f} us per epoch = {per_epoch_us / 1e6 / (plain / 2):.1e} of an epoch")


if __name__ == "__main__":
    main()
