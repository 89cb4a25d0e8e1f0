"""Bounds read from the process's environment each time they are used, so a running server can be retuned.

  BIN_COUNTER_MAX_IMAGE_BYTES    bytes of one image after base64 decoding (default 6 MB, a SageMaker payload);
                                 every caller, in-process too: they cost nothing and keep a bomb out
  BIN_COUNTER_MAX_REQUEST_BYTES  bytes of one HTTP request a client sends or `bin-counter serve` accepts (6 MB)
  BIN_COUNTER_MAX_REQUEST_ROWS   rows of one HTTP request a client sends or `bin-counter serve` accepts (64)
The model itself has no row bound: it cannot tell an HTTP request from a notebook or a Spark batch, and decodes
batch by batch, so memory does not grow with rows. Bounding a request is the server's job.
"""
from __future__ import annotations

import os

DEFAULT_MAX_IMAGE_BYTES = 6 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 6_000_000  # a SageMaker endpoint's payload limit (6 MB)
DEFAULT_MAX_REQUEST_ROWS = 64


def limit(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def max_image_bytes() -> int:
    return limit("BIN_COUNTER_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES)


def max_request_bytes() -> int:
    return limit("BIN_COUNTER_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)


def max_request_rows() -> int:
    # BIN_COUNTER_MAX_ROWS is 0.2's name, when the bound sat in the model
    return limit("BIN_COUNTER_MAX_REQUEST_ROWS", limit("BIN_COUNTER_MAX_ROWS", DEFAULT_MAX_REQUEST_ROWS))
