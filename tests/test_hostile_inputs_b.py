"""Issue 14, part B: hostile input and faults. Each test is named for the attack or fault it stops.

Adversarial inputs are built on the fly (pickles, payloads, files); the network is loopback only: a moto server,
a uvicorn server running MLflow's own scoring app, and plain http.server stand-ins for a failing endpoint.
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from bin_counter import BinCounterError
from bin_counter.core import checkpoint
from conftest import LoopbackProxy, free_port

SAMPLE_IMAGES = sorted((Path(__file__).resolve().parents[1] / "bin_counter" / "sample" / "bin-images").glob("*.jpg"))

# ---- item 3: checkpoints never run code, and resume only their own run ------------------------------------


class WritesMarker:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def tiny_training_state(seed: int = 0):
    """A real net, optimiser, scheduler, scaler and seeded loaders, as fit() has them."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = torch.utils.data.TensorDataset(torch.arange(20.0))
    loaders = [torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                           generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
    net(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return net, optimizer, scheduler, scaler, loaders


def progress_like_fit(net) -> dict:
    """fit()'s bookkeeping, numpy scalars included (sklearn metrics are numpy floats)."""
    row = {"epoch": 1, "val_loss": np.float64(0.9), "val_f1": np.float32(0.4), "train_loss": 1.1}
    return {"best_loss": np.float64(0.9), "best_state": net.state_dict(), "best_epoch": 1, "best_val": row,
            "rows": [row]}


def draws(loaders) -> list:
    return [torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(2).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1),
            [[batch[0].tolist() for batch in loader] for loader in loaders]]


def test_pickled_os_system_in_checkpoint_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "abc123.pt"
    torch.save({"run_id": "abc123", "config": {}, "epoch": 1, "payload": WritesMarker(marker)}, path)
    with pytest.raises(BinCounterError) as error:
        checkpoint.load(path)
    assert not marker.exists(), "the checkpoint's pickled os.system ran"
    assert "\n" not in str(error.value) and "refused" in str(error.value)
    assert path.exists(), "the file is left for the user to inspect"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a dict"])
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, damage):
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    path = tmp_path / "run1.pt"
    checkpoint.save(path, 1, net, optimizer, scheduler, scaler, progress_like_fit(net), loaders, "run1", {})
    whole = path.read_bytes()
    path.write_bytes({"truncated": whole[: len(whole) // 2], "garbage": b"\x80\x04 not a checkpoint" * 50,
                      "empty": b""}.get(damage, b""))
    if damage == "not a dict":
        torch.save([1, 2, 3], path)
    with pytest.raises(BinCounterError) as error:
        checkpoint.load(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert path.exists()


def test_checkpoint_loads_weights_only_and_restores_every_random_generator(tmp_path):
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    random.seed(7)
    np.random.seed(7)
    np.random.randn()  # numpy now holds a cached gaussian: part of its state
    random.gauss(0, 1)
    path = tmp_path / "run1.pt"
    checkpoint.save(path, 2, net, optimizer, scheduler, scaler, progress_like_fit(net), loaders, "run1",
                    {"lr": 0.001})
    expected = draws(loaders)

    torch.load(path, weights_only=True)  # tensors and plain types only: nothing in it can run code
    state = checkpoint.load(path)
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    net2, optimizer2, scheduler2, scaler2, loaders2 = tiny_training_state(seed=5)
    progress = checkpoint.restore(state, net2, optimizer2, scheduler2, scaler2, loaders2)
    assert draws(loaders2) == expected
    assert progress["best_epoch"] == 1 and progress["best_loss"] == pytest.approx(0.9)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert state["epoch"] == 2 and state["config"] == {"lr": 0.001}


def test_checkpoint_renamed_to_another_run_is_refused(tmp_path):
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    checkpoint.save(tmp_path / "victim.pt", 1, net, optimizer, scheduler, scaler, progress_like_fit(net), loaders,
                    "intruder", {})
    with pytest.raises(BinCounterError, match="belongs to run intruder"):
        checkpoint.load(tmp_path / "victim.pt")


def test_resume_of_a_run_the_tracking_store_lacks_is_one_line(tiny_data, tmp_path):
    """A restarted job whose store lacks the checkpoint's run (a local store left behind) must not crash mid-way."""
    from bin_counter.commands.train import data_digest, split_frames, train
    from bin_counter.config import TrainConfig, as_params

    options = dict(data=str(tiny_data), head="sgd", image_size=224, epochs=2, batch_size=8, feature_cache=False,
                   num_workers=0, checkpoint_dir=str(tmp_path / "ckpt"))
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    config = {**as_params(TrainConfig(**options)), "data_digest": data_digest(split_frames(str(tiny_data)))}
    checkpoint.save(checkpoint.path_for(tmp_path / "ckpt", "0123456789abcdef"), 1, net, optimizer, scheduler,
                    scaler, progress_like_fit(net), loaders, "0123456789abcdef", config)
    with pytest.raises(BinCounterError, match="tracking store .* has no run 0123456789abcdef") as error:
        train(TrainConfig(**options, resume="latest"))
    assert "\n" not in str(error.value)


# ---- item 7: a corrupt feature-cache file is deleted and recomputed, with a warning -----------------------


def a_feature_store() -> dict:
    return {"sha": ["a" * 64, "b" * 64], "features": torch.randn(2, 3, 8).half(), "ok": torch.tensor([True, False])}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong shapes", "os.system pickle"])
def test_corrupt_feature_cache_is_deleted_with_a_warning_to_be_recomputed(tmp_path, caplog, damage):
    from bin_counter.core.feature_store import load_store

    path = tmp_path / "0123abcd.pt"
    torch.save(a_feature_store(), path)
    whole = path.read_bytes()
    marker = tmp_path / "pwned"
    if damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 300)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong shapes":
        torch.save({**a_feature_store(), "features": torch.randn(5, 3, 8)}, path)
    else:
        torch.save({**a_feature_store(), "sha": WritesMarker(marker)}, path)
    with caplog.at_level("WARNING"):
        assert load_store(path) is None
    assert not path.exists() and not marker.exists()
    assert "recomputed" in caplog.text and str(path) in caplog.text


def test_sound_feature_cache_is_returned_as_saved(tmp_path):
    from bin_counter.core.feature_store import load_store

    store = a_feature_store()
    torch.save(store, tmp_path / "k.pt")
    loaded = load_store(tmp_path / "k.pt")
    assert loaded["sha"] == store["sha"] and torch.equal(loaded["features"], store["features"])
    assert load_store(tmp_path / "missing.pt") is None


# ---- items 1 and 2: the served model reads no paths, and bounds rows, bytes and memory ---------------------


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


def b64_file(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


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


# ---- item 6: predict keeps going when requests fail, and sends requests that fit the endpoint ---------------


class FlakyModelServer:
    """A served model on 127.0.0.1 that answers like `mlflow models serve`, except that any request holding
    the `poison` image gets a 500; it records every request's body size, rows and status."""

    def __init__(self, poison: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[int, int, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rows = [row[0] for row in json.loads(body)["dataframe_split"]["data"]]
                if poison in rows:
                    answer, status = b'{"error_code": "INTERNAL_ERROR", "message": "worker crashed"}', 500
                else:
                    predictions = [{"predicted_count": 1 + len(r) % 5, "confidence": 0.9, "error": ""} for r in rows]
                    answer, status = json.dumps({"predictions": predictions}).encode(), 200
                server.requests.append((len(body), len(rows), status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()


def test_failed_requests_are_recorded_and_the_rest_counted_in_requests_that_fit(tmp_path, monkeypatch):
    from bin_counter.commands.predict import RestModel, predict
    from bin_counter.config import PredictConfig

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in SAMPLE_IMAGES[:9]:
        (folder / path.name).write_bytes(path.read_bytes())
    poison = folder / "00000-poison.jpg"
    poison.write_bytes(SAMPLE_IMAGES[9].read_bytes())
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    noise.save(folder / "huge.jpg", quality=100)  # ~200 kB: no request can carry it
    largest = max(len(b64_file(p)) for p in folder.glob("0*.jpg"))
    limit = 3 * (largest + 10) + 100  # room for three images per request
    monkeypatch.setenv("BIN_COUNTER_MAX_REQUEST_BYTES", str(limit))
    server = FlakyModelServer(poison=b64_file(poison))
    try:
        results = predict(PredictConfig(input=str(folder), output=str(tmp_path / "results.csv"), batch_size=16),
                          RestModel(server.url))
    finally:
        server.close()
    written = pd.read_csv(tmp_path / "results.csv", dtype={"image_id": str}).set_index("image_id")
    assert len(written) == 11 and len(results) == 11
    assert len(server.requests) >= 3 and all(size <= limit for size, _, _ in server.requests)
    assert "over the" in written.loc["huge", "error"] and "request limit" in written.loc["huge", "error"]
    failed = written[written["error"].fillna("").str.contains("answered 500")]
    (failed_rows,) = [rows for _, rows, status in server.requests if status == 500]
    assert "00000-poison" in failed.index and len(failed) == failed_rows  # the poison's request, no more
    counted = written[written["error"].isna()]
    assert len(counted) == 11 - 1 - len(failed) and counted["predicted_count"].between(1, 5).all()
    check = pd.read_csv(tmp_path / "results_manual_check.csv", dtype={"image_id": str})
    assert set(failed.index) | {"huge"} <= set(check["image_id"])
    assert (check.set_index("image_id").loc[list(failed.index), "check_reason"]
            == "not counted: the request failed").all()


def test_unreachable_model_still_writes_every_image_with_its_error(tmp_path, capsys):
    from bin_counter.commands.predict import RestModel, predict
    from bin_counter.config import PredictConfig

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in SAMPLE_IMAGES[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    nobody = f"http://user:hunter2@127.0.0.1:{free_port()}"  # a closed port
    with pytest.raises(BinCounterError, match="no image was counted") as error:
        predict(PredictConfig(input=str(folder), output=str(tmp_path / "results.csv")), RestModel(nobody))
    written = pd.read_csv(tmp_path / "results.csv")
    assert len(written) == 3 and written["error"].str.contains("cannot reach").all()
    assert "hunter2" not in str(error.value) + capsys.readouterr().out + written.to_csv()


# ---- items 4 and 5: cloud jobs need a reachable tracking store, get no credentials, resume only their own run ---

ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"
PASSWORD = "hunter2-Secret"
TRACKING_WITH_PASSWORD = f"https://alice:{PASSWORD}@mlflow.example.com:5443/"


@pytest.fixture
def sagemaker_env(aws, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")  # moto has no iam:SimulatePrincipalPolicy
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")  # configure() then needs no call to the (fake) server
    aws.create_bucket(Bucket="mine")
    return aws


def launch(*extra, data="s3://mine/abid/v1"):
    from bin_counter.cli import main

    main(["launch", "--s3-data", data, "--role", ROLE, "--output-path", "s3://mine/jobs", "--region", "us-east-1",
          *extra, "--", "--epochs", "10"])


def jobs(client) -> list[dict]:
    return [client.describe_training_job(TrainingJobName=summary["TrainingJobName"])
            for summary in client.list_training_jobs()["TrainingJobSummaries"]]


@pytest.mark.parametrize("command", ["launch", "tune"])
def test_cloud_job_with_a_local_tracking_store_is_refused(sagemaker_env, capsys, command):
    """The default sqlite store is on this machine: the job would log nowhere, and a restarted spot job would
    resume a run id its new container does not have."""
    import boto3

    from bin_counter.cli import main

    with pytest.raises(SystemExit) as exit_info:
        if command == "launch":
            launch("--spot")
        else:
            main(["tune", "--backend", "sagemaker", "--s3-data", "s3://mine/abid/v1", "--role", ROLE,
                  "--output-path", "s3://mine/jobs", "--region", "us-east-1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "MLFLOW_TRACKING_URI=sqlite" in err and len(err.strip().splitlines()) == 1
    client = boto3.client("sagemaker", region_name="us-east-1")
    assert client.list_training_jobs()["TrainingJobSummaries"] == []
    assert client.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"] == []


def test_dry_run_with_a_local_tracking_store_warns(sagemaker_env, capsys):
    launch("--dry-run", "--spot")
    out, err = capsys.readouterr()
    assert "warning: MLFLOW_TRACKING_URI=sqlite" in err and "a real launch is refused" in err
    assert json.loads(out)["RoleArn"] == ROLE


class RecordingProxy(LoopbackProxy):
    """Forwards every AWS call to the moto server and keeps its body: moto's DescribeTrainingJob leaves out the
    job's Environment, so the test reads what SageMaker would have received."""

    def __init__(self, upstream: str):
        self.calls: list[tuple[str, bytes]] = []
        super().__init__(upstream)

    def on_request(self, handler, body):
        self.calls.append((handler.headers.get("X-Amz-Target", handler.path), body))
        return None

    def sent(self, action: str) -> list[dict]:
        return [json.loads(body) for target, body in self.calls if target.endswith("." + action)]


def test_tracking_password_never_reaches_the_job_the_request_or_the_output(sagemaker_env, moto_endpoint, monkeypatch,
                                                                          capsys, caplog):
    from bin_counter.cli import main

    proxy = RecordingProxy(moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING_WITH_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "other-" + PASSWORD)
    try:
        launch("--dry-run", "--spot")
        request = capsys.readouterr().out
        launch("--spot")
        main(["tune", "--backend", "sagemaker", "--s3-data", "s3://mine/abid/v1", "--role", ROLE,
              "--output-path", "s3://mine/jobs", "--region", "us-east-1", "--n-trials", "2"])
    finally:
        proxy.server.shutdown()
    out, err = capsys.readouterr()
    stripped = {"MLFLOW_TRACKING_URI": "https://mlflow.example.com:5443/"}
    assert json.loads(request)["Environment"] == stripped
    (job,) = proxy.sent("CreateTrainingJob")
    (tuning,) = proxy.sent("CreateHyperParameterTuningJob")
    assert job["Environment"] == stripped and tuning["TrainingJobDefinition"]["Environment"] == stripped
    everything = request + out + err + caplog.text + b"".join(body for _, body in proxy.calls).decode("latin-1")
    assert PASSWORD not in everything and "without its credentials" in caplog.text


def test_relaunch_with_new_s3_data_never_resumes_the_old_jobs_checkpoints(sagemaker_env, monkeypatch):
    import boto3

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com/")
    launch("--spot", data="s3://mine/abid/v1")
    launch("--spot", data="s3://mine/abid/v2")
    launch("--spot", data="s3://mine/abid/v2")  # the same launch again is a new job: it starts afresh too
    prefixes = [job["CheckpointConfig"]["S3Uri"] for job in jobs(boto3.client("sagemaker", region_name="us-east-1"))]
    assert len(set(prefixes)) == 3 and all(p.startswith("s3://mine/jobs/checkpoints/") for p in prefixes)
    by_data = {p.split("/")[-2] for p in prefixes}
    assert len(by_data) == 2, "the prefix is keyed by the data (and options), then by the launch"


@pytest.mark.parametrize("storage", [f"postgresql://optuna:{PASSWORD}@127.0.0.1:1/optuna",
                                     f"postgresql://optuna:{PASSWORD}/x#y@127.0.0.1:1/optuna",
                                     f"postgresql://optuna@127.0.0.1:1/optuna?password={PASSWORD}"])
def test_tune_refuses_a_storage_url_carrying_a_password(capsys, tmp_path, storage):
    from bin_counter.cli import main
    from bin_counter.commands.tune import SearchSpace, TuneConfig, study_params
    from bin_counter.config import TrainConfig

    params = study_params(TuneConfig(base=TrainConfig(), space=SearchSpace(), storage=storage))
    assert PASSWORD not in params["storage"]  # masked even where it is never logged
    with pytest.raises(SystemExit) as exit_info:  # before anything is logged: MLflow logs a -P storage=... itself
        main(["tune", "--storage", storage, "--data", str(tmp_path), "--n-trials", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "carries a password" in err
    assert "PGPASSFILE" in err and "PGPASSWORD" in err and PASSWORD not in err
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_main_prints_where_to_look_without_the_tracking_password(monkeypatch):
    from bin_counter.commands.pipeline import where_to_look

    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING_WITH_PASSWORD)
    line = where_to_look("1", "0123abcd", "bin-counter-sample")
    assert PASSWORD not in line and "https://alice:***@mlflow.example.com:5443/" in line
