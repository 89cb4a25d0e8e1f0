"""S3 access for ABID downloads and uploads: parallel, retried, resumable and atomic."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import boto3
import botocore
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from tqdm.auto import tqdm

from bin_counter import BinCounterError
from bin_counter.abid import PUBLIC_BUCKET
from bin_counter.files import atomic_path, sha256_of


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> (`bucket`, `some/prefix/`)."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise BinCounterError(f"not an S3 URI: {uri!r} (expected s3://bucket[/prefix])")
    bucket, _, prefix = uri[5:].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_client(anonymous: bool = False, workers: int = 8):
    """A boto3 S3 client that retries throttling and dropped connections; honours AWS_ENDPOINT_URL."""
    config = Config(
        retries={"max_attempts": 8, "mode": "standard"},
        max_pool_connections=max(10, workers * 2),
        connect_timeout=10,
        read_timeout=60,
    )
    if anonymous:  # ABID's public bucket is read without credentials
        config = config.merge(Config(signature_version=botocore.UNSIGNED))
    return boto3.session.Session().client("s3", config=config)


def is_anonymous(bucket: str, requested: bool | None) -> bool:
    return requested if requested is not None else bucket == PUBLIC_BUCKET


def explain(exc: Exception, uri: str) -> BinCounterError:
    """Turn a botocore failure into the one line a user needs."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404") and "Key" not in str(exc.response.get("Error", {})):
            return BinCounterError(f"S3 bucket of {uri} does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return BinCounterError(f"access denied to {uri} ({code}); check your AWS credentials or --anonymous")
        return BinCounterError(f"S3 error on {uri}: {code} {exc.response.get('Error', {}).get('Message', '')}".strip())
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return BinCounterError(f"no AWS credentials for {uri}; configure them, or pass --anonymous for a public bucket")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return BinCounterError(f"cannot reach S3 for {uri}: {exc}")
    return BinCounterError(f"S3 failure on {uri}: {exc}")


def list_keys(client, bucket: str, prefix: str) -> Iterator[str]:
    uri = f"s3://{bucket}/{prefix}"
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]
    except (BotoCoreError, ClientError) as exc:
        raise explain(exc, uri) from None


def check_bucket(client, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        raise explain(exc, f"s3://{bucket}") from None


@dataclass
class TransferStats:
    transferred: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason


def _download_one(client, bucket: str, key: str, dest: Path) -> None:
    response = client.get_object(Bucket=bucket, Key=key)
    expected = response["ContentLength"]
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as handle:
            for chunk in response["Body"].iter_chunks(1 << 16):
                handle.write(chunk)
        if tmp.stat().st_size != expected:  # a dropped connection must not leave a short file
            raise OSError(f"got {tmp.stat().st_size} of {expected} bytes")


def download(client, bucket: str, jobs: Iterable[tuple[str, Path]], workers: int, desc: str) -> TransferStats:
    """Fetch (key, dest) pairs in parallel; a dest already present is complete (written atomically) and skipped."""
    stats = TransferStats()
    todo = []
    for key, dest in jobs:
        if dest.exists():
            stats.skipped += 1
        else:
            todo.append((key, dest))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(todo), desc=desc, unit="file") as bar:
        futures = {pool.submit(_download_one, client, bucket, key, dest): key for key, dest in todo}
        for future in as_completed(futures):
            key = futures[future]
            try:
                future.result()
                stats.transferred += 1
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404"):
                    stats.failed[key] = "missing in S3"
                else:
                    raise explain(exc, f"s3://{bucket}/{key}") from None
            except BotoCoreError as exc:
                raise explain(exc, f"s3://{bucket}/{key}") from None
            except OSError as exc:
                stats.failed[key] = f"download failed: {exc}"
            bar.update()
    return stats


def _upload_one(client, bucket: str, src: Path, key: str, transfer: TransferConfig) -> bool:
    digest = sha256_of(src)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] == src.stat().st_size and head.get("Metadata", {}).get("sha256") == digest:
            return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
    client.upload_file(str(src), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}}, Config=transfer)
    return True


def upload(client, bucket: str, jobs: list[tuple[Path, str]], workers: int) -> TransferStats:
    """Upload (src, key) pairs with boto3's managed transfer, skipping objects already there unchanged."""
    stats = TransferStats()
    transfer = TransferConfig(max_concurrency=2, use_threads=True)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(jobs), desc="upload", unit="file") as bar:
        futures = {pool.submit(_upload_one, client, bucket, src, key, transfer): key for src, key in jobs}
        for future in as_completed(futures):
            try:
                if future.result():
                    stats.transferred += 1
                else:
                    stats.skipped += 1
            except (BotoCoreError, ClientError) as exc:
                raise explain(exc, f"s3://{bucket}/{futures[future]}") from None
            bar.update()
    return stats


def default_workers() -> int:
    return min(32, (os.cpu_count() or 2) * 4)
