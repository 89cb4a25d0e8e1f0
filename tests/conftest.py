"""Shared fixtures: real sample images, a real sqlite MLflow store per test, a real moto S3 server on 127.0.0.1."""
from __future__ import annotations

import base64
import http.client
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("TQDM_DISABLE", "1")

from bin_counter.commands.prepare import build_data_dir  # noqa: E402
from bin_counter.config import PrepareConfig  # noqa: E402
from bin_counter.core.dataset import SAMPLE_DIR  # noqa: E402
from tools.team_server import free_port  # noqa: E402,F401  (the one port finder: tests import it from here)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An sqlite tracking store with MLflow's tables and the Default experiment, made once (the migrations take
    seconds); each test starts from a copy of it."""
    import mlflow

    root = tmp_path_factory.mktemp("empty-store")
    old = os.getcwd()
    os.chdir(root)  # the Default experiment's artifacts go to ./mlruns of the store's directory
    try:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}").get_experiment("0")
    finally:
        os.chdir(old)
    return root


def copy_store(template: Path, directory: Path) -> str:
    """A copy of the template store in `directory`, its Default experiment's artifacts under `directory`."""
    import sqlite3

    shutil.copy(template / "mlruns.db", directory / "mlruns.db")
    with sqlite3.connect(directory / "mlruns.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                   (str(template), str(directory)))
    db.close()
    return f"sqlite:///{directory / 'mlruns.db'}"


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch, empty_store):
    """Each test gets its own sqlite tracking store and working directory."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = copy_store(empty_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    # a CLI call in an earlier test (tracking.configure) chose an experiment of its own store
    mlflow.set_experiment(experiment_id="0")
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def sample_ids(per_class: int) -> dict[int, list[str]]:
    import json

    doc = json.loads((SAMPLE_DIR / "file_list.json").read_text())
    return {int(k): [Path(p).stem for p in v[:per_class]] for k, v in doc.items()}


def make_abid_dir(root: Path, per_class: int) -> Path:
    """A local directory in ABID's layout with real sample images."""
    (root / "bin-images").mkdir(parents=True)
    (root / "metadata").mkdir()
    for ids in sample_ids(per_class).values():
        for image_id in ids:
            shutil.copy(SAMPLE_DIR / "bin-images" / f"{image_id}.jpg", root / "bin-images")
            shutil.copy(SAMPLE_DIR / "metadata" / f"{image_id}.json", root / "metadata")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared DATA_DIR of 12 real images per count (60 in all), split 0.6/0.2/0.2."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    build_data_dir(PrepareConfig(source="sample", out=str(out), split=(0.6, 0.2, 0.2), limit_per_class=12, workers=2))
    return out


def start_moto_server(set_env: bool = False):
    """A real moto server on a free loopback port; with set_env, boto3 in this process talks to it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    if set_env:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")
    return server, endpoint


@pytest.fixture(scope="session")
def moto_endpoint():
    server, endpoint = start_moto_server()
    yield endpoint
    server.stop()


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    """Real boto3 clients pointed at the moto server through AWS_ENDPOINT_URL."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    requests_reset(moto_endpoint)
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


def requests_reset(endpoint: str) -> None:
    """Empty the moto server between tests."""
    host, port = endpoint.replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("POST", "/moto-api/reset")
    conn.getresponse().read()
    conn.close()


class LoopbackProxy:
    """A loopback HTTP proxy in front of the moto server; every test proxy is this one with a hook.

    `on_request(handler, body)` (or an override of the method of that name) sees each request before it is
    forwarded: `handler` is the BaseHTTPRequestHandler (its `command`, `path`, `headers`), `body` the request's
    bytes. It may record or sleep and return None to forward the request, or return `(status, body)` to answer
    it instead with an `application/xml` body, as S3 answers its errors (HEAD gets the status and no body).

    It speaks HTTP/1.1, so it answers S3 uploads' `Expect: 100-continue` itself instead of stalling them, and does
    not pass `Expect` on. A HEAD answer keeps the object's Content-Length and sends no body; every other answer
    carries the Content-Length of the body it sends.
    """

    def __init__(self, upstream: str, on_request=None):
        self.upstream = upstream.replace("http://", "")
        if on_request is not None:
            self.on_request = on_request
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, error: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(error)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(error)

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                answer = proxy.on_request(self, body)
                if answer is not None:
                    self._answer(*answer)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                host, port = proxy.upstream.split(":")
                conn = http.client.HTTPConnection(host, int(port))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                head = self.command == "HEAD"  # keeps the object's Content-Length and sends no body
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding",
                                           "connection") and (head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on_request(self, handler: BaseHTTPRequestHandler, body: bytes):
        """Forward every request unchanged."""
        return None

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SlowProxy(LoopbackProxy):
    """A LoopbackProxy that delays each object GET and logs its path.

    It lets a test kill a download part-way at a known point and count what was fetched.
    """

    def __init__(self, upstream: str, delay: float):
        self.delay = delay
        self.gets: list[str] = []
        super().__init__(upstream)

    def on_request(self, handler, body):
        if handler.command == "GET" and "list-type" not in handler.path and handler.path.count("/") > 1:
            self.gets.append(handler.path.split("?")[0])
            time.sleep(self.delay)


def wait_for(url: str, process, seconds: float = 240) -> None:
    """Until a model server started as `process` answers /ping; its stderr if it exits first."""
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"model server exited: {process.stderr.read()[-3000:]}")
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"model server did not answer {url}/ping in {seconds} s")



# ---- shared by the bad-input tests (test_bad_inputs_*.py, test_checkpoint.py, test_feature_store.py, ...) ----

SAMPLE_IMAGES = sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))


def jpeg(index: int = 0) -> bytes:
    return SAMPLE_IMAGES[index].read_bytes()


def files_outside(root, *inside) -> list:
    """Files below root that are in none of the folders `inside` (MLflow's store aside)."""
    return [p for p in root.rglob("*") if p.is_file() and p.name != "mlruns.db" and "mlruns" not in p.parts
            and not any(folder in p.parents for folder in inside)]


def small_prepared(tmp_path):
    return build_data_dir(PrepareConfig(out=str(tmp_path / "d"), limit_per_class=1, workers=2))


class WritesMarker:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def b64_file(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


PASSWORD = "hunter2-Secret"


TRACKING_WITH_PASSWORD = f"https://alice:{PASSWORD}@mlflow.example.com:5443/"
