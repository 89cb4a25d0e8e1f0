"""prepare: ABID source (bundled sample, local dir, S3) -> validated, filtered, split DATA_DIR (core.dataset), and
the `prepare` command's MLflow run around it. S3 sources are downloaded into DATA_DIR/raw/ first; `--upload` copies
the result to S3.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bin_counter import BinCounterError
from bin_counter.cloud import s3
from bin_counter.config import PrepareConfig
from bin_counter.core import abid
from bin_counter.core.dataset import (
    claim_output,
    ids_from_file_list,
    ids_in_local,
    local_root,
    parse_split,
    raw_cache,
    screen_ids,
    write_dataset,
)
from bin_counter.core.files import remove_partial_files, safe_join
from bin_counter.core.manifest import DATASET_JSON, MANIFEST, REJECTED, SHARD_DIR, SPLITS

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    manifest: pd.DataFrame
    rejected: pd.DataFrame
    classes: list[int]
    out: Path
    downloaded: int = 0
    already_present: int = 0


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


def build_data_dir(cfg: PrepareConfig) -> PrepareResult:
    """The DATA_DIR cfg.out from cfg.source (S3 sources downloaded first), with shards if asked; no MLflow run."""
    classes = abid.parse_classes(cfg.classes)
    ratios = parse_split(cfg.split)
    s3.check_workers(cfg.workers)
    out = Path(cfg.out)
    claim_output(out, cfg.source, cfg.replace)
    root, ids, refused, stats = gather_ids(cfg, out)
    if not ids:
        example = f" ({len(refused)} names refused, e.g. {refused[0]['reason']})" if refused else ""
        raise BinCounterError(f"no ABID pairs found in {cfg.source}{example}")
    manifest, rejected = write_dataset(cfg, classes, ratios, root, ids, refused)
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


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """`bin-counter prepare`: build the DATA_DIR, optionally upload it, and log it all to an MLflow run."""
    import mlflow

    from bin_counter import plots, tracking
    from bin_counter.config import as_params

    with tracking.run("prepare"):
        tracking.log_params({f"prepare.{k}": v for k, v in as_params(cfg).items() if v != ""})
        result = build_data_dir(cfg)
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
