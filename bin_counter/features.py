"""The frozen-backbone feature cache.

While the backbone is frozen its output for a given image and augmentation never changes, so we compute it
once per image and view (a few randomly rotated views per training image, one plain view for evaluation) and
train the classifier on the stored features. The cache key covers everything that changes the features:
backbone, weights, preprocessing, views, seed and the images' checksums.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from bin_counter import distributed
from bin_counter.data import ManifestImages, make_loader
from bin_counter.files import atomic_path
from bin_counter.models import CountingModel

log = logging.getLogger(__name__)


def cache_key(frame: pd.DataFrame, description: dict) -> str:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for image_id, sha in zip(frame["image_id"], frame["sha256"]):
        digest.update(f"{image_id}:{sha};".encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def extract(model: CountingModel, frame: pd.DataFrame, classes: list[int], transform, views: int, batch_size: int,
            num_workers: int, seed: int, device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, views, D) and a mask (N,) of the images that could be read."""
    model.backbone.eval()
    dataset = ManifestImages(frame, classes, transform)
    features: torch.Tensor | None = None
    ok = torch.zeros(len(dataset), dtype=torch.bool)
    use_amp = device.type == "cuda"
    for view in range(views):
        loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, seed=seed * 1000 + view)
        torch.manual_seed(seed * 1000 + view)  # the rotations of view k are the same on every run
        for batch in tqdm(loader, desc=f"{desc} features (view {view + 1}/{views})", unit="batch", leave=False):
            if batch is None:
                continue
            images, _, indices = batch
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                out = model.features(images).float().cpu()
            if features is None:
                features = torch.zeros(len(dataset), views, out.shape[1])
            features[indices, view] = out
            ok[indices] = True
    if features is None:
        raise ValueError(f"no readable image in the {desc} split")
    return features, ok


def cached_features(model: CountingModel, frame: pd.DataFrame, classes: list[int], transform, views: int,
                    description: dict, cache_dir: Path | None, batch_size: int, num_workers: int, seed: int,
                    device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load features from the cache or compute and store them (float16 on disk: half the size, same accuracy)."""
    key = cache_key(frame, {**description, "views": views, "seed": seed})
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    if path is not None and path.exists():
        stored = torch.load(path, weights_only=True)
        log.info("%s features loaded from cache %s", desc, path)
        return stored["features"].float(), stored["ok"]
    ctx = distributed.current()
    if ctx.enabled:  # each rank extracts every world-th image, then all ranks share the whole set
        mine = torch.arange(ctx.rank, len(frame), ctx.world)
        part, part_ok = extract(model, frame.iloc[mine.numpy()].reset_index(drop=True), classes, transform, views,
                                batch_size, num_workers, seed, device, f"{desc} (rank {ctx.rank})")
        features = distributed.gather_rows(part, mine, len(frame))
        ok = distributed.gather_rows(part_ok, mine, len(frame))
    else:
        features, ok = extract(model, frame, classes, transform, views, batch_size, num_workers, seed, device, desc)
    # Train on what the cache holds, so a fresh run and a cached rerun give the same model.
    features = features.half().float()
    if path is not None and ctx.main:
        with atomic_path(path) as tmp:
            torch.save({"features": features.half(), "ok": ok}, tmp)
    return features, ok


class FeatureViews(Dataset):
    """(feature, label) pairs; in training each epoch draws one of the cached augmented views at random."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor, random_view: bool):
        keep = ok.nonzero().flatten()
        self.features, self.labels, self.indices = features[keep], labels[keep], keep
        self.random_view = random_view

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        views = self.features.shape[1]
        view = int(torch.randint(views, ())) if self.random_view and views > 1 else 0
        return self.features[i, view], self.labels[i], self.indices[i]
