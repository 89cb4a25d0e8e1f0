"""The prepared data directory: DATA_DIR/images/, manifest.csv and rejected.csv."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bin_counter import BinCounterError, one_line
from bin_counter.core.choices import SPLITS  # noqa: F401  (readers of a manifest use it from here)
from bin_counter.core.files import atomic_path, unsafe_reason

MANIFEST = "manifest.csv"
REJECTED = "rejected.csv"
DATASET_JSON = "dataset.json"
SHARD_DIR = "shards"  # WebDataset-style tar shards and their index.json (cloud/shards.py)
COLUMNS = ["image_id", "count", "split", "sha256", "width", "height", "path", "expected_quantity"]
SHA256 = r"[0-9a-f]{64}"


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_manifest(data_dir: Path, split: str | None = None, name: str = MANIFEST) -> pd.DataFrame:
    """The manifest (DATA_DIR/manifest.csv, or another csv `name` there) with ids as strings (ABID's `01002` is not
    `1002`) and image paths made absolute. A path that leads out of DATA_DIR by its name (`../x`, `/etc/x`) is
    refused: a manifest may come from S3, and its images are read and sent to models and endpoints. (A symlink
    inside DATA_DIR is followed: crossval's fold folders link their images/ to the full set.)"""
    path = Path(data_dir) / name
    if not path.exists():
        raise BinCounterError(f"no {name} in {data_dir}: run `bin-counter prepare --out {data_dir}` first")
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "split": str, "sha256": str, "path": str})
    except (ValueError, pd.errors.ParserError) as exc:  # UnicodeDecodeError, EmptyDataError, ragged rows
        raise BinCounterError(f"{path} is not a readable CSV: {one_line(exc)}") from None
    missing = set(COLUMNS) - set(frame.columns)
    if missing:
        raise BinCounterError(f"{path} lacks columns {sorted(missing)}; was it written by `bin-counter prepare`?")
    refused = next((p for p in frame["path"] if unsafe_reason(p)), None)  # unsafe_reason: NaN is an empty name
    if refused is not None:
        raise BinCounterError(f"{path}: image path {refused!r} refused ({unsafe_reason(refused)}); "
                              f"paths must stay in {data_dir}")
    # the feature cache keys images by sha256: rows with an empty or made-up one would share one image's features
    bad = ~frame["sha256"].fillna("").str.fullmatch(SHA256)
    if bad.any():
        first = frame[bad].iloc[0]
        raise BinCounterError(f"{path}: image {first['image_id']!r} has no valid sha256 ({first['sha256']!r}; "
                              f"{int(bad.sum())} rows in all): rerun `bin-counter prepare`")
    frame["abs_path"] = [str(Path(data_dir) / p) for p in frame["path"]]
    if split is not None:
        frame = frame[frame["split"] == split].reset_index(drop=True)
        if frame.empty:
            raise BinCounterError(f"split {split!r} of {path} is empty")
    return frame


def classes_of(frame: pd.DataFrame) -> list[int]:
    return sorted(int(c) for c in frame["count"].unique())


def read_classes(data_dir: Path) -> list[int]:
    """The counts a prepared DATA_DIR was prepared for (its dataset.json), in order."""
    path = Path(data_dir) / DATASET_JSON
    if not path.exists():
        raise BinCounterError(f"no {DATASET_JSON} in {data_dir}: run `bin-counter prepare --out {data_dir}` first")
    try:
        return [int(c) for c in json.loads(path.read_text())["classes"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BinCounterError(f"{path} has no list of classes ({one_line(exc)}): rerun `bin-counter prepare`") from None


def check_counts(frame: pd.DataFrame, classes: list[int], data_dir: Path) -> None:
    """Every manifest count is one of dataset.json's classes (a hand-edited manifest's may not be)."""
    outside = sorted({str(c) for c in frame["count"]} - {str(c) for c in classes})
    if outside:
        raise BinCounterError(f"{Path(data_dir) / MANIFEST} has counts {', '.join(outside)} outside the classes "
                              f"{classes} of its {DATASET_JSON}: rerun `bin-counter prepare`")


def read_split(data_dir: Path, split: str) -> tuple[pd.DataFrame, list[int]]:
    """One split of a prepared DATA_DIR and the classes it was prepared for."""
    frame, classes = read_manifest(data_dir, split), read_classes(data_dir)
    check_counts(frame, classes, data_dir)
    return frame, classes
