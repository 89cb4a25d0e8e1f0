"""transform: count a whole prefix of bin photos with a SageMaker batch transform job, then write the same CSV
`predict` writes.

MLflow's serving container answers JSON (or CSV) requests, not raw JPEGs, so the photos are staged first: read
once here, base64-encoded into request files of at most ROWS_PER_REQUEST images and REQUEST_BYTES bytes
(SageMaker's default MaxPayloadInMB is 6), uploaded under STAGING/JOB/requests/ with an index of which image is
which row. `mlflow.sagemaker.deploy_transform_job` then runs the model on every request file (SplitType None: one
file, one request) and SageMaker writes each answer to STAGING/JOB/output/<file>.out. The join reads those answers
back in index order, so each image gets its own count, confidence and error, a request file without an answer
marks its images "not counted", and the result goes through predict's own manual-check rules.

    bin-counter transform --model-uri models:/bin-counter@champion --input s3://bins/today/ \
        --staging s3://bins/transform --execution-role-arn ARN --image-url URL --region us-east-1
    bin-counter transform --join s3://bins/transform/JOB --output results.csv    # join an earlier job again
"""
from __future__ import annotations

import base64
import json
import logging
import math
import re
import secrets
import tempfile
import time
from pathlib import Path

import pandas as pd

from bin_counter import BinCounterError
from bin_counter.cloud import s3
from bin_counter.commands.predict import DEFAULT_CHECK_SHARE, attach_records, collect, read_records, write_results
from bin_counter.config import TransformConfig
from bin_counter.serving.clients import ANSWER_COLUMNS, REQUEST_FAILED, payload
from bin_counter.tracking import redact_uri

log = logging.getLogger(__name__)
ROWS_PER_REQUEST = 32
REQUEST_BYTES = 5_000_000  # under SageMaker's 6 MB default MaxPayloadInMB, with room for the JSON around it
INDEX = "index.json"
JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's rule for transform job names


def request_body(images: list[str], records: list[int | None] | None = None, params: dict | None = None) -> bytes:
    # on_error=skip: one unreadable photo gets a row with its reason instead of failing its whole request file
    return payload(images, records, params)


def stage_requests(images: pd.DataFrame, folder: Path, params: dict | None = None) -> dict:
    """Request files in `folder` and the index that maps their rows back to images.

    An image that cannot be read here, or alone exceeds a request, is not sent; the index keeps it with its reason.
    The request files' names hold a nonce of this staging, and so do their outputs' (<request>.out): the join
    only reads outputs of these very requests, never another job's with the same row counts.
    """
    parts, current, size, skipped = [], [], 0, []
    empty = len(request_body([]))
    nonce = secrets.token_hex(4)

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(parts):05d}-{nonce}.json"
            (folder / name).write_bytes(request_body([row.pop("b64") for row in current],
                                                     [row["expected_quantity"] for row in current], params))
            parts.append({"file": name, "rows": current})
        current, size = [], 0

    for row in images.itertuples():
        expected = None if pd.isna(row.expected_quantity) else float(row.expected_quantity)
        entry = {"image_id": str(row.image_id), "expected_quantity": expected}
        try:
            b64 = base64.b64encode(Path(row.path).read_bytes()).decode()
        except OSError as exc:
            skipped.append({**entry, "error": f"unreadable image: {exc.strerror or exc}"})
            continue
        cost = len(b64) + 4
        if empty + cost > REQUEST_BYTES:
            skipped.append({**entry, "error": f"image is {len(b64):,} bytes as base64, over a transform request's "
                                              f"{REQUEST_BYTES:,}"})
            continue
        if len(current) == ROWS_PER_REQUEST or empty + size + cost > REQUEST_BYTES:
            flush()
        current.append({**entry, "b64": b64})
        size += cost
    flush()
    return {"parts": parts, "skipped": skipped, "nonce": nonce}


def default_job_name() -> str:
    # a random suffix as for training jobs: two transforms started in one second must not share a staging prefix
    return time.strftime("bin-counter-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def refuse_staged(staging: str) -> None:
    """A job's staging prefix is written once: staging again over it would mix two jobs' requests and outputs."""
    bucket, prefix = s3.parse_s3_uri(staging)
    if next(iter(s3.list_keys(s3.make_client(), bucket, prefix)), None) is not None:
        raise BinCounterError(f"{staging} already holds a staged transform job: choose another --job-name (or "
                              f"join it: bin-counter transform --join {staging})")


def check_job_name(name: str) -> str:
    if not JOB_NAME.match(name):
        raise BinCounterError(f"bad --job-name {name!r}: 1-63 letters, digits and hyphens, not starting with a hyphen")
    return name


def job_request(job_name: str, model_uri: str, staging: str, region: str, execution_role_arn: str | None,
                image_url: str | None, instance_type: str, instance_count: int, timeout_seconds: int) -> dict:
    """The keyword arguments of `mlflow.sagemaker.deploy_transform_job` for a staged job."""
    bucket, _ = s3.parse_s3_uri(staging)
    request = {
        "job_name": job_name, "model_uri": model_uri,
        "s3_input_data_type": "S3Prefix", "s3_input_uri": f"{staging}/requests/", "content_type": "application/json",
        "split_type": "None",  # each request file is one request: its rows stay together and in order
        "s3_output_path": f"{staging}/output", "accept": "application/json", "assemble_with": "None",
        "region_name": region, "instance_type": instance_type, "instance_count": instance_count,
        "bucket": bucket,  # the model archive goes beside the requests, and is deleted with the model afterwards
        "archive": False, "synchronous": True, "timeout_seconds": timeout_seconds,
    }
    if execution_role_arn:
        request["execution_role_arn"] = execution_role_arn
    if image_url:
        request["image_url"] = image_url
    return request


def upload_staged(folder: Path, staging: str, index: dict) -> None:
    bucket, prefix = s3.parse_s3_uri(staging)
    client = s3.make_client()
    try:
        for part in index["parts"]:
            client.upload_file(str(folder / part["file"]), bucket, f"{prefix}requests/{part['file']}")
        # the index is not under requests/: SageMaker would send it to the model as one more request
        client.put_object(Bucket=bucket, Key=f"{prefix}{INDEX}", Body=json.dumps(index).encode())
    except Exception as exc:
        raise s3.explain(exc, staging) from None


def answers(frame_rows: int, body: bytes, file: str) -> tuple[list[dict] | None, str]:
    """The predictions of one request file, or None and why they cannot be used."""

    try:
        predictions = json.loads(body)["predictions"]
        if not isinstance(predictions, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return None, f"{REQUEST_FAILED}: the transform output of {file} is not the model's JSON ({body[:80]!r})"
    if len(predictions) != frame_rows:
        return None, f"{REQUEST_FAILED}: the transform output of {file} has {len(predictions)} rows for {frame_rows}"
    return predictions, ""


def number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def join(staging: str) -> pd.DataFrame:
    """One row per staged image: the job's answers, or the reason an image has none."""

    bucket, prefix = s3.parse_s3_uri(staging)
    client = s3.make_client()
    try:
        index = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}{INDEX}")["Body"].read())
    except Exception as exc:
        if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise BinCounterError(f"no transform staged at {staging} (no {INDEX})") from None
        raise s3.explain(exc, staging) from None
    rows = []
    for part in index["parts"]:
        if index.get("nonce") and index["nonce"] not in part["file"]:  # an index edited, or of an older version
            raise BinCounterError(f"{staging}/{INDEX} lists {part['file']}, not a request of its staging")
        key = f"{prefix}output/{part['file']}.out"
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            predictions, reason = answers(len(part["rows"]), body, part["file"])
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise s3.explain(exc, staging) from None
            predictions, reason = None, f"{REQUEST_FAILED}: the transform job wrote no output for {part['file']}"
        for i, entry in enumerate(part["rows"]):
            rows.append({"image_id": entry["image_id"], "expected_quantity": entry["expected_quantity"],
                         **answer_row(predictions[i] if predictions else {}, reason)})
    for entry in index["skipped"]:
        rows.append({"image_id": entry["image_id"], "expected_quantity": entry["expected_quantity"],
                     **answer_row({}, entry["error"])})
    return pd.DataFrame(rows, columns=["image_id", "expected_quantity", *ANSWER_COLUMNS])


def answer_row(answer: dict, reason: str) -> dict:
    """One image's answer from the job's JSON, with predict's columns; a row the model could not read comes back
    with null (JSON's NaN) numbers, a model logged before count sets without their columns."""
    count = number(answer.get("predicted_count"))
    row = {name: answer.get(name) if answer.get(name) is not None else empty for name, empty in ANSWER_COLUMNS.items()}
    row.update(predicted_count=-1 if math.isnan(count) else int(count), confidence=number(answer.get("confidence")),
               uncertainty=number(answer.get("uncertainty")), record_p=number(answer.get("record_p")),
               error=reason or str(answer.get("error") or ""))
    return row


def transform(config: TransformConfig) -> pd.DataFrame | dict:
    """Stage `config.input`'s photos, run the batch transform job, join its output into `config.output`."""
    records = read_records(config.records) if config.records else None  # first: a bad file fails at once
    source, staging, dry_run = config.input, config.staging, config.dry_run
    if not staging.startswith("s3://"):
        raise BinCounterError(f"--staging must be s3://bucket/prefix (SageMaker reads and writes S3), got {staging!r}")
    if not config.execution_role_arn and not dry_run:
        raise BinCounterError("--execution-role-arn is required: the role SageMaker runs the job with")
    job = check_job_name(config.job_name or default_job_name())
    job_staging = staging.rstrip("/") + "/" + job
    request = job_request(job, config.model_uri, job_staging, config.region, config.execution_role_arn,
                          config.image_url, config.instance_type, config.instance_count, config.timeout)
    with tempfile.TemporaryDirectory() as tmp:
        images = collect(source, Path(tmp) / "images")
        if images.empty:
            raise BinCounterError(f"no images in {source}")
        if records is not None:  # read_records' table
            images = attach_records(images, records)
        requests_dir = Path(tmp) / "requests"
        requests_dir.mkdir()
        params = {k: v for k, v in (("coverage", config.coverage), ("false_alarm", config.false_alarm))
                  if v is not None}
        index = stage_requests(images, requests_dir, params)
        if dry_run:
            plan = {"deploy_transform_job": request, "images": len(images), "request_files": len(index["parts"]),
                    "not_sent": len(index["skipped"])}
            print(redact_uri(json.dumps(plan, indent=2)))
            return plan
        if not index["parts"]:
            raise BinCounterError(f"no readable image in {source}: nothing to send")
        refuse_staged(job_staging)
        upload_staged(requests_dir, job_staging, index)
    print(f"staged {len(images)} images in {len(index['parts'])} requests under {job_staging}/requests/")
    import mlflow.sagemaker

    try:
        mlflow.sagemaker.deploy_transform_job(**request)
    except Exception as exc:  # MlflowException, botocore errors: one line, and how to pick the job up again
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise BinCounterError(redact_uri(f"transform job {job} failed: {reason} (when it completes later: "
                                         f"bin-counter transform --join {job_staging})")) from None
    print(f"transform job {job} completed; joining {job_staging}/output/")
    return write_results(join(job_staging), config.output, config.check_share)


def join_command(staging: str, output: str, check_share: float = DEFAULT_CHECK_SHARE) -> pd.DataFrame:
    if not staging.startswith("s3://"):
        raise BinCounterError(f"--join takes the job's s3://bucket/prefix/JOB, got {staging!r}")
    return write_results(join(staging.rstrip("/")), output, check_share)
