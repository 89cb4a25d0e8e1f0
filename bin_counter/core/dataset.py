"""A DATA_DIR from ABID pairs already on disk: names screened, pairs validated, counts filtered, split, images
copied, manifest, rejected list and dataset.json written (the `prepare` command fetches S3 sources first).

DATA_DIR/
  images/<id>.jpg     the kept images
  manifest.csv        image_id,count,split,sha256,width,height,path,expected_quantity
  rejected.csv        image_id,reason for every pair that was skipped
  dataset.json        the classes, the source and how the set was made
  raw/<key>/          S3 downloads in ABID's layout (resumable), one folder per source (key: sha256 of its URI)

A DATA_DIR holds one source's dataset: preparing another source into it is refused unless `replace` is set.
Every name that comes from the source (S3 keys, file-list entries, ids) is screened before it becomes a path;
what is refused, and why, is listed in rejected.csv.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from bin_counter import BinCounterError
from bin_counter.core import abid
from bin_counter.core.files import atomic_write_text, copy_file, safe_join, sha256_of, unsafe_reason
from bin_counter.core.manifest import DATASET_JSON, MANIFEST, REJECTED, SHARD_DIR, SPLITS, write_csv
from bin_counter.core.uris import parse_s3_uri

if TYPE_CHECKING:  # the settings' type only: the core does not import the config at run time
    from bin_counter.config import PrepareConfig

log = logging.getLogger(__name__)
SAMPLE_DIR = Path(__file__).parents[1] / "sample"
# Written into --out before anything else: a folder with it (or a dataset.json) was made by prepare.
CLAIM = ".bin-counter-data"
# ABID metadata is a few kB; a document past this is not ABID metadata and is not read into memory.
MAX_METADATA_BYTES = 1 << 20


def parse_split(spec: str | tuple[float, ...]) -> tuple[float, float, float]:
    try:
        ratios = tuple(float(x) for x in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        raise BinCounterError(f"--split must be three numbers like 0.8,0.1,0.1 (got {spec!r})") from None
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise BinCounterError(f"--split must be three non-negative ratios summing to 1 (got {spec!r})")
    return ratios  # type: ignore[return-value]


# ---- sources ---------------------------------------------------------------------------------------------


def local_root(source: str) -> Path:
    root = SAMPLE_DIR if source == "sample" else Path(source)
    if not root.is_dir():
        raise BinCounterError(f"unknown source {source!r}: expected `sample`, a directory, or s3://bucket[/prefix]")
    if not (root / "metadata").is_dir() or not (root / "bin-images").is_dir():
        raise BinCounterError(f"{root} is not in ABID's layout (bin-images/<id>.jpg and metadata/<id>.json)")
    return root


def ids_in_local(root: Path) -> list[str]:
    stems = {p.stem for p in (root / "metadata").glob("*.json")} | {p.stem for p in (root / "bin-images").glob("*.jpg")}
    return sorted(stems)


def ids_from_file_list(path: Path) -> tuple[list[str], list[dict]]:
    """Ids of a file list; an entry that is not a safe relative name (`../x.json`, `/x.json`) is rejected."""
    ids, rejected = [], []
    for entry in abid.read_file_list_entries(path):
        problem = unsafe_reason(entry)
        if problem:
            rejected.append({"image_id": entry, "reason": f"unsafe file-list entry: {problem}"})
        else:
            ids.append(abid.id_from_key(entry))
    return ids, rejected


def id_problem(image_id: str) -> str | None:
    """An id becomes a file name (images/<id>.jpg, raw/bin-images/<id>.jpg): one safe path part, nothing else."""
    return unsafe_reason(image_id) or ("id has a folder" if "/" in image_id else None)


def screen_ids(ids: list[str]) -> tuple[list[str], list[dict]]:
    """The ids that are safe file names, each once, in order; a rejected row for every other."""
    kept, rejected, seen = [], [], set()
    for image_id in ids:
        problem = id_problem(image_id)
        if problem:
            rejected.append({"image_id": image_id, "reason": f"unsafe id: {problem}"})
        elif image_id in seen:
            rejected.append({"image_id": image_id, "reason": "duplicate id (kept once)"})
        else:
            seen.add(image_id)
            kept.append(image_id)
    return kept, rejected


# ---- validation ------------------------------------------------------------------------------------------


def validate_pair(root: Path, image_id: str) -> dict:
    """One manifest row, or {'image_id', 'reason'} saying why the pair is skipped."""
    try:
        meta_path, image_path = safe_join(root, abid.metadata_key(image_id)), safe_join(root, abid.image_key(image_id))
    except ValueError as exc:
        return {"image_id": image_id, "reason": f"unsafe id: {exc}"}
    if not meta_path.exists():
        return {"image_id": image_id, "reason": "missing metadata"}
    if not image_path.exists():
        return {"image_id": image_id, "reason": "missing image"}
    try:
        size = meta_path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is over the {MAX_METADATA_BYTES:,}-byte limit: {size:,} bytes")
        count = abid.parse_count(meta_path.read_bytes())
        data = image_path.read_bytes()
        info = abid.check_image(data)
    except ValueError as exc:
        return {"image_id": image_id, "reason": str(exc)}
    except OSError as exc:  # a folder where a file should be, no permission...
        return {"image_id": image_id, "reason": f"unreadable: {exc.strerror or exc}"}
    return {"image_id": image_id, "expected_quantity": count, "width": info.width, "height": info.height}


def validate_all(root: Path, ids: list[str], workers: int) -> tuple[list[dict], list[dict]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(lambda i: validate_pair(root, i), ids), total=len(ids), desc="validate",
                            unit="pair"))
    good = [r for r in results if "reason" not in r]
    bad = [r for r in results if "reason" in r]
    return good, bad


# ---- selection and split ---------------------------------------------------------------------------------


def describe_classes(classes: list[int]) -> str:
    contiguous = classes == list(range(classes[0], classes[-1] + 1))
    return f"{classes[0]}-{classes[-1]}" if contiguous else ",".join(map(str, classes))


def assign_counts(rows: list[dict], classes: list[int], top_bucket: bool) -> tuple[list[dict], list[dict]]:
    """The rows whose count is a class (folded into the top one with top_bucket), and a rejected row for the rest."""
    top = max(classes)
    kept, dropped = [], []
    for row in rows:
        count = row["expected_quantity"]
        if top_bucket and count > top:
            count = top
        if count in classes:
            kept.append({**row, "count": count})
        else:
            dropped.append({"image_id": row["image_id"],
                            "reason": f"count {count} outside classes {describe_classes(classes)}"})
    return kept, dropped


def stratified_split(rows: list[dict], ratios: tuple[float, float, float], seed: int, limit: int | None) -> list[dict]:
    """Deterministic per-class shuffle (ids sorted first, so input order does not matter), then cut by ratio."""
    rng = random.Random(seed)
    by_class: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["image_id"]):
        by_class.setdefault(row["count"], []).append(row)
    out = []
    for count in sorted(by_class):
        members = by_class[count]
        rng.shuffle(members)
        if limit is not None:
            members = members[:limit]
        n_train = round(len(members) * ratios[0])
        n_val = min(round(len(members) * ratios[1]), len(members) - n_train)
        for index, row in enumerate(members):
            split = SPLITS[0] if index < n_train else SPLITS[1] if index < n_train + n_val else SPLITS[2]
            out.append({**row, "split": split})
    return out


# ---- the DATA_DIR ----------------------------------------------------------------------------------------


def source_uri(source: str) -> str:
    """One spelling per source: `sample`, an absolute folder, or s3://bucket/prefix without a trailing slash."""
    if source == "sample":
        return source
    if source.startswith("s3://"):
        bucket, prefix = parse_s3_uri(source)
        return f"s3://{bucket}/{prefix}".rstrip("/")
    return str(Path(source).resolve())


def raw_cache(out: Path, source: str) -> Path:
    """raw/<key>/: ABID ids repeat across buckets and prefixes, so one shared cache would serve one source's image
    (and count) under another's id."""
    return out / "raw" / hashlib.sha256(source_uri(source).encode()).hexdigest()[:16]


def previous_source(out: Path) -> str | None:
    """The source named by an existing DATA_DIR/dataset.json, or None when there is none."""
    path = out / DATASET_JSON
    if not path.exists():
        return None
    try:
        source = json.loads(path.read_bytes())["source"]
        return source_uri(str(source))
    except (ValueError, KeyError, TypeError, BinCounterError, OSError):
        return f"an unreadable {path}"


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def claim_output(out: Path, source: str, replace: bool) -> None:
    """Refuse to mix two sources' datasets in one DATA_DIR, or to write into a folder prepare did not make (its
    files would be overwritten or pruned); with `replace`, remove the other dataset's files first."""
    previous = previous_source(out)
    if previous is None:
        foreign = out.is_dir() and not (out / CLAIM).exists() and any(out.iterdir())
        if foreign and not replace:
            raise BinCounterError(f"{out} is not empty and holds no {DATASET_JSON}: it is not a DATA_DIR written by "
                                  "prepare; choose an empty or new --out, or pass --replace to write into it")
    elif previous != source_uri(source):
        if not replace:
            raise BinCounterError(f"{out} holds a dataset prepared from {previous}, not {source_uri(source)}: "
                                  "choose another --out, or pass --replace to replace it")
        log.info("replacing the dataset of %s in %s", previous, out)
        remove_written(out, {*listed_images(out), *listed_shards(out)})
        for name in (MANIFEST, REJECTED, DATASET_JSON, "raw"):
            remove_path(out / name)
    out.mkdir(parents=True, exist_ok=True)
    (out / CLAIM).touch()  # an interrupted first prepare has no dataset.json yet; its rerun must not be refused


def listed_images(out: Path) -> set[Path]:
    """The images the DATA_DIR's current manifest lists: the ones an earlier prepare wrote."""
    try:
        paths = pd.read_csv(out / MANIFEST, dtype=str, usecols=["path"])["path"].dropna()
    except (OSError, ValueError, pd.errors.ParserError):  # none yet, or unreadable: nothing is known to be ours
        return set()
    return {out / path for path in paths if not unsafe_reason(path) and path.startswith("images/")}


def listed_shards(out: Path) -> set[Path]:
    """shards/index.json and the shards it lists."""
    index = out / SHARD_DIR / "index.json"
    try:
        names = [name for split in json.loads(index.read_bytes()).values() for name in split]
    except (OSError, ValueError, TypeError, AttributeError):
        return set()
    return {index, *(out / SHARD_DIR / name for name in names if isinstance(name, str) and not id_problem(name))}


def remove_written(out: Path, paths: set[Path]) -> None:
    """Delete these files (what prepare wrote, never a folder of the user's), then the folders they leave empty."""
    for path in paths:
        if path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(out.resolve()):
            path.unlink()
    for folder in ("images", SHARD_DIR):
        with contextlib.suppress(OSError):  # not empty, or not there
            (out / folder).rmdir()


def place_image(src: Path, dest: Path) -> None:
    """images/<id>.jpg is a copy of the source's file: one already there is kept only if it has the same bytes
    and is not the source itself (a hard link an earlier version made), never because an earlier, interrupted run
    left a file of that name."""
    if dest.exists() and not os.path.samefile(src, dest) and sha256_of(src) == sha256_of(dest):
        return
    copy_file(src, dest)


def write_dataset(cfg: PrepareConfig, classes: list[int], ratios: tuple[float, float, float], root: Path,
                  ids: list[str], refused: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (manifest, rejected) of the DATA_DIR cfg.out, written from the pairs `ids` under `root` (ABID's layout):
    validated, filtered to `classes`, split by `ratios`; `refused` are the names rejected before."""
    out = Path(cfg.out)
    good, bad = validate_all(root, ids, cfg.workers)
    kept, dropped = assign_counts(good, classes, cfg.top_bucket)
    rows = stratified_split(kept, ratios, cfg.seed, cfg.limit_per_class)
    if not rows:
        raise BinCounterError(
            f"no images left after filtering to counts {classes} ({len(good)} valid, {len(dropped)} outside them, "
            f"{len(bad)} rejected)"
        )

    images = out / "images"
    earlier = listed_images(out) | listed_shards(out)  # read before the new manifest replaces the list
    for row in tqdm(rows, desc="copy images", unit="image"):
        dest = safe_join(images, f"{row['image_id']}.jpg")
        place_image(safe_join(root, abid.image_key(row["image_id"])), dest)
        row["sha256"] = sha256_of(dest)
        row["path"] = f"images/{row['image_id']}.jpg"
    manifest = pd.DataFrame(rows)[["image_id", "count", "split", "sha256", "width", "height", "path",
                                   "expected_quantity"]]
    rejected = pd.DataFrame(refused + bad + dropped, columns=["image_id", "reason"])
    write_csv(manifest, out / MANIFEST)
    write_csv(rejected, out / REJECTED)
    description = {"classes": classes, "source": source_uri(cfg.source), "split": list(ratios), "seed": cfg.seed,
                   "top_bucket": cfg.top_bucket, "limit_per_class": cfg.limit_per_class}
    atomic_write_text(out / DATASET_JSON, json.dumps(description, indent=2) + "\n")
    # what an earlier prepare wrote and this one did not (other filters or limits; its shards describe another
    # manifest), and nothing else: a file of the user's in images/ is not ours to delete
    remove_written(out, earlier - {out / row["path"] for row in rows})
    return manifest, rejected
