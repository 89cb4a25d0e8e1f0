"""`bin-counter serve`: MLflow's own scoring app (what `mlflow models serve` and MLflow's SageMaker container run)
behind a bound on each request, where a bound belongs: at the server, not in the model.

  bytes over BIN_COUNTER_MAX_REQUEST_BYTES (6 MB, a SageMaker endpoint's cap)  -> 413, before the body is read whole
  rows over BIN_COUNTER_MAX_REQUEST_ROWS (64)                                  -> 400, before anything is decoded
Both are read per request. A SageMaker endpoint caps bytes itself; behind a proxy, its body limit does the same
(nginx: client_max_body_size 6m).
"""
from __future__ import annotations

import json
import os

from bin_counter.serving.limits import max_request_bytes, max_request_rows

MODEL_VARIABLE = "BIN_COUNTER_SERVE_MODEL"  # the model a worker loads when `--workers` starts several


def request_rows(body: bytes, content_type: str) -> int | None:
    """How many rows a scoring request holds (MLflow's JSON forms or CSV), or None when it cannot be told: the
    scoring server then answers the malformed request itself."""
    if content_type.startswith("text/csv"):
        return max(len(body.splitlines()) - 1, 0)  # after the header; base64 holds no newline
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("dataframe_split"), dict):
        rows = doc["dataframe_split"].get("data")
    else:
        rows = next((doc[k] for k in ("dataframe_records", "instances", "inputs") if k in doc), None)
    return len(rows) if isinstance(rows, list) else None


async def answer(send, status: int, error_code: str, message: str) -> None:
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestBound:
    """ASGI middleware: /invocations requests over the byte or row bound are answered here; the others reach
    the scoring app with their body replayed as read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].rstrip("/") != "/invocations":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        limit = max_request_bytes()
        too_big = (f"request over the limit of {limit:,} bytes (BIN_COUNTER_MAX_REQUEST_BYTES); "
                   "send fewer images per request")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        rows = request_rows(body, headers.get(b"content-type", b"").decode("latin-1"))
        if rows is not None and rows > max_request_rows():
            return await answer(send, 400, "INVALID_PARAMETER_VALUE",
                                f"{rows} rows in one request, over the limit of {max_request_rows()} "
                                "(BIN_COUNTER_MAX_REQUEST_ROWS); send smaller requests")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def bounded_app(model):
    """MLflow's scoring app for a loaded pyfunc, behind RequestBound."""
    from mlflow.pyfunc import scoring_server

    return RequestBound(scoring_server.init(model))


def app_from_environment():
    """The app of one worker when several serve (uvicorn's factory): the model named by BIN_COUNTER_SERVE_MODEL."""
    from bin_counter.serving.model import load_model

    return bounded_app(load_model(os.environ[MODEL_VARIABLE]))


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 8080, workers: int = 1) -> None:
    """Serve `model_uri` until interrupted; a model that does not load is one line, before the port opens."""
    import uvicorn

    from bin_counter.serving.model import load_model

    if workers == 1:
        uvicorn.run(bounded_app(load_model(model_uri)), host=host, port=port, log_level="info")
        return
    load_model(model_uri)  # fail here, once, rather than in every worker
    os.environ[MODEL_VARIABLE] = model_uri
    uvicorn.run("bin_counter.serving.server:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level="info")
