"""Epoch time of the classifier trained on cached features vs the full forward pass, one run, on the sample.

    python experiments/benchmarks/bench_feature_cache.py
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bin_counter.commands.prepare import build_data_dir  # noqa: E402
from bin_counter.commands.train import split_frames  # noqa: E402
from bin_counter.config import PrepareConfig, TrainConfig  # noqa: E402
from bin_counter.core.models import create_model, freeze  # noqa: E402
from bin_counter.core.training import build_loaders, make_optimizer, train_one_epoch  # noqa: E402


def epoch_seconds(cfg: TrainConfig, frames, classes) -> tuple[float, float]:
    """(first epoch incl. any feature extraction, a later epoch)."""
    model = create_model(cfg.backbone, len(classes))
    freeze(model, 0)
    start = time.perf_counter()
    loaders = build_loaders(cfg, model, frames, classes, torch.device("cpu"))
    optimizer = make_optimizer(cfg, model, loaders.net)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(loaders.net, nn.CrossEntropyLoss(), optimizer, loaders.train, torch.device("cpu"), scaler)
    first = time.perf_counter() - start
    later = train_one_epoch(loaders.net, nn.CrossEntropyLoss(), optimizer, loaders.train, torch.device("cpu"), scaler)
    return first, later["seconds"]


def main() -> None:
    logging.disable(logging.WARNING)
    data = Path(tempfile.mkdtemp()) / "data"
    build_data_dir(PrepareConfig(out=str(data), workers=2))
    frames = {k: v for k, v in split_frames(str(data)).items() if k != "test"}
    classes = [1, 2, 3, 4, 5]
    cached_cfg = TrainConfig(data=str(data), cache_dir=str(data.parent / "cache"), feature_views=4)
    full_cfg = TrainConfig(data=str(data), feature_cache=False)
    c_first, c_later = epoch_seconds(cached_cfg, frames, classes)
    f_first, f_later = epoch_seconds(full_cfg, frames, classes)
    n = len(frames["train"])
    print(f"train images {n}, backbone {cached_cfg.backbone}, CPU threads {torch.get_num_threads()}")
    print(f"full forward : epoch {f_later:.2f} s ({n / f_later:.1f} img/s)")
    print(f"feature cache: first epoch {c_first:.2f} s (extracts {cached_cfg.feature_views} views), "
          f"later epoch {c_later:.4f} s ({n / c_later:.0f} img/s)")
    print(f"later epoch speed-up: {f_later / c_later:.0f}x; the cache pays for itself after "
          f"{c_first / f_later:.1f} full-forward epochs")


if __name__ == "__main__":
    main()
