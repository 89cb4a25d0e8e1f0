"""What a user sees in the MLflow UI after the main job: `mlflow run . -e main` as `make run` runs it, then a real
`mlflow server` on that store, read through the REST API its pages are built from."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port, make_abid_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
HEADLINE = {"test/accuracy", "test/f1_macro", "test/mae"}


def api(url: str, path: str, body: dict | None = None) -> dict:
    response = (requests.post(f"{url}/api/2.0/mlflow/{path}", json=body, timeout=30) if body is not None else
                requests.get(f"{url}/api/2.0/mlflow/{path}", timeout=30))
    assert response.status_code == 200, (path, response.text[:300])
    return response.json()


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The main job on a small real ABID folder, in a fresh store, and `mlflow server` on that store."""
    work = tmp_path_factory.mktemp("ui")
    source = make_abid_dir(work / "abid", per_class=10)
    store = f"sqlite:///{work / 'mlruns.db'}"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    job = subprocess.run([os.path.join(bin_dir, "mlflow"), "run", str(ROOT), "-e", "main", "--env-manager", "local",
                          "--experiment-name", "bin-counter", "-P", f"source={source}", "-P", f"out={work / 'data'}",
                          "-P", "num_workers=0", "-P", f"cache_dir={work / 'cache'}"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stderr[-3000:]
    port = free_port()
    server = subprocess.Popen([os.path.join(bin_dir, "mlflow"), "server", "--backend-store-uri", store,
                               "--default-artifact-root", str(work / "artifacts"), "-h", "127.0.0.1", "-p", str(port),
                               "--workers", "1"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, server.stderr.read()[-2000:]
            time.sleep(1)
        yield url, job.stdout
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_the_runs_are_in_the_named_experiment_with_a_description(ui):
    url, printed = ui
    experiment = api(url, "experiments/get-by-name?experiment_name=bin-counter")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert "Amazon Bin Image Dataset" in tags["mlflow.note.content"]
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the classic view, not GenAI's
    runs = api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    default = api(url, "runs/search", {"experiment_ids": ["0"]}).get("runs", [])
    assert len(runs) >= 4 and default == []  # main, prepare, train, evaluate, promote: none in "Default"
    names = {r["info"]["run_name"] for r in runs}
    assert any(n.startswith("main efficientnet-lite0 counting") for n in names), names
    assert any(n.startswith("train efficientnet-lite0 counting") for n in names), names
    # the printed links open this experiment's runs
    assert f"#/experiments/{experiment['experiment_id']}/runs/" in printed


def test_train_evaluate_and_the_parent_share_the_headline_metric_keys(ui):
    url, _ = ui
    experiment = api(url, "experiments/get-by-name?experiment_name=bin-counter")["experiment"]
    runs = api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    by_command = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        by_command[tags.get("bin_counter.command")] = run
    for command in ("main", "train", "evaluate"):
        keys = {m["key"] for m in by_command[command]["data"].get("metrics", [])}
        assert HEADLINE <= keys, (command, sorted(keys))
    train_keys = {m["key"] for m in by_command["train"]["data"]["metrics"]}
    assert "test/majority_accuracy" in train_keys
    assert not {"test_accuracy", "test_f1_macro", "test_mae"} & train_keys  # one name for one quantity
    params = by_command["train"]["data"]["params"]
    assert all(p["value"] not in ("", "''") for p in params), params  # nothing empty, nothing quoted
    assert not {"cache_dir", "num_workers", "register_as", "run_name", "resume"} & {p["key"] for p in params}
    for command in ("main", "train"):  # the MLproject's parameters too
        values = {p["key"]: p["value"] for p in by_command[command]["data"].get("params", [])}
        assert values.get("recipe") == "counting", (command, values)


def test_the_registry_holds_a_champion_and_the_model_says_what_it_is(ui):
    url, _ = ui
    model = api(url, "registered-models/get?name=bin-counter-sample")["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
    assert "champion" in aliases
    version = api(url, f"model-versions/get?name=bin-counter-sample&version={aliases['champion']}")["model_version"]
    assert "recipe counting" in version["description"] and "Test metrics" in version["description"]
    experiment = api(url, "experiments/get-by-name?experiment_name=bin-counter")["experiment"]
    logged = requests.post(f"{url}/api/2.0/mlflow/logged-models/search",
                           json={"experiment_ids": [experiment["experiment_id"]]}, timeout=30).json()["models"]
    assert logged and all(m["info"]["name"] == "model" for m in logged)  # runs:/.../model stays valid
    tags = {t["key"]: t["value"] for t in logged[0]["info"].get("tags", [])}
    assert tags["bin_counter.backbone"] == "efficientnet-lite0" and logged[0]["info"]["model_type"]
    metric_keys = {m["key"] for m in logged[0]["data"].get("metrics", [])}
    assert HEADLINE <= metric_keys  # evaluations linked to the model: its page lists them
    page = requests.get(url, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()  # the UI itself is served
