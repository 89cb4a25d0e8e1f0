"""predict: count every image of a folder, a `prepare` manifest or an S3 prefix with a logged model, a served
model (REST) or a SageMaker endpoint, and list the bins a person should check.

Output CSV: image_id, predicted_count, confidence, expected_quantity and mismatch (where ABID metadata is known),
needs_check, error. Unreadable images get their reason in `error`; the run always finishes.
"""
from __future__ import annotations

import base64
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import pandas as pd
from tqdm.auto import tqdm

from bin_counter import BinCounterError, abid, s3
from bin_counter.files import atomic_path, safe_join

log = logging.getLogger(__name__)
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
    from bin_counter.manifest import MANIFEST, read_manifest

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


def pair_s3_keys(keys: list[str], bucket: str, cache: Path) -> tuple[list[dict], list[tuple[str, Path]]]:
    """Rows (image_id, path, meta) for the image keys of a listing, each with the metadata document of its id if
    there is one, and the (key, destination) downloads they need. Linear in the number of keys: an ABID prefix
    lists hundreds of thousands."""
    metadata: dict[str, str] = {}
    # the shallowest document of an id wins: metadata/<id>.json over metadata/archive/<id>.json
    for key in sorted((k for k in keys if k.endswith(".json")), key=lambda k: k.count("/"), reverse=True):
        metadata[abid.id_from_key(key)] = key
    rows, jobs = [], {}
    for key in keys:
        if PurePosixPath(key).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        dest = cache_path(cache, bucket, key)
        if dest is None:
            continue
        image_id = abid.id_from_key(key)
        meta_key = metadata.get(image_id)
        meta = cache_path(cache, bucket, meta_key) if meta_key else None
        jobs[key] = dest
        if meta is not None:
            jobs[meta_key] = meta
        rows.append({"image_id": image_id, "path": dest, "meta": meta})
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
                          "expected_quantity": expected_from_metadata(row["meta"]) if row["meta"] else None}
                         for row in rows], columns=["image_id", "path", "expected_quantity"])


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


# ---- who counts ------------------------------------------------------------------------------------------


class Counter(Protocol):
    def __call__(self, paths: list[str]) -> pd.DataFrame: ...


def encoded(paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        try:
            out.append(base64.b64encode(Path(path).read_bytes()).decode())
        except OSError:
            out.append("")  # the model answers with a per-row error
    return out


def payload(paths: list[str]) -> bytes:
    """What a REST client sends to /invocations: base64 images, bad rows reported instead of failing the batch."""
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in encoded(paths)]},
                       "params": {"on_error": "skip"}}).encode()


def from_response(body: bytes) -> pd.DataFrame:
    return pd.DataFrame(json.loads(body)["predictions"])


@dataclass
class LocalModel:
    model_uri: str

    def __post_init__(self):
        from bin_counter.evaluate import load_model

        self.model = load_model(self.model_uri)

    def __call__(self, paths: list[str]) -> pd.DataFrame:
        return self.model.predict(pd.DataFrame({"path": paths}), params={"on_error": "skip"})


@dataclass
class RestModel:
    url: str
    timeout: float = 120.0

    def __call__(self, paths: list[str]) -> pd.DataFrame:
        import requests

        try:
            response = requests.post(self.url.rstrip("/") + "/invocations", data=payload(paths),
                                     headers={"Content-Type": "application/json"}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise BinCounterError(f"cannot reach the model at {self.url}: {exc}") from None
        if response.status_code != 200:
            raise BinCounterError(f"model at {self.url} answered {response.status_code}: {response.text[:300]}")
        return from_response(response.content)


@dataclass
class SageMakerEndpoint:
    endpoint: str
    region: str | None = None

    def __call__(self, paths: list[str]) -> pd.DataFrame:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client("sagemaker-runtime", region_name=self.region)
        try:
            response = client.invoke_endpoint(EndpointName=self.endpoint, ContentType="application/json",
                                              Body=payload(paths))
        except (BotoCoreError, ClientError) as exc:
            raise BinCounterError(f"endpoint {self.endpoint}: {exc}") from None
        return from_response(response["Body"].read())


# ---- the command -----------------------------------------------------------------------------------------


def count_images(counter: Counter, images: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    parts = []
    paths = list(images["path"])
    for start in tqdm(range(0, len(paths), batch_size), desc="count", unit="batch"):
        parts.append(counter(paths[start:start + batch_size]))
    predictions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return pd.concat([images.reset_index(drop=True), predictions[["predicted_count", "confidence", "error"]]], axis=1)


def flag_for_check(results: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    known = results["expected_quantity"].notna()
    readable = results["error"].fillna("") == ""
    results["mismatch"] = known & readable & (results["predicted_count"] != results["expected_quantity"])
    low = readable & (results["confidence"] < min_confidence)
    results["needs_check"] = results["mismatch"] | low | ~readable
    results["check_reason"] = [
        "unreadable image" if not ok else "count differs from metadata" if mis else "low confidence" if lo else ""
        for ok, mis, lo in zip(readable, results["mismatch"], low)
    ]
    return results


def predict(counter: Counter, source: str, output: str, min_confidence: float = 0.5, batch_size: int = 16) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        images = collect(source, Path(tmp))
        if images.empty:
            raise BinCounterError(f"no images in {source}")
        results = flag_for_check(count_images(counter, images, batch_size), min_confidence)
        columns = ["image_id", "predicted_count", "confidence", "expected_quantity", "mismatch", "needs_check",
                   "check_reason", "error"]
        results["expected_quantity"] = results["expected_quantity"].astype("Int64")
        with atomic_path(Path(output)) as path:
            results[columns].to_csv(path, index=False)
        check = results[results["needs_check"]]
        check_path = Path(output).with_name(Path(output).stem + "_manual_check.csv")
        with atomic_path(check_path) as path:
            check[columns].to_csv(path, index=False)
    unreadable = int((results["error"].fillna("") != "").sum())
    print(f"counted {len(results) - unreadable} of {len(results)} images -> {output}")
    if results["expected_quantity"].notna().any():
        print(f"{int(results['mismatch'].sum())} disagree with the metadata's EXPECTED_QUANTITY")
    print(f"{len(check)} bins for a manual check (confidence < {min_confidence}, mismatch, unreadable) -> {check_path}")
    for row in results[results["error"].fillna("") != ""].itertuples():
        print(f"  unreadable {row.image_id}: {row.error}")
    return results


def make_counter(model_uri: str | None, endpoint: str | None, url: str | None, region: str | None) -> Counter:
    chosen = [x for x in (model_uri, endpoint, url) if x]
    if len(chosen) != 1:
        raise BinCounterError("give exactly one of --model-uri, --endpoint, --url")
    if model_uri:
        return LocalModel(model_uri)
    if endpoint:
        return SageMakerEndpoint(endpoint, region)
    return RestModel(url)
