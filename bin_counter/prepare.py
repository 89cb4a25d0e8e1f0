"""prepare: ABID source (bundled sample, local dir, S3) -> validated, filtered, split DATA_DIR.

DATA_DIR/
  images/<id>.jpg     the kept images
  manifest.csv        image_id,count,split,sha256,width,height,path,expected_quantity
  rejected.csv        image_id,reason for every pair that was skipped
  dataset.json        the classes and how the set was made
  raw/                S3 downloads in ABID's layout (resumable)
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from bin_counter import BinCounterError, abid, s3
from bin_counter.config import PrepareConfig
from bin_counter.files import atomic_write_text, link_or_copy, remove_partial_files, sha256_of
from bin_counter.manifest import MANIFEST, REJECTED, SPLITS, write_csv

log = logging.getLogger(__name__)
SAMPLE_DIR = Path(__file__).parent / "sample"
DATASET_JSON = "dataset.json"


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


def fetch_from_s3(cfg: PrepareConfig, ids: list[str] | None, raw: Path) -> tuple[list[str], s3.TransferStats]:
    """Download the listed pairs (or every pair under the prefix) into raw/ in ABID's layout."""
    bucket, prefix = s3.parse_s3_uri(cfg.source)
    client = s3.make_client(s3.is_anonymous(bucket, cfg.anonymous), cfg.workers)
    s3.check_bucket(client, bucket)
    if ids is None:
        ids = sorted(
            abid.id_from_key(key)
            for key in s3.list_keys(client, bucket, prefix + abid.METADATA_PREFIX)
            if key.endswith(".json")
        )
    removed = remove_partial_files(raw)
    if removed:
        log.info("removed %d partial files left by an interrupted run", removed)
    jobs = []
    for image_id in ids:
        jobs.append((prefix + abid.metadata_key(image_id), raw / abid.metadata_key(image_id)))
        jobs.append((prefix + abid.image_key(image_id), raw / abid.image_key(image_id)))
    stats = s3.download(client, bucket, jobs, cfg.workers, desc=f"download s3://{bucket}/{prefix}")
    return ids, stats


# ---- validation ------------------------------------------------------------------------------------------


def validate_pair(root: Path, image_id: str) -> dict:
    """One manifest row, or {'image_id', 'reason'} saying why the pair is skipped."""
    meta_path, image_path = root / abid.metadata_key(image_id), root / abid.image_key(image_id)
    if not meta_path.exists():
        return {"image_id": image_id, "reason": "missing metadata"}
    if not image_path.exists():
        return {"image_id": image_id, "reason": "missing image"}
    try:
        count = abid.parse_count(meta_path.read_bytes())
        data = image_path.read_bytes()
        info = abid.check_image(data)
    except ValueError as exc:
        return {"image_id": image_id, "reason": str(exc)}
    return {"image_id": image_id, "expected_quantity": count, "width": info.width, "height": info.height}


def validate_all(root: Path, ids: list[str], workers: int) -> tuple[list[dict], list[dict]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(lambda i: validate_pair(root, i), ids), total=len(ids), desc="validate", unit="pair"))
    good = [r for r in results if "reason" not in r]
    bad = [r for r in results if "reason" in r]
    return good, bad


# ---- selection and split ---------------------------------------------------------------------------------


def assign_counts(rows: list[dict], classes: list[int], top_bucket: bool) -> list[dict]:
    top = max(classes)
    kept = []
    for row in rows:
        count = row["expected_quantity"]
        if top_bucket and count > top:
            count = top
        if count in classes:
            kept.append({**row, "count": count})
    return kept


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


def prepare(cfg: PrepareConfig) -> PrepareResult:
    classes = abid.parse_classes(cfg.classes)
    ratios = parse_split(cfg.split)
    out = Path(cfg.out)
    ids = abid.read_file_list(Path(cfg.file_list)) if cfg.file_list else None
    downloaded = present = 0
    if cfg.source.startswith("s3://"):
        root = out / "raw"
        ids, stats = fetch_from_s3(cfg, ids, root)
        downloaded, present = stats.transferred, stats.skipped
        if stats.failed:
            log.warning("%d objects could not be downloaded; their pairs are rejected", len(stats.failed))
    else:
        root = local_root(cfg.source)
        ids = ids if ids is not None else ids_in_local(root)
    if not ids:
        raise BinCounterError(f"no ABID pairs found in {cfg.source}")

    good, bad = validate_all(root, ids, cfg.workers)
    rows = stratified_split(assign_counts(good, classes, cfg.top_bucket), ratios, cfg.seed, cfg.limit_per_class)
    if not rows:
        raise BinCounterError(
            f"no images left after filtering to counts {classes} ({len(good)} valid, {len(bad)} rejected)"
        )

    images = out / "images"
    for row in tqdm(rows, desc="copy images", unit="image"):
        dest = images / f"{row['image_id']}.jpg"
        if not dest.exists():
            link_or_copy(root / abid.image_key(row["image_id"]), dest)
        row["sha256"] = sha256_of(dest)
        row["path"] = f"images/{row['image_id']}.jpg"
    manifest = pd.DataFrame(rows)[["image_id", "count", "split", "sha256", "width", "height", "path", "expected_quantity"]]
    rejected = pd.DataFrame(bad, columns=["image_id", "reason"])
    write_csv(manifest, out / MANIFEST)
    write_csv(rejected, out / REJECTED)
    description = {"classes": classes, "source": cfg.source, "split": list(ratios), "seed": cfg.seed,
                   "top_bucket": cfg.top_bucket, "limit_per_class": cfg.limit_per_class}
    atomic_write_text(out / DATASET_JSON, json.dumps(description, indent=2) + "\n")
    if cfg.shard_size > 0:
        from bin_counter.shards import write_shards

        write_shards(out, manifest, cfg.shard_size)
    return PrepareResult(manifest, rejected, classes, out, downloaded, present)


def upload_prepared(result: PrepareResult, uri: str, workers: int, anonymous: bool | None = None) -> s3.TransferStats:
    """Copy DATA_DIR's images, manifest, rejected list and dataset.json to s3://bucket/prefix/."""
    bucket, prefix = s3.parse_s3_uri(uri)
    client = s3.make_client(s3.is_anonymous(bucket, anonymous) if anonymous else False, workers)
    s3.check_bucket(client, bucket)
    jobs = [(result.out / path, prefix + path) for path in result.manifest["path"]]
    jobs += [(result.out / name, prefix + name) for name in (MANIFEST, REJECTED, DATASET_JSON)]
    shards = result.out / "shards"
    if shards.is_dir():
        jobs += [(path, f"{prefix}shards/{path.name}") for path in sorted(shards.iterdir()) if path.is_file()
                 and not path.name.startswith(".")]
    return s3.upload(client, bucket, jobs, workers)


def read_classes(data_dir: str | Path) -> list[int]:
    data_dir = local_copy(str(data_dir))
    path = Path(data_dir) / DATASET_JSON
    if not path.exists():
        raise BinCounterError(f"no {DATASET_JSON} in {data_dir}: run `bin-counter prepare --out {data_dir}` first")
    return [int(c) for c in json.loads(path.read_text())["classes"]]


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
        tracking.log_params({f"prepare.{k}": v for k, v in as_params(cfg).items()})
        result = prepare(cfg)
        log.info(summary(result))
        if cfg.upload:
            stats = upload_prepared(result, cfg.upload, cfg.workers, cfg.anonymous)
            log.info("uploaded %d files to %s, %d already there", stats.transferred, cfg.upload, stats.skipped)
            mlflow.log_metrics({"uploaded": stats.transferred, "upload_skipped": stats.skipped})
        tracking.log_dataset(result.manifest, str(Path(cfg.out).resolve()), "abid", context="prepare")
        mlflow.log_metrics({"images": len(result.manifest), "rejected": len(result.rejected),
                            "downloaded": result.downloaded})
        table = result.manifest.groupby(["count", "split"]).size().unstack(fill_value=0).reset_index()
        tracking.log_frame(table, "class_histogram")
        tracking.log_figure(plots.class_histogram(result.manifest, result.classes), "class_histogram.png")
        if len(result.rejected):
            mlflow.log_artifact(str(result.out / REJECTED))
    return result


def local_copy(data: str) -> Path:
    """A prepared DATA_DIR in S3 (from `prepare --upload`) gets its manifest and dataset.json fetched to a local
    folder beside the working directory; images stay in S3 (read as shards with --stream)."""
    if not data.startswith("s3://"):
        return Path(data)
    bucket, prefix = s3.parse_s3_uri(data)
    local = Path(".cache") / "s3" / bucket / prefix
    client = s3.make_client(s3.is_anonymous(bucket, None))
    stats = s3.download(client, bucket, [(prefix + name, local / name) for name in (MANIFEST, DATASET_JSON)],
                        workers=2, desc=f"fetch {data}")
    if stats.failed:
        raise BinCounterError(f"{data} is not a prepared DATA_DIR: {', '.join(sorted(stats.failed))} missing")
    return local
