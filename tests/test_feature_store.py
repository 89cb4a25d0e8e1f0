"""The feature cache: a corrupt file is deleted with a warning and recomputed; a sound one is returned as saved."""
from __future__ import annotations

import pytest
import torch

from conftest import WritesMarker


def a_feature_store() -> dict:
    return {"sha": ["a" * 64, "b" * 64], "features": torch.randn(2, 3, 8).half(), "ok": torch.tensor([True, False])}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong shapes", "os.system pickle"])
def test_corrupt_feature_cache_is_deleted_with_a_warning_to_be_recomputed(tmp_path, caplog, damage):
    from bin_counter.core.feature_store import load_store

    path = tmp_path / "0123abcd.pt"
    torch.save(a_feature_store(), path)
    whole = path.read_bytes()
    marker = tmp_path / "pwned"
    if damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 300)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong shapes":
        torch.save({**a_feature_store(), "features": torch.randn(5, 3, 8)}, path)
    else:
        torch.save({**a_feature_store(), "sha": WritesMarker(marker)}, path)
    with caplog.at_level("WARNING"):
        assert load_store(path) is None
    assert not path.exists() and not marker.exists()
    assert "recomputed" in caplog.text and str(path) in caplog.text


def test_sound_feature_cache_is_returned_as_saved(tmp_path):
    from bin_counter.core.feature_store import load_store

    store = a_feature_store()
    torch.save(store, tmp_path / "k.pt")
    loaded = load_store(tmp_path / "k.pt")
    assert loaded["sha"] == store["sha"] and torch.equal(loaded["features"], store["features"])
    assert load_store(tmp_path / "missing.pt") is None
