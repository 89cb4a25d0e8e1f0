"""The frozen-backbone feature cache (core/features.py) on real sample images."""
import shutil

import pytest
import torch

from bin_counter.core.data import eval_transform
from bin_counter.core.features import cached_features
from bin_counter.core.manifest import read_manifest
from bin_counter.core.models import create_model


@pytest.mark.slow  # ~19 s: the backbone and its extraction
def test_an_image_missing_once_is_retried_not_cached_as_unreadable(tiny_data, tmp_path):
    frame = read_manifest(tiny_data, "val").head(3).copy()
    for row in frame.itertuples():  # files of this test's own: one goes away and comes back
        shutil.copy(row.abs_path, tmp_path / f"{row.image_id}.jpg")
    frame["abs_path"] = [str(tmp_path / f"{i}.jpg") for i in frame["image_id"]]
    model = create_model("efficientnet-lite0", 5)
    args = dict(views=1, description={"t": 1}, cache_dir=tmp_path / "cache", batch_size=4, num_workers=0, seed=0,
                device=torch.device("cpu"), desc="val")
    gone = tmp_path / "gone.jpg"
    shutil.move(frame.loc[0, "abs_path"], gone)  # an NFS hiccup, a copy not finished yet
    _, ok = cached_features(model, frame, [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"), **args)
    assert ok.tolist() == [False, True, True]
    shutil.move(gone, frame.loc[0, "abs_path"])
    features, ok = cached_features(model, frame, [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"), **args)
    assert ok.tolist() == [True, True, True] and features[0].abs().sum() > 0  # before: dropped for good


@pytest.mark.slow  # ~19 s: the backbone and its extraction
def test_features_of_an_older_preprocessing_or_library_version_are_not_reused(tiny_data, tmp_path, monkeypatch):
    from bin_counter.core import features

    frame = read_manifest(tiny_data, "val").head(3)
    args = dict(views=1, description={"t": 1}, cache_dir=tmp_path, batch_size=4, num_workers=0, seed=0,
                device=torch.device("cpu"), desc="val")
    stale = features.description_key({"t": 1, "views": 1, "seed": 0, "tta": False})  # the key before versions
    torch.save({"sha": list(frame["sha256"]), "features": torch.full((3, 1, 1280), 7.0).half(),
                "ok": torch.ones(3, dtype=torch.bool)}, tmp_path / f"{stale}.pt")
    model = create_model("efficientnet-lite0", 5)
    fresh, ok = cached_features(model, frame, [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"), **args)
    assert ok.all() and not (fresh == 7).any()  # before: the stale file's features came back
    monkeypatch.setattr(features, "PREPROCESSING_VERSION", features.PREPROCESSING_VERSION + 1)
    cached_features(model, frame, [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"), **args)
    assert len(list(tmp_path.glob("*.pt"))) == 3  # the stale one, and one per preprocessing version
