"""The frozen-backbone feature cache.

While the backbone is frozen its output for a given image and augmentation never changes, so we compute it
once per image and view (a few randomly rotated views per training image; one plain view, or the four flips and
transposes of test-time augmentation, for evaluation) and train the classifier on the stored features.

The cache is per image: one file per preprocessing description (backbone, weights, transform, views, the
preprocessing version and the versions of the libraries and engine that compute them), holding
the features of every image ever extracted with it, keyed by the image's checksum. A new split, fold or dataset
that shares images only computes the ones it has not seen. Each image's random views are seeded by its id, so
its features do not depend on which batch or run computed them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from bin_counter import BinCounterError
from bin_counter.core import distributed
from bin_counter.core.data import ManifestImages, dihedral_views, make_loader
from bin_counter.core.engine import feature_engine, requested_engine
from bin_counter.core.feature_store import load_store
from bin_counter.core.files import atomic_path
from bin_counter.core.models import CountingModel
from bin_counter.core.profiling import NO_PROFILE

log = logging.getLogger(__name__)


# Raised whenever decoding or the transforms change pixels, so that features of the old pixels are not reused
# (2: EXIF orientation applied by read_image).
PREPROCESSING_VERSION = 2


def description_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def engine_description(device: torch.device) -> dict:
    """What besides the settings makes the features: the preprocessing version, the libraries that decode,
    transform and run the backbone, and the engine running it (ONNX Runtime's and torch's differ in the last bits)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "torchvision", "pillow", "onnxruntime"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    onnx = requested_engine() != "torch" and (requested_engine() == "onnx" or device.type != "cuda")
    return {"preprocessing": PREPROCESSING_VERSION, "versions": versions, "engine": "onnx" if onnx else "torch"}


def extract(model: CountingModel, frame: pd.DataFrame, classes: list[int], transform, *, desc: str, **options):
    """Features (N, views, D) and a mask (N,) of the images that could be read.

    Random views are seeded per image and view; with `tta` the views are the 4 flips/transposes of one image.
    `profiler` (core.profiling.Profile) times the wait for decoded, resized batches against the model's forward."""
    features, ok = _extract(model, frame, classes, transform, desc=desc, **options)
    if features is None:
        raise no_readable_image(desc, len(frame))
    return features, ok


def no_readable_image(desc: str, listed: int) -> BinCounterError:
    return BinCounterError(f"no readable image in the {desc} split ({listed} listed; the warnings above say why each "
                           "was skipped)")


def _extract(model: CountingModel, frame: pd.DataFrame, classes: list[int], transform, *, views: int,
             batch_size: int, num_workers: int, seed: int, device: torch.device, desc: str, tta: bool = False,
             profiler=NO_PROFILE):
    """extract's features, or None for them when no image of `frame` could be read (an empty share included)."""
    features: torch.Tensor | None = None
    ok = torch.zeros(len(frame), dtype=torch.bool)
    n_views = 4 if tta else views
    engine = None  # built on the first batch, at its image size
    for view in range(1 if tta else views):
        dataset = ManifestImages(frame, classes, transform, view_seed=None if tta else seed * 1000 + view)
        loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, seed=seed)
        waited = time.perf_counter()
        for batch in tqdm(loader, desc=f"{desc} features (view {view + 1}/{views})", unit="batch", leave=False):
            profiler.data_wait(time.perf_counter() - waited)
            if batch is None:
                continue
            images, _, indices = batch
            engine = engine or feature_engine(model, images.shape[-1], device, profiler.engine_profile_prefix)
            variants = dihedral_views(images) if tta else [images]
            with profiler.phase("forward"):
                outs = engine(torch.cat(variants)).chunk(len(variants))  # every view in one forward
            if features is None:
                features = torch.zeros(len(frame), n_views, outs[0].shape[1])
            for k, out in enumerate(outs):
                features[indices, view if not tta else k] = out
            ok[indices] = True
            profiler.step(len(indices))
            waited = time.perf_counter()
    if engine is not None:
        profiler.engine_done(engine)
    return features, ok


def _extract_shared(model, frame, classes, transform, *, desc: str, **options):
    """Under torchrun each rank extracts every world-th image, then all ranks share the whole set. A rank whose
    share is empty (fewer images than ranks) or wholly unreadable takes part with nothing; only when no rank read
    an image do all of them stop, together."""
    ctx = distributed.current()
    if not ctx.enabled:
        return extract(model, frame, classes, transform, desc=desc, **options)
    mine = torch.arange(ctx.rank, len(frame), ctx.world)
    part, part_ok = _extract(model, frame.iloc[mine.numpy()].reset_index(drop=True), classes, transform,
                             desc=f"{desc} (rank {ctx.rank})", **options)
    features = distributed.gather_rows(part, mine, len(frame))
    if features is None:
        raise no_readable_image(desc, len(frame))
    return features, distributed.gather_rows(part_ok, mine, len(frame))


def cached_features(model: CountingModel, frame: pd.DataFrame, classes: list[int], transform, *, views: int,
                    description: dict, cache_dir: Path | None, batch_size: int, num_workers: int, seed: int,
                    device: torch.device, desc: str, tta: bool = False,
                    profiler=NO_PROFILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `frame`'s images from the cache, computing (and adding) only the images it lacks.

    Stored as float16 (half the size, same accuracy); training always sees the stored values, so a fresh run and
    a cached rerun give the same model."""
    # test-time views are fixed flips, so their features do not depend on the seed: every seed shares them
    key = description_key({**description, "views": views, "seed": None if tta else seed, "tta": tta,
                           **engine_description(device)})
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    store = load_store(path) if path is not None else None  # a corrupt file is deleted and recomputed
    # Only readable images are ever cached: a failure may be the moment's (a file not copied yet, an NFS hiccup),
    # and a cached one would drop the image from every later training without a word. (Stores written before
    # this hold failures too: those are retried like images never seen.)
    known = {sha: i for i, (sha, good) in enumerate(zip(store["sha"], store["ok"].tolist())) if good} if store else {}
    missing = frame[~frame["sha256"].isin(known)].drop_duplicates("sha256").reset_index(drop=True)
    if len(missing):
        # extraction seeds each image's views; fork_rng keeps training's random stream as if the cache were warm
        with torch.random.fork_rng(devices=[]):
            new, new_ok = _extract_shared(model, missing, classes, transform, views=views, batch_size=batch_size,
                                          num_workers=num_workers, seed=seed, device=device, desc=desc, tta=tta,
                                          profiler=profiler)
        new = new.half()
        if store is None:
            store = {"sha": [], "features": new[:0], "ok": new_ok[:0]}
        store = {"sha": store["sha"] + list(missing["sha256"]), "features": torch.cat([store["features"], new]),
                 "ok": torch.cat([store["ok"], new_ok])}
        known = {sha: i for i, sha in enumerate(store["sha"])}
        if path is not None and distributed.current().main:
            readable = store["ok"].nonzero().flatten()
            saved = {"sha": [store["sha"][i] for i in readable.tolist()], "features": store["features"][readable],
                     "ok": store["ok"][readable]}
            with atomic_path(path) as tmp:
                torch.save(saved, tmp)
    else:
        log.info("%s features loaded from cache %s", desc, path)
    rows = torch.tensor([known[sha] for sha in frame["sha256"]])
    return store["features"][rows].float(), store["ok"][rows]


class FeatureViews(Dataset):
    """(feature, label) pairs. Training draws one of the cached augmented views at random each epoch;
    evaluation returns view 0, or all views (B, V, D) for test-time augmentation."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor, random_view: bool,
                 all_views: bool = False):
        keep = ok.nonzero().flatten()
        self.features, self.labels, self.indices = features[keep], labels[keep], keep
        self.random_view, self.all_views = random_view, all_views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.all_views:
            return self.features[i], self.labels[i], self.indices[i]
        views = self.features.shape[1]
        view = int(torch.randint(views, ())) if self.random_view and views > 1 else 0
        return self.features[i, view], self.labels[i], self.indices[i]
