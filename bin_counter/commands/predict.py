"""predict: count every image of a folder, a `prepare` manifest or an S3 prefix with a logged model, a served
model (REST) or a SageMaker endpoint, check the recorded quantities, and list the bins a person should check.

Output CSV (RESULT_COLUMNS): image_id, predicted_count, confidence (calibrated), count_set (the counts that hold
the true count with the chosen coverage), expected_quantity (ABID metadata beside the photo, or --records),
record_p and record_check (suspect / consistent / outside), needs_check and check_reason, uncertainty, error.
Unreadable images get their reason in `error`; the run always finishes.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path, PurePosixPath

import pandas as pd

from bin_counter import BinCounterError, one_line
from bin_counter.cloud import s3
from bin_counter.config import PredictConfig, ResultsConfig
from bin_counter.core import abid
from bin_counter.core.answers import CONSISTENT, OUTSIDE, SUSPECT
from bin_counter.core.files import atomic_path, safe_join
from bin_counter.serving.clients import (  # noqa: F401  (0.2's home of the clients: kept importable for 0.3)
    ANSWER_COLUMNS,
    REQUEST_FAILED,
    Counter,
    LoadedModel,
    LocalModel,
    RemoteModel,
    RequestFailed,
    RestModel,
    SageMakerEndpoint,
    count_images,
    make_counter,
    payload,
    with_answer_columns,
)

log = logging.getLogger(__name__)
DEFAULT_CHECK_SHARE = ResultsConfig.check_share  # of the bins without a record, the share people look at
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


# ---- where the images come from --------------------------------------------------------------------------


def expected_from_metadata(path: Path) -> int | None:
    try:
        return abid.parse_count(path.read_bytes())
    except (OSError, ValueError):
        return None


def images_in_folder(folder: Path) -> pd.DataFrame:
    """Every image below `folder`; in ABID's layout the metadata gives the expected count."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    rows = []
    for path in paths:
        meta = path.parent.parent / "metadata" / f"{path.stem}.json" if path.parent.name == "bin-images" else None
        rows.append({"image_id": path.stem, "path": str(path),
                     "expected_quantity": expected_from_metadata(meta) if meta and meta.exists() else None})
    return pd.DataFrame(rows, columns=["image_id", "path", "expected_quantity"])


def images_in_manifest(path: Path) -> pd.DataFrame:
    """The images a manifest lists: this very csv (not a sibling manifest.csv), or DATA_DIR/manifest.csv."""
    from bin_counter.core.manifest import MANIFEST, read_manifest

    data_dir, name = (path.parent, path.name) if path.is_file() else (path, MANIFEST)
    frame = read_manifest(data_dir, name=name)
    return pd.DataFrame({"image_id": frame["image_id"], "path": frame["abs_path"],
                         "expected_quantity": frame["expected_quantity"]})


def cache_path(cache: Path, bucket: str, key: str) -> Path | None:
    """Where an S3 object goes in `cache`, or None (a logged skip) for a key that would land outside it."""
    try:
        return safe_join(cache, key)
    except ValueError as exc:
        log.warning("skipping s3://%s/%s: %s", bucket, key, exc)
        return None


def metadata_key_beside(key: str) -> str | None:
    """ABID's layout, as for local folders: X/bin-images/<id>.jpg is described by X/metadata/<id>.json only (a
    document of the same id elsewhere, `tuesday/metadata/<id>.json`, is another bin's)."""
    path = PurePosixPath(key)
    if path.parent.name != abid.IMAGE_PREFIX.rstrip("/"):
        return None
    return str(path.parent.parent / abid.METADATA_PREFIX / f"{path.stem}.json").removeprefix("./")


def pair_s3_keys(keys: list[str], bucket: str, cache: Path) -> tuple[list[dict], list[tuple[str, Path]]]:
    """Rows (image_id, key, path, meta) for the image keys of a listing, each with the metadata document beside
    it if there is one, and the (key, destination) downloads they need. Linear in the number of keys: an ABID
    prefix lists hundreds of thousands."""
    listed = set(keys)
    rows, jobs = [], {}
    for key in keys:
        if PurePosixPath(key).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        dest = cache_path(cache, bucket, key)
        if dest is None:
            continue
        meta_key = metadata_key_beside(key)
        meta = cache_path(cache, bucket, meta_key) if meta_key in listed else None
        jobs[key] = dest
        if meta is not None:
            jobs[meta_key] = meta
        rows.append({"image_id": abid.id_from_key(key), "key": key, "path": dest, "meta": meta})
    return rows, list(jobs.items())


def images_in_s3(uri: str, cache: Path, workers: int = 8) -> pd.DataFrame:
    """Download the images (and ABID metadata beside them, if any) under an S3 prefix into `cache`."""
    bucket, prefix = s3.parse_s3_uri(uri)
    client = s3.make_client(s3.is_anonymous(bucket, None), workers)
    rows, jobs = pair_s3_keys(list(s3.list_keys(client, bucket, prefix)), bucket, cache)
    if not rows:
        raise BinCounterError(f"no images under {uri}")
    s3.download(client, bucket, jobs, workers, desc=f"download {uri}")
    return pd.DataFrame([{"image_id": row["image_id"], "path": str(row["path"]),
                          "expected_quantity": expected_from_metadata(row["meta"]) if row["meta"] else None,
                          "key": row["key"]}  # ids repeat across prefixes: the key says which photo it was
                         for row in rows], columns=["image_id", "path", "expected_quantity", "key"])


def collect(source: str, cache: Path) -> pd.DataFrame:
    if source.startswith("s3://"):
        return images_in_s3(source, cache)
    path = Path(source)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise BinCounterError(f"input not found: {source}")
        return images_in_manifest(path)
    if path.is_dir() and (path / "manifest.csv").exists():
        return images_in_manifest(path)
    if path.is_dir():
        return images_in_folder(path)
    if path.is_file():
        return pd.DataFrame([{"image_id": path.stem, "path": str(path), "expected_quantity": None}])
    raise BinCounterError(f"input not found: {source} (a folder, a manifest.csv, an image or s3://bucket/prefix)")


# ---- the command -----------------------------------------------------------------------------------------


def least_certain(results: pd.DataFrame, among: pd.Series, share: float) -> pd.Series:
    """The `share` of the rows in `among` that the model is least sure of (highest entropy): where a limited
    human budget finds the most errors, though on the dev folds only slightly more than a random sample would
    (experiments/README.md, the risk-coverage curve of every run)."""
    candidates = results.loc[among, "uncertainty"].dropna()
    take = int(math.ceil(share * len(candidates))) if share > 0 else 0
    chosen = candidates.sort_values(ascending=False, kind="stable").index[:take]
    return results.index.isin(chosen)


def flag_for_check(results: pd.DataFrame, check_share: float) -> pd.DataFrame:
    """needs_check and check_reason: unreadable or not counted; a suspect record; a record the model cannot
    judge; and, among the bins without a record, the `check_share` least certain."""
    errors = results["error"].fillna("")
    readable = errors == ""
    verdict = results["record_check"].fillna("")
    no_record = readable & results["expected_quantity"].isna()
    unsure = least_certain(results, no_record, check_share)
    reasons = []
    for error, check, low in zip(errors, verdict, unsure):
        if error:
            reasons.append("not counted: the request failed" if error.startswith(REQUEST_FAILED) else
                           "unreadable image")
        elif check == SUSPECT:
            reasons.append("record suspect: the photo contradicts the recorded quantity")
        elif check == OUTSIDE:
            reasons.append("record outside the counts the model knows")
        elif low:
            reasons.append("least certain, no record")
        else:
            reasons.append("")
    results["check_reason"] = reasons
    results["needs_check"] = results["check_reason"] != ""
    return results


RESULT_COLUMNS = ["image_id", "predicted_count", "confidence", "count_set", "expected_quantity", "record_p",
                  "record_check", "needs_check", "check_reason", "uncertainty", "error"]


def spreadsheet_safe(value):
    """A cell a spreadsheet would run as a formula (=, +, -, @ first) is quoted with a leading apostrophe."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") else value


def write_results(results: pd.DataFrame, output: str, check_share: float = DEFAULT_CHECK_SHARE) -> pd.DataFrame:
    """The counts as `output` and the bins a person should look at as <output>_manual_check.csv, both written
    whole or not at all, and a summary for the user; `results` has image_id, expected_quantity and the model's
    answer columns. Shared by `predict` and `transform`."""
    results = flag_for_check(results, check_share)
    results["expected_quantity"] = pd.to_numeric(results["expected_quantity"], errors="coerce").astype("Int64")
    columns = RESULT_COLUMNS + [c for c in ("key",) if c in results]  # an S3 input's object key
    table = results[columns].copy()
    table["image_id"] = table["image_id"].map(spreadsheet_safe)
    with atomic_path(Path(output)) as path:
        table.to_csv(path, index=False)
    check = table[results["needs_check"].to_numpy()]
    check_path = Path(output).with_name(Path(output).stem + "_manual_check.csv")
    with atomic_path(check_path) as path:
        check.to_csv(path, index=False)
    errors = results["error"].fillna("")
    failed = errors.str.startswith(REQUEST_FAILED)
    print(f"counted {int((errors == '').sum())} of {len(results)} images -> {output}")
    known = results["expected_quantity"].notna()
    if known.any():
        verdicts = results.loc[known, "record_check"].value_counts()
        print(f"{int(known.sum())} recorded quantities checked: {int(verdicts.get(SUSPECT, 0))} suspect, "
              f"{int(verdicts.get(CONSISTENT, 0))} consistent, {int(verdicts.get(OUTSIDE, 0))} outside the counts "
              "the model knows")
    print(f"{len(check)} bins for a manual check (suspect or unjudgeable records, the {check_share:.0%} least certain "
          f"bins without a record, unreadable, not counted) -> {check_path}")
    for row in results[(errors != "") & ~failed].itertuples():
        print(f"  unreadable {row.image_id}: {row.error}")
    if failed.any():
        print(f"  {int(failed.sum())} images not counted because a request failed, e.g. {errors[failed].iloc[0]}")
    if len(results) and (errors != "").all():
        raise BinCounterError(f"no image was counted ({errors.iloc[0]}); every image is listed in {check_path}")
    return results


def read_records(path: str) -> pd.DataFrame:
    """--records FILE.csv: `expected_quantity` with `image_id` or `path` (path wins: ids repeat across days)."""
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "path": str})
    except FileNotFoundError:
        raise BinCounterError(f"--records: no such file: {path}") from None
    except (OSError, ValueError, UnicodeError) as exc:
        raise BinCounterError(f"--records: {path} is not a readable CSV: {one_line(exc)}") from None
    keys = [k for k in ("path", "image_id") if k in frame.columns]
    if "expected_quantity" not in frame.columns or not keys:
        raise BinCounterError(f"--records: {path} needs an expected_quantity column and image_id or path")
    quantities = pd.to_numeric(frame["expected_quantity"], errors="coerce")
    if quantities.isna().any():
        row = int(quantities.isna().to_numpy().argmax()) + 2
        raise BinCounterError(f"--records: {path} line {row}: expected_quantity is not a number")
    return frame.assign(expected_quantity=quantities)[[*keys, "expected_quantity"]]


def attach_records(images: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """Each image's recorded quantity from --records, over the metadata's; matched by path, else by image_id."""
    images = images.copy()
    given = pd.Series(float("nan"), index=images.index)
    if "path" in records:
        by_path = records.dropna(subset=["path"]).drop_duplicates("path", keep="last").set_index("path")
        resolved = {str(Path(p).resolve()): q for p, q in by_path["expected_quantity"].items()}
        given = images["path"].map(lambda p: resolved.get(str(Path(p).resolve()), float("nan")))
    if "image_id" in records:
        by_id = records.dropna(subset=["image_id"]).drop_duplicates("image_id", keep="last").set_index("image_id")
        given = given.fillna(images["image_id"].astype(str).map(by_id["expected_quantity"]))
    images["expected_quantity"] = given.fillna(pd.to_numeric(images["expected_quantity"], errors="coerce"))
    return images


def predict(config: PredictConfig, counter: Counter | None = None) -> pd.DataFrame:
    """Count every image of `config.input` into `config.output`, with count sets and the check of each recorded
    quantity; images that could not be read or counted are listed with their reason, and the results are written
    even when some requests failed. `counter` counts instead of the model the config names."""
    records = read_records(config.records) if config.records else None  # first: a bad file fails before a model loads
    if counter is None:
        counter = make_counter(config.model_uri, config.endpoint, config.url, config.region)
    source, output, batch_size, check_share = config.input, config.output, config.batch_size, config.check_share
    coverage, false_alarm = config.coverage, config.false_alarm
    params = {k: v for k, v in (("coverage", coverage), ("false_alarm", false_alarm)) if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        images = collect(source, Path(tmp))
        if images.empty:
            raise BinCounterError(f"no images in {source}")
        if records is not None:  # read_records' table
            images = attach_records(images, records)
        counts = count_images(counter, list(images["path"]), batch_size, records=images["expected_quantity"],
                              params=params)
        return write_results(pd.concat([images.reset_index(drop=True), counts], axis=1), output, check_share)


