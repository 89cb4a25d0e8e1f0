"""The callers' side of a model: read photo files and send them as base64 (in-process, to a REST server or a
SageMaker endpoint) in requests that fit the server's limits, and collect every answer column, a row per photo,
with the reason where a photo could not be read or a request failed."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pandas as pd

from bin_counter import BinCounterError, one_line
from bin_counter.core.abid import read_image
from bin_counter.core.uris import redact_uri
from bin_counter.serving.limits import max_image_bytes, max_request_bytes, max_request_rows
from bin_counter.serving.model import load_model

log = logging.getLogger(__name__)


def read_image_file(path: str | Path) -> bytes:
    """The bytes of a regular image file, or ValueError: a FIFO or device would block, a huge file is no photo."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"not a regular file: {path}")
        if info.st_size > max_image_bytes():
            raise ValueError(f"{path} is {info.st_size:,} bytes, over the limit of {max_image_bytes():,} "
                             "(BIN_COUNTER_MAX_IMAGE_BYTES)")
        with open(path, "rb") as handle:
            return handle.read(max_image_bytes() + 1)
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def encode_files(paths: list[str]) -> tuple[list[str], dict[int, str]]:
    """base64 of each file, as a client sends them, and the reason for each file that could not be read."""
    images, errors = [], {}
    for i, path in enumerate(paths):
        try:
            images.append(base64.b64encode(read_image_file(path)).decode())
        except ValueError as exc:
            images.append("")
            errors[i] = str(exc)
    return images, errors


def request_frame(images: list[str], records=None) -> pd.DataFrame:
    """The model's input: base64 images and, where known, each photo's recorded quantity."""
    frame = pd.DataFrame({"image": images})
    if records is not None:
        frame["expected_quantity"] = pd.to_numeric(pd.Series(list(records)), errors="coerce").astype(float)
    return frame


def predict_files(model, paths: list[str], records=None, params: dict | None = None) -> pd.DataFrame:
    """In-process batch use: the files are read here and sent as base64, as any client would, in one frame (the
    model decodes batch by batch); unreadable files come back with `error` set, never a crash. `records` are the
    photos' recorded quantities (NaN where unknown), `params` the request's coverage / false_alarm."""
    images, read_errors = encode_files(paths)
    frame = request_frame(images, records)
    params = {**(params or {}), "on_error": "skip"}
    if not images:
        return pd.DataFrame(columns=["predicted_count", "confidence", "error"])
    result = model.predict(frame, params=params)
    for i, reason in read_errors.items():  # the file's own reason, not "empty image field"
        result.loc[i, "error"] = reason
    return result


def encode_image(path: str | Path, max_side: int | None = None) -> str:
    """base64 of an image file; `max_side` shrinks it first (input examples stay small)."""
    if max_side is None:
        return base64.b64encode(Path(path).read_bytes()).decode()
    image = read_image(path)  # the one decoder: JPEG/PNG only, EXIF orientation applied
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode()


class Counter(Protocol):
    def __call__(self, paths: list[str], records=None, params: dict | None = None) -> pd.DataFrame: ...


ANSWER_COLUMNS = {"predicted_count": -1, "confidence": float("nan"), "count_set": "", "uncertainty": float("nan"),
                  "record_p": float("nan"), "record_check": "", "error": ""}  # with what a row has without them


def with_answer_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Every answer column, empty where the model gave none (a model logged before count sets answers without
    them), in ANSWER_COLUMNS' order after the others."""
    for name, empty in ANSWER_COLUMNS.items():
        frame[name] = frame[name].fillna(empty) if name in frame else empty
    return frame


def unanswered(rows: int, error: str = "") -> pd.DataFrame:
    return pd.DataFrame({name: [error if name == "error" else empty] * rows for name, empty in ANSWER_COLUMNS.items()})


REQUEST_FAILED = "request failed"


class RequestFailed(Exception):
    """A request to a served model got no usable answer; its images are reported, the others go on."""


def payload(images: list[str], records: list[float | None] | None = None, params: dict | None = None) -> bytes:
    """What a REST client sends to /invocations: base64 images (and their recorded quantities), bad rows reported
    instead of failing the batch."""
    if records is None or all(r is None or pd.isna(r) for r in records):  # as a model before 0.2 reads it
        split = {"columns": ["image"], "data": [[b] for b in images]}
    else:  # JSON has no NaN: an unknown record is null
        split = {"columns": ["image", "expected_quantity"],
                 "data": [[b, None if r is None or pd.isna(r) else float(r)] for b, r in zip(images, records)]}
    return json.dumps({"dataframe_split": split, "params": {**(params or {}), "on_error": "skip"}}).encode()


def request_groups(images: list[str], skip: set[int], max_bytes: int,
                   max_rows: int) -> tuple[list[list[int]], dict[int, str]]:
    """The rows to send, grouped so that each request's body fits `max_bytes` and `max_rows`; an image that fits
    no request is reported instead of sent."""
    empty = len(payload([]))
    # base64 needs no JSON escaping, so a row costs its length plus this much
    per_row = len(payload(["", ""])) - len(payload([""]))
    groups, current, size, too_big = [], [], empty, {}
    for i, image in enumerate(images):
        if i in skip:
            continue
        cost = len(image) + per_row
        if empty + cost > max_bytes:
            too_big[i] = (f"image is {len(image):,} bytes as base64, over the {max_bytes:,}-byte request limit "
                          "(BIN_COUNTER_MAX_REQUEST_BYTES)")
            continue
        if current and (size + cost > max_bytes or len(current) == max_rows):
            groups.append(current)
            current, size = [], empty
        current.append(i)
        size += cost
    return groups + ([current] if current else []), too_big


def from_response(body: bytes, rows: int) -> pd.DataFrame:
    try:
        frame = pd.DataFrame(json.loads(body)["predictions"])
    except (ValueError, KeyError, TypeError):
        raise RequestFailed(f"{REQUEST_FAILED}: the answer is not the model's JSON ({body[:100]!r})") from None
    if len(frame) != rows or not {"predicted_count", "confidence", "error"} <= set(frame.columns):
        raise RequestFailed(f"{REQUEST_FAILED}: the answer has {len(frame)} predictions for {rows} images")
    return with_answer_columns(frame)[list(ANSWER_COLUMNS)]


class RemoteModel:
    """A served model over the network. Files are read and base64-encoded here and sent in requests that fit the
    endpoint's limits; a request that fails marks its own images with the reason, and counting goes on."""

    def send(self, body: bytes) -> bytes:
        raise NotImplementedError

    def __call__(self, paths: list[str], records=None, params: dict | None = None) -> pd.DataFrame:
        images, errors = encode_files(paths)
        records = None if records is None else list(records)
        groups, too_big = request_groups(images, set(errors), max_request_bytes(), max_request_rows())
        errors.update(too_big)
        result = unanswered(len(paths))
        for group in groups:
            body = payload([images[i] for i in group], None if records is None else [records[i] for i in group],
                           params)
            try:
                answer = from_response(self.send(body), len(group))
            except RequestFailed as exc:
                log.warning("%s (%d images)", exc, len(group))
                errors.update({i: str(exc) for i in group})
                continue
            result.loc[group, list(ANSWER_COLUMNS)] = answer.to_numpy()
        for i, reason in errors.items():
            result.loc[i, "error"] = reason
        return result.astype({"predicted_count": "int64", "confidence": float, "uncertainty": float,
                              "record_p": float})


@dataclass
class LoadedModel:
    """A pyfunc model loaded in this process."""

    model: object

    def __call__(self, paths: list[str], records=None, params: dict | None = None) -> pd.DataFrame:
        # read and sent as base64 here: the model itself opens no files
        return with_answer_columns(predict_files(self.model, paths, records, params))


class LocalModel(LoadedModel):
    """The model of a URI (runs:/..., models:/NAME@alias), loaded in this process."""

    def __init__(self, model_uri: str):
        self.model_uri = model_uri
        super().__init__(load_model(model_uri))


@dataclass
class RestModel(RemoteModel):
    url: str
    timeout: float = 120.0

    def send(self, body: bytes) -> bytes:
        import requests

        where = redact_uri(self.url)
        try:
            response = requests.post(self.url.rstrip("/") + "/invocations", data=body,
                                     headers={"Content-Type": "application/json"}, timeout=self.timeout)
        except requests.RequestException as exc:
            reason = redact_uri(one_line(exc, 200))
            raise RequestFailed(f"{REQUEST_FAILED}: cannot reach the model at {where}: {reason}") from None
        if response.status_code != 200:
            reason = " ".join(response.text[:200].split())
            raise RequestFailed(f"{REQUEST_FAILED}: model at {where} answered {response.status_code}: {reason}")
        return response.content


@dataclass
class SageMakerEndpoint(RemoteModel):
    endpoint: str
    region: str | None = None

    def send(self, body: bytes) -> bytes:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        if not hasattr(self, "_client"):
            self._client = boto3.client("sagemaker-runtime", region_name=self.region)
        try:
            response = self._client.invoke_endpoint(EndpointName=self.endpoint, ContentType="application/json",
                                                    Body=body)
            return response["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            reason = one_line(exc)
            raise RequestFailed(f"{REQUEST_FAILED}: endpoint {self.endpoint}: {redact_uri(reason)}") from None


def count_images(counter: Counter, paths: list[str], batch_size: int, desc: str = "count", records=None,
                 params: dict | None = None) -> pd.DataFrame:
    """The batch-predict loop of `predict` and `evaluate`: a row per path, in order, with every column the counter
    answers; a batch the counter fails on is recorded with the reason and counting goes on."""
    from tqdm.auto import tqdm

    parts = []
    records = None if records is None else list(records)
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
        batch = paths[start:start + batch_size]
        try:
            part = counter(batch, None if records is None else records[start:start + batch_size], params)
            parts.append(part.reset_index(drop=True))
        except (BinCounterError, RequestFailed) as exc:
            log.warning("batch of %d images not counted: %s", len(batch), exc)
            parts.append(unanswered(len(batch), f"{REQUEST_FAILED}: {exc}"))
    if not parts:
        return unanswered(0)
    return pd.concat(parts, ignore_index=True)


def make_counter(model_uri: str | None, endpoint: str | None, url: str | None, region: str | None) -> Counter:
    chosen = [x for x in (model_uri, endpoint, url) if x]
    if len(chosen) != 1:
        raise BinCounterError("give exactly one of --model-uri, --endpoint, --url")
    if model_uri:
        return LocalModel(model_uri)
    if endpoint:
        return SageMakerEndpoint(endpoint, region)
    return RestModel(url)
