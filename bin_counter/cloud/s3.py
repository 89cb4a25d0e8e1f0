"""S3 access for ABID downloads and uploads: parallel, retried, resumable and atomic."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from tqdm.auto import tqdm

from bin_counter import BinCounterError
from bin_counter.core.abid import PUBLIC_BUCKET
from bin_counter.core.files import atomic_path, safe_join, sha256_of
from bin_counter.core.manifest import DATASET_JSON, MANIFEST
from bin_counter.core.uris import parse_s3_uri


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
        message = collapse_whitespace(exc.response.get("Error", {}).get("Message", ""))
        return BinCounterError(f"S3 error on {uri}: {code} {message}".strip())
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return BinCounterError(f"no AWS credentials for {uri}; configure them, or pass --anonymous for a public bucket")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return BinCounterError(f"cannot reach S3 for {uri}: {collapse_whitespace(exc)}")
    return BinCounterError(f"S3 failure on {uri}: {collapse_whitespace(exc)}")


def collapse_whitespace(message) -> str:
    """The whole of a message that may span lines (a server's), as one line for the CLI to print; unlike
    bin_counter.one_line, which keeps an exception's first line only."""
    return " ".join(str(message).split())


def list_keys(client, bucket: str, prefix: str) -> Iterator[str]:
    uri = f"s3://{bucket}/{prefix}"
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]
    except (BotoCoreError, ClientError) as exc:
        raise explain(exc, uri) from None


DENIED = ("AccessDenied", "403", "Forbidden")
MISSING = ("NoSuchKey", "404", "NotFound")


def error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def check_bucket(client, bucket: str, for_write: bool = False) -> None:
    """Fail early, in one line, on a bucket that is missing or that these credentials cannot use.

    A write-only bucket (PutObject allowed, ListBucket not) answers HEAD with 403 although uploads succeed, so
    for_write lets a 403 through: the first PUT then says whether writing is really denied."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if for_write and error_code(exc) in DENIED:
            return
        raise explain(exc, f"s3://{bucket}") from None
    except BotoCoreError as exc:
        raise explain(exc, f"s3://{bucket}") from None


def check_workers(workers: int) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise BinCounterError(f"--workers must be at least 1 (got {workers!r})")


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


def _record_download(future, key: str, bucket: str, stats: TransferStats) -> None:
    """Count a finished download; a missing object or a local write failure is that key's problem, anything else
    (access denied, throttled past retries, no network) is fatal and raised as one line."""
    try:
        future.result()
        stats.transferred += 1
    except ClientError as exc:
        if error_code(exc) in MISSING:
            stats.failed[key] = "missing in S3"
        else:
            raise explain(exc, f"s3://{bucket}/{key}") from None
    except BotoCoreError as exc:
        raise explain(exc, f"s3://{bucket}/{key}") from None
    except OSError as exc:
        stats.failed[key] = f"download failed: {exc}"


def run_bounded(pool: ThreadPoolExecutor, work: Iterable, start, finish, limit: int) -> None:
    """Submit `start(item)` for each item with at most `limit` futures in flight, calling `finish(future, item)`
    as each completes. The first exception from `finish` (or a KeyboardInterrupt) cancels everything not yet
    running and is raised at once: an error does not wait behind a queue of a million jobs."""
    todo, end = iter(work), object()
    pending: dict = {}
    try:
        while True:
            while len(pending) < limit and (item := next(todo, end)) is not end:
                pending[pool.submit(start, item)] = item
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                finish(future, pending.pop(future))
    except BaseException:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)  # the few running ones finish atomically in the background
        raise


def download(client, bucket: str, jobs: Iterable[tuple[str, Path]], workers: int, desc: str,
             refresh: bool = False) -> TransferStats:
    """Fetch (key, dest) pairs in parallel; a dest already present is complete (written atomically) and skipped,
    unless `refresh`: then it is fetched again and replaced atomically (a reader sees the old file or the new).

    What finished before a fatal error or an interrupt stays on disk, so a rerun resumes from there."""
    check_workers(workers)
    stats = TransferStats()
    todo = []
    for key, dest in jobs:
        if dest.exists() and not refresh:
            stats.skipped += 1
        else:
            todo.append((key, dest))
    pool = ThreadPoolExecutor(max_workers=workers)
    with tqdm(total=len(todo), desc=desc, unit="file") as bar:
        def finish(future, job):
            _record_download(future, job[0], bucket, stats)
            bar.update()

        run_bounded(pool, todo, lambda job: _download_one(client, bucket, *job), finish, limit=2 * workers)
    pool.shutdown()
    return stats


def _upload_one(client, bucket: str, src: Path, key: str, transfer: TransferConfig) -> bool:
    digest = sha256_of(src)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] == src.stat().st_size and head.get("Metadata", {}).get("sha256") == digest:
            return False
    except ClientError as exc:
        # 404: not there yet; 403: a write-only bucket that will not say, so upload it anyway
        if error_code(exc) not in MISSING + DENIED:
            raise
    client.upload_file(str(src), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}}, Config=transfer)
    return True


def upload(client, bucket: str, jobs: list[tuple[Path, str]], workers: int) -> TransferStats:
    """Upload (src, key) pairs with boto3's managed transfer, skipping objects already there unchanged."""
    check_workers(workers)
    stats = TransferStats()
    transfer = TransferConfig(max_concurrency=2, use_threads=True)
    pool = ThreadPoolExecutor(max_workers=workers)
    with tqdm(total=len(jobs), desc="upload", unit="file") as bar:
        def finish(future, job):
            uri = f"s3://{bucket}/{job[1]}"
            try:
                if future.result():
                    stats.transferred += 1
                else:
                    stats.skipped += 1
            except S3UploadFailedError as exc:  # boto3 wraps the PUT's ClientError in this
                raise BinCounterError(f"upload to {uri} refused: {collapse_whitespace(exc)}") from None
            except (BotoCoreError, ClientError) as exc:
                raise explain(exc, uri) from None
            except OSError as exc:
                raise BinCounterError(f"cannot read {job[0]} for {uri}: {exc}") from None
            bar.update()

        run_bounded(pool, jobs, lambda job: _upload_one(client, bucket, *job, transfer), finish, limit=2 * workers)
    pool.shutdown()
    return stats


def local_copy(data: str) -> Path:
    """A prepared DATA_DIR in S3 (from `prepare --upload`) gets its manifest and dataset.json fetched to a local
    folder beside the working directory; images stay in S3 (read as shards with --stream). They are fetched on
    every call: another `prepare --upload` to the prefix changes them, and a stale copy would pair the old
    classes, weights and dataset digest with the new shards."""
    if not data.startswith("s3://"):
        return Path(data)
    bucket, prefix = parse_s3_uri(data)
    try:
        local = safe_join(Path(".cache") / "s3", f"{bucket}/{prefix}".rstrip("/"))
    except ValueError as exc:
        raise BinCounterError(f"refusing {data} as a DATA_DIR: {exc}") from None
    client = make_client(is_anonymous(bucket, None))
    stats = download(client, bucket, [(prefix + name, local / name) for name in (MANIFEST, DATASET_JSON)],
                        workers=2, desc=f"fetch {data}", refresh=True)
    if stats.failed:
        raise BinCounterError(f"{data} is not a prepared DATA_DIR: {', '.join(sorted(stats.failed))} missing")
    return local
