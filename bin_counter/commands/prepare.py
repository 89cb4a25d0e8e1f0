"""prepare: ABID source (bundled sample, local dir, S3) -> validated, filtered, split DATA_DIR.

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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from bin_counter import BinCounterError
from bin_counter.cloud import s3
from bin_counter.config import PrepareConfig
from bin_counter.core import abid
from bin_counter.core.files import (
    atomic_write_text,
    copy_file,
    remove_partial_files,
    safe_join,
    sha256_of,
    unsafe_reason,
)
from bin_counter.core.manifest import DATASET_JSON, MANIFEST, REJECTED, SPLITS, write_csv

log = logging.getLogger(__name__)
SAMPLE_DIR = Path(__file__).parents[1] / "sample"
SHARD_DIR = "shards"  # = shards.SHARD_DIR, not imported from there: that module pulls in torch
# Written into --out before anything else: a folder with it (or a dataset.json) was made by prepare.
CLAIM = ".bin-counter-data"
# ABID metadata is a few kB; a document past this is not ABID metadata and is not read into memory.
MAX_METADATA_BYTES = 1 << 20


@dataclass
class PrepareResult:
    manifest: pd.DataFrame
    rejected: pd.DataFrame
    classes: list[int]
    out: Path
    downloaded: int = 0
    already_present: int = 0


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


def ids_in_s3(client, bucket: str, prefix: str) -> tuple[list[str], list[dict]]:
    """Ids of the metadata documents directly under PREFIX/metadata/ (ABID's layout), and a rejected row for every
    other .json key there: a nested copy (metadata/archive/<id>.json) would otherwise give the same id twice."""
    base = prefix + abid.METADATA_PREFIX
    names = [key[len(base):] for key in s3.list_keys(client, bucket, base) if key.endswith(".json")]
    ids = sorted(name[: -len(".json")] for name in names if "/" not in name)
    direct, rejected = set(ids), []
    for name in names:
        if "/" in name:
            image_id = abid.id_from_key(name)
            why = f"same id as {abid.metadata_key(image_id)}" if image_id in direct else "not directly under metadata/"
            # the reason's words before ':' are what summary() groups by, so the key comes after it
            rejected.append({"image_id": image_id, "reason": f"nested metadata key ignored: {base + name!r}, {why}"})
    return ids, rejected


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


def fetch_from_s3(cfg: PrepareConfig, ids: list[str] | None,
                  raw: Path) -> tuple[list[str], list[dict], s3.TransferStats]:
    """Download the listed pairs (or every pair under the prefix) into raw/ in ABID's layout.

    Returns the ids screened for download, the rows rejected on the way, and the transfer counts."""
    bucket, prefix = s3.parse_s3_uri(cfg.source)
    client = s3.make_client(s3.is_anonymous(bucket, cfg.anonymous), cfg.workers)
    s3.check_bucket(client, bucket)
    rejected: list[dict] = []
    if ids is None:
        ids, rejected = ids_in_s3(client, bucket, prefix)
    ids, refused = screen_ids(ids)
    removed = remove_partial_files(raw)
    if removed:
        log.info("removed %d partial files left by an interrupted run", removed)
    jobs = [(prefix + key, safe_join(raw, key)) for image_id in ids
            for key in (abid.metadata_key(image_id), abid.image_key(image_id))]
    stats = s3.download(client, bucket, jobs, cfg.workers, desc=f"download s3://{bucket}/{prefix}")
    return ids, rejected + refused, stats


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


# ---- the command -----------------------------------------------------------------------------------------


def source_uri(source: str) -> str:
    """One spelling per source: `sample`, an absolute folder, or s3://bucket/prefix without a trailing slash."""
    if source == "sample":
        return source
    if source.startswith("s3://"):
        bucket, prefix = s3.parse_s3_uri(source)
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


def gather_ids(cfg: PrepareConfig, out: Path) -> tuple[Path, list[str], list[dict], s3.TransferStats]:
    """Where the pairs are (a local root, or raw/ after downloading), their ids, and the names rejected on the way."""
    listed, rejected = ids_from_file_list(Path(cfg.file_list)) if cfg.file_list else (None, [])
    if cfg.source.startswith("s3://"):
        root = raw_cache(out, cfg.source)
        ids, refused, stats = fetch_from_s3(cfg, listed, root)
        if stats.failed:
            log.warning("%d objects could not be downloaded; their pairs are rejected", len(stats.failed))
    else:
        root = local_root(cfg.source)
        ids, refused = screen_ids(listed if listed is not None else ids_in_local(root))
        stats = s3.TransferStats()
    return root, ids, rejected + refused, stats


def prepare(cfg: PrepareConfig) -> PrepareResult:
    classes = abid.parse_classes(cfg.classes)
    ratios = parse_split(cfg.split)
    s3.check_workers(cfg.workers)
    out = Path(cfg.out)
    claim_output(out, cfg.source, cfg.replace)
    root, ids, refused, stats = gather_ids(cfg, out)
    if not ids:
        example = f" ({len(refused)} names refused, e.g. {refused[0]['reason']})" if refused else ""
        raise BinCounterError(f"no ABID pairs found in {cfg.source}{example}")

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
    if cfg.shard_size > 0:
        from bin_counter.cloud.shards import write_shards

        write_shards(out, manifest, cfg.shard_size)
    return PrepareResult(manifest, rejected, classes, out, stats.transferred, stats.skipped)


def upload_prepared(result: PrepareResult, uri: str, workers: int, anonymous: bool | None = None) -> s3.TransferStats:
    """Copy DATA_DIR's images, shards, rejected list, shard index, manifest and dataset.json to s3://bucket/prefix/.

    The files that make a prefix look like a DATA_DIR (the shard index, the manifest, dataset.json last) go up
    one by one after everything they list, so an interrupted upload never leaves an index naming missing data."""
    bucket, prefix = s3.parse_s3_uri(uri)
    client = s3.make_client(s3.is_anonymous(bucket, anonymous) if anonymous else False, workers)
    s3.check_bucket(client, bucket, for_write=True)
    data = [(result.out / path, prefix + path) for path in result.manifest["path"]]
    shards = result.out / SHARD_DIR
    index = [f"{SHARD_DIR}/index.json"] if (shards / "index.json").is_file() else []
    if shards.is_dir():
        data += [(path, f"{prefix}{SHARD_DIR}/{path.name}") for path in sorted(shards.iterdir()) if path.is_file()
                 and not path.name.startswith(".") and path.name != "index.json"]
    stats = s3.upload(client, bucket, data, workers)
    for name in (REJECTED, *index, MANIFEST, DATASET_JSON):  # one call each: a failure stops the ones after it
        one = s3.upload(client, bucket, [(result.out / name, prefix + name)], workers=1)
        stats.transferred, stats.skipped = stats.transferred + one.transferred, stats.skipped + one.skipped
    return stats


def summary(result: PrepareResult) -> str:
    per_split = Counter(result.manifest["split"])
    reasons = Counter(r.split(":")[0] for r in result.rejected["reason"])
    lines = [
        f"kept {len(result.manifest)} images ({', '.join(f'{s}: {per_split.get(s, 0)}' for s in SPLITS)}) "
        f"in {result.out}; rejected {len(result.rejected)} pairs (see {result.out / REJECTED})",
    ]
    if result.downloaded or result.already_present:
        lines.append(f"downloaded {result.downloaded} files, {result.already_present} already present")
    lines += [f"  rejected: {n} x {reason}" for reason, n in reasons.most_common()]
    return "\n".join(lines)


def run(cfg: PrepareConfig) -> PrepareResult:
    """`bin-counter prepare`: prepare, optionally upload, and log it all to an MLflow run."""
    import mlflow

    from bin_counter import plots, tracking
    from bin_counter.config import as_params

    with tracking.run("prepare"):
        tracking.log_params({f"prepare.{k}": v for k, v in as_params(cfg).items() if v != ""})
        result = prepare(cfg)
        log.info(summary(result))
        if cfg.upload:
            stats = upload_prepared(result, cfg.upload, cfg.workers, cfg.anonymous)
            log.info("uploaded %d files to %s, %d already there", stats.transferred, cfg.upload, stats.skipped)
            mlflow.log_metrics({"prepare/uploaded": stats.transferred, "prepare/upload_skipped": stats.skipped})
        dataset = tracking.log_dataset(result.manifest, str(Path(cfg.out).resolve()), "abid", context="prepare")
        mlflow.set_tag("dataset_digest", dataset.digest)
        mlflow.log_metrics({"prepare/images": len(result.manifest), "prepare/rejected": len(result.rejected),
                            "prepare/downloaded": result.downloaded})
        table = result.manifest.groupby(["count", "split"]).size().unstack(fill_value=0).reset_index()
        tracking.log_frame(table, "class_histogram")
        tracking.log_figure(plots.class_histogram(result.manifest, result.classes), "class_histogram.png")
        if len(result.rejected):
            mlflow.log_artifact(str(result.out / REJECTED))
    return result
