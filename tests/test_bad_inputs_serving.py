"""The served model over HTTP (`bin-counter serve`'s app: MLflow's own scoring app behind the request bound, on
loopback): the model reads no paths and bounds each image's bytes and its memory, in any number of rows; the
server bounds each request's rows and bytes."""
from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from conftest import SAMPLE_IMAGES, b64_file, free_port


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The real pyfunc (models-from-code, as train logs it) around an untrained ResNet18 at 32 px: fast on a CPU."""
    from bin_counter.core.models import create_model
    from bin_counter.serving.model import signature
    from bin_counter.serving.packaging import PACKAGE_DIR

    root = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    torch.save(create_model("resnet18", 5, pretrained=False).state_dict(), root / "weights.pt")
    (root / "config.json").write_text(json.dumps({"backbone": "resnet18", "classes": [1, 2, 3, 4, 5],
                                                  "image_size": 32, "tta": False}))
    mlflow.pyfunc.save_model(str(root / "model"), python_model=str(PACKAGE_DIR / "serving" / "served.py"),
                             artifacts={"weights": str(root / "weights.pt"), "config": str(root / "config.json")},
                             signature=signature([1, 2, 3, 4, 5]), pip_requirements=["mlflow"])
    return root / "model"


@pytest.fixture(scope="module")
def served(tiny_model):
    """`bin-counter serve`'s app (MLflow's own scoring app, what `mlflow models serve` and the SageMaker
    container run, behind the request bound) on 127.0.0.1."""
    import uvicorn

    from bin_counter.serving.server import bounded_app

    app = bounded_app(mlflow.pyfunc.load_model(str(tiny_model)))
    os.environ.pop("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", None)  # init() marks the whole test process as serving
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


def tiny_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def invoke(url: str, rows: list[dict], timeout: float = 30, **params) -> requests.Response:
    body = {"dataframe_records": rows, **({"params": params} if params else {})}
    return requests.post(url + "/invocations", json=body, timeout=timeout)


def test_path_column_over_http_cannot_probe_server_files(served, tmp_path):
    secret = tmp_path / "server-only.jpg"
    secret.write_bytes(SAMPLE_IMAGES[0].read_bytes())
    for path in (str(secret), "/etc/passwd", str(tmp_path / "absent.jpg")):
        for params in ({}, {"on_error": "skip"}):
            response = invoke(served, [{"path": path}], **params)
            assert response.status_code == 400, (path, response.text[:300])
            assert "paths are not accepted; send base64 in `image`" in response.json()["message"]
    assert invoke(served, [{"image": b64_file(SAMPLE_IMAGES[0])}]).status_code == 200


def test_fifo_path_over_http_does_not_block_a_worker(served, tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    try:
        response = invoke(served, [{"path": str(fifo)}], timeout=10)
        assert response.status_code == 400 and "paths are not accepted" in response.json()["message"]
    finally:
        try:  # frees a worker stuck opening the FIFO (the old code): a writer lets the open() return
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_more_rows_than_the_server_bound_is_a_400_before_any_decoding(served, monkeypatch):
    rows = [{"image": tiny_png()}] * 65  # the default bound is 64
    response = invoke(served, rows)
    assert response.status_code == 400 and "BIN_COUNTER_MAX_REQUEST_ROWS" in response.json()["message"]
    monkeypatch.setenv("BIN_COUNTER_MAX_REQUEST_ROWS", "4")  # read per request, in the serving process
    assert invoke(served, rows[:5]).status_code == 400
    assert invoke(served, rows[:4]).status_code == 200
    split = {"dataframe_split": {"columns": ["image"], "data": [[tiny_png()]] * 5}}
    assert requests.post(served + "/invocations", json=split, timeout=30).status_code == 400
    csv = "image\n" + "\n".join([tiny_png()] * 5) + "\n"
    response = requests.post(served + "/invocations", data=csv, headers={"Content-Type": "text/csv"}, timeout=30)
    assert response.status_code == 400 and "5 rows" in response.json()["message"]


def test_request_over_the_server_byte_bound_is_a_413_before_it_is_read_whole(served, monkeypatch):
    monkeypatch.setenv("BIN_COUNTER_MAX_REQUEST_BYTES", "8000")
    rows = [{"image": b64_file(SAMPLE_IMAGES[0])}]
    assert len(json.dumps({"dataframe_records": rows})) > 8000
    response = invoke(served, rows)
    assert response.status_code == 413 and "BIN_COUNTER_MAX_REQUEST_BYTES" in response.json()["message"]
    # chunked, so no Content-Length announces it: the bound is counted as the body arrives
    body = json.dumps({"dataframe_records": rows}).encode()
    chunked = requests.post(served + "/invocations", data=iter([body[:5000], body[5000:]]),
                            headers={"Content-Type": "application/json"}, timeout=30)
    assert chunked.status_code == 413
    assert invoke(served, [{"image": tiny_png()}]).status_code == 200
    assert requests.get(served + "/ping", timeout=10).status_code == 200


def test_the_model_itself_takes_batches_far_above_the_http_bound(tiny_model):
    """0.2 put the HTTP bound in the model: a notebook's or Spark's batch of 256 rows was refused in-process."""
    model = mlflow.pyfunc.load_model(str(tiny_model))
    frame = pd.DataFrame({"image": [b64_file(SAMPLE_IMAGES[i % 5]) for i in range(256)]})
    answers = model.predict(frame)
    assert len(answers) == 256 and (answers["error"] == "").all()
    assert answers["predicted_count"].iloc[:5].tolist() == answers["predicted_count"].iloc[5:10].tolist()


def test_image_over_the_byte_limit_is_a_400(served, monkeypatch):
    monkeypatch.setenv("BIN_COUNTER_MAX_IMAGE_BYTES", "4000")
    big = SAMPLE_IMAGES[0]
    assert big.stat().st_size > 4000
    response = invoke(served, [{"image": b64_file(big)}])
    assert response.status_code == 400 and "BIN_COUNTER_MAX_IMAGE_BYTES" in response.json()["message"]
    skipped = invoke(served, [{"image": b64_file(big)}, {"image": tiny_png()}], on_error="skip").json()
    assert "over the limit" in skipped["predictions"][0]["error"] and skipped["predictions"][1]["error"] == ""


def test_rows_are_decoded_batch_by_batch_not_all_before_the_first_forward(tiny_model):
    """Decoding every row up front is what made ~95k tiny PNG rows need ~57 GB. Here row 35 is not an image:
    the batches before it must already have gone through the network when row 35 is decoded."""
    model = mlflow.pyfunc.load_model(str(tiny_model))
    forwards, served = [], model.unwrap_python_model()
    engine = served.engine

    def counted(batch):
        forwards.append(len(batch))
        return engine(batch)

    served.engine = counted
    rows = [b64_file(SAMPLE_IMAGES[i % 5]) for i in range(40)]
    rows[35] = base64.b64encode(b"not an image at all").decode()
    with pytest.raises(mlflow.exceptions.MlflowException, match="row 35"):
        model.predict(pd.DataFrame({"image": rows}))
    assert forwards == [served.batch_size] * (35 // served.batch_size), "rows were decoded before a batch was counted"
    ok = model.predict(pd.DataFrame({"image": rows}), params={"on_error": "skip"})
    assert list(ok["error"] != "") == [i == 35 for i in range(40)]


@pytest.mark.slow
def test_bin_counter_serve_answers_and_bounds_requests_over_real_http(tiny_model, tmp_path):
    import subprocess
    import sys

    from conftest import wait_for

    port = free_port()
    env = {**os.environ, "BIN_COUNTER_MAX_REQUEST_ROWS": "3"}
    server = subprocess.Popen([sys.executable, "-m", "bin_counter", "serve", "--model-uri", str(tiny_model),
                               "--port", str(port), "--workers", "2"], stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, server, seconds=120)
        answered = invoke(url, [{"image": b64_file(SAMPLE_IMAGES[0])}, {"image": tiny_png()}])
        assert answered.status_code == 200 and len(answered.json()["predictions"]) == 2
        refused = invoke(url, [{"image": tiny_png()}] * 4)
        assert refused.status_code == 400 and "over the limit of 3" in refused.json()["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    missing = subprocess.run([sys.executable, "-m", "bin_counter", "serve", "--model-uri", str(tmp_path / "absent")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "cannot load model" in missing.stderr


def test_a_big_frame_is_not_copied_into_python_strings_before_decoding(tiny_model):
    """pandas 3 keeps a string column in Arrow memory; 0.2 turned the whole column into Python strings before the
    first batch (a second copy of the frame: +711 MB at 10,000 photos). Row 4 is not an image, so predict stops
    in the first batch: what it allocated by then is the batch, not the frame."""
    import tracemalloc

    model = mlflow.pyfunc.load_model(str(tiny_model))
    texts = [tiny_png()] * 4 + ["bm90IGFuIGltYWdl"] + ["A" * 1000] * 50_000
    frame = pd.DataFrame({"image": pd.array(texts, dtype="str")})
    del texts
    assert frame["image"].dtype.storage == "pyarrow"
    tracemalloc.start()
    try:
        with pytest.raises(mlflow.exceptions.MlflowException, match="row 4"):
            model.predict(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"{peak:,} bytes of Python objects for a 50 MB frame"
