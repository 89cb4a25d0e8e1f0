"""The served model over HTTP (a uvicorn server running MLflow's own scoring app on loopback): it reads no
paths, and bounds rows, bytes and memory."""
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
    from bin_counter.pyfunc import PACKAGE_DIR, signature

    root = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    torch.save(create_model("resnet18", 5, pretrained=False).state_dict(), root / "weights.pt")
    (root / "config.json").write_text(json.dumps({"backbone": "resnet18", "classes": [1, 2, 3, 4, 5],
                                                  "image_size": 32, "tta": False}))
    mlflow.pyfunc.save_model(str(root / "model"), python_model=str(PACKAGE_DIR / "serving_model.py"),
                             artifacts={"weights": str(root / "weights.pt"), "config": str(root / "config.json")},
                             signature=signature([1, 2, 3, 4, 5]), pip_requirements=["mlflow"])
    return root / "model"


@pytest.fixture(scope="module")
def served(tiny_model):
    """MLflow's own scoring app (what `mlflow models serve` and the SageMaker container run) on 127.0.0.1."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(mlflow.pyfunc.load_model(str(tiny_model)))
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


def test_more_rows_than_the_limit_is_a_400_before_any_decoding(served, monkeypatch):
    rows = [{"image": tiny_png()}] * 65  # the default limit is 64
    response = invoke(served, rows)
    assert response.status_code == 400 and "BIN_COUNTER_MAX_ROWS" in response.json()["message"]
    monkeypatch.setenv("BIN_COUNTER_MAX_ROWS", "4")  # read per request, in the serving process
    assert invoke(served, rows[:5]).status_code == 400
    assert invoke(served, rows[:4]).status_code == 200


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
    the first batch (rows 0-31) must already have gone through the network when row 35 is decoded."""
    from bin_counter.pyfunc import BATCH

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
    assert forwards == [BATCH], "rows were decoded before the first batch was counted"
    ok = model.predict(pd.DataFrame({"image": rows}), params={"on_error": "skip"})
    assert list(ok["error"] != "") == [i == 35 for i in range(40)]
