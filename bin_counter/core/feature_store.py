"""Reading one file of the frozen-backbone feature cache (features.py) without trusting it.

A cache file is only ever a speed-up: when it is truncated (a full disk, a killed process on a filesystem without
atomic rename), corrupt, or not a store at all, it is deleted with a warning and its features are recomputed,
instead of failing the training that reads it. It is loaded with weights_only=True, so it cannot run code.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from bin_counter import one_line

log = logging.getLogger(__name__)


def store_problem(store) -> str | None:
    """What makes `store` unusable as {"sha": [str], "features": (N, views, D), "ok": (N,) bool}, or None."""
    if not isinstance(store, dict) or not {"sha", "features", "ok"} <= set(store):
        return "not a feature store"
    sha, features, ok = store["sha"], store["features"], store["ok"]
    if not isinstance(sha, list) or not all(isinstance(s, str) for s in sha):
        return "its checksums are not a list of strings"
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or len(features) != len(sha):
        return "its features do not match its checksums"
    if not isinstance(ok, torch.Tensor) or ok.dtype != torch.bool or ok.shape != (len(sha),):
        return "its readable-image mask does not match its checksums"
    return None


def load_store(path: str | Path) -> dict | None:
    """The store at `path`; None when there is none or it was unusable (then it is deleted, to be recomputed)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        store = torch.load(path, map_location="cpu", weights_only=True)
        problem = store_problem(store)
    except Exception as exc:  # truncated zip, empty file, a pickle of something else: all mean "recompute"
        problem = f"{type(exc).__name__}: {one_line(exc, 200)}"
    if problem is None:
        return store
    log.warning("feature cache %s is unusable (%s): deleted, its features will be recomputed", path, problem)
    path.unlink(missing_ok=True)
    return None
