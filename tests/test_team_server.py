"""The team setup end to end: PostgreSQL + moto S3 + `mlflow server` started by the script `make server` runs, then
train -> promote -> evaluate -> serve -> predict through it, and two tune workers sharing an Optuna study on the same
PostgreSQL. Clients get no AWS credentials: every artifact must travel through the server's proxy."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import requests

from bin_counter.commands.tune import SearchSpace, TuneConfig, open_study
from bin_counter.config import TrainConfig
from conftest import REPO, free_port, wait_for
from tools.team_server import TeamServer, alive, postgres_bindir

pytestmark = pytest.mark.slow

SCRIPT = [sys.executable, str(REPO / "tools" / "team_server.py")]  # what `make server` / `make server-stop` run
MODEL = "bins"
CREDENTIALS: dict[str, str] = {}  # the server's admin, as a client gets it from .team-server/env


@pytest.fixture(scope="module")
def team():
    # not under pytest's tmp_path: its folders are 0700 and PostgreSQL runs as the postgres user, which must enter
    # the data folder (the script refuses such a folder in one line)
    root = Path(tempfile.mkdtemp(prefix="bin-counter-team-"))
    root.chmod(0o711)
    folder = root / "server"
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///ignored.db"}  # as under `make`, which exports the default
    started = subprocess.run([*SCRIPT, "start", "--dir", str(folder)], capture_output=True, text=True, env=env,
                             timeout=900)
    server = TeamServer(folder)
    if started.returncode != 0:
        subprocess.run([*SCRIPT, "stop", "--dir", str(folder)], capture_output=True, timeout=120)
        # PostgreSQL missing and not installable lands here too: a failure with the reason, never a skip
        pytest.fail(f"the team server did not start: {started.stderr.strip()[-2000:]}")
    last = started.stdout.strip().splitlines()[-1]
    assert last.startswith("export MLFLOW_TRACKING_URI=http://127.0.0.1:"), started.stdout
    uri = last.split("=", 1)[1]
    pids = {name: pid for name, pid in server.running().items()}
    CREDENTIALS.update({k: v for k, v in server.client_env().items() if k.startswith("MLFLOW_TRACKING_USER")
                        or k == "MLFLOW_TRACKING_PASSWORD"})
    try:
        yield server, uri
    finally:
        stopped = subprocess.run([*SCRIPT, "stop", "--dir", str(folder)], capture_output=True, text=True, timeout=180)
    assert stopped.stdout.strip() == "stopped mlflow, moto, postgres", stopped
    assert not [name for name, pid in pids.items() if alive(pid)], "a process outlived make server-stop"
    shutil.rmtree(root, ignore_errors=True)


def client_env(uri: str, **extra) -> dict[str, str]:
    """A client's environment: the tracking URI, and no way to reach S3 itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_"))}
    env.update(MLFLOW_TRACKING_URI=uri, AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               TQDM_DISABLE="1", MLFLOW_DISABLE_TELEMETRY="true", **CREDENTIALS, **extra)
    return env


def cli(uri: str, *args: str, cwd: Path, timeout: float = 600, **extra) -> str:
    result = subprocess.run([sys.executable, "-m", "bin_counter", *args], capture_output=True, text=True, cwd=cwd,
                            env=client_env(uri, **extra), timeout=timeout)
    assert result.returncode == 0, f"bin-counter {args[0]} failed: {result.stderr[-3000:]}"
    return result.stdout


def train_options(tiny_data: Path, cache: Path) -> list[str]:
    return ["--data", str(tiny_data), "--head", "sgd", "--image-size", "224", "--feature-views", "1",
            "--num-workers", "0", "--batch-size", "8", "--cache-dir", str(cache)]


def test_train_promote_serve_predict_through_the_server(team, tiny_data, tmp_path_factory):
    server, uri = team
    work = tmp_path_factory.mktemp("client")
    cache = tmp_path_factory.getbasetemp() / "team-cache"
    out = cli(uri, "train", *train_options(tiny_data, cache), "--epochs", "1", "--register-as", MODEL, cwd=work)
    run_id = out.strip().splitlines()[-1].removeprefix("run_id: ")
    assert not (work / "mlruns.db").exists() and not (work / "mlruns").exists(), "the client logged locally"

    # the run is a row of the server's PostgreSQL, not of some local store
    import psycopg

    with psycopg.connect(server.pg_url("mlflow"), passfile=str(server.pgpass)) as db:
        row = db.execute("SELECT status, artifact_uri FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
    assert row is not None and row[0] == "FINISHED"
    assert row[1].startswith("mlflow-artifacts:/"), "artifacts must go through the server's proxy"

    # its artifacts, the model included, are objects in the S3 bucket
    keys = server.artifact_keys()
    assert any(run_id in k for k in keys), keys[:20]
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("test_predictions.csv") for k in keys)
    assert all(k.startswith("artifacts/") for k in keys)

    promoted = cli(uri, "promote", "--name", MODEL, "--data", str(tiny_data), cwd=work)
    assert "champion" in promoted
    # the alias resolves through the server's REST API to the run just trained
    answer = requests.get(f"{uri}/api/2.0/mlflow/registered-models/alias", params={"name": MODEL, "alias": "champion"},
                          timeout=30, auth=(CREDENTIALS["MLFLOW_TRACKING_USERNAME"],
                                            CREDENTIALS["MLFLOW_TRACKING_PASSWORD"]))
    assert answer.status_code == 200, answer.text
    version = answer.json()["model_version"]
    assert version["version"] == "1" and version["run_id"] == run_id

    metrics = work / "metrics.json"
    cli(uri, "evaluate", "--model-uri", f"models:/{MODEL}@champion", "--data", str(tiny_data), "--output", str(metrics),
        cwd=work)
    assert 0 <= json.loads(metrics.read_text())["accuracy"] <= 1

    port = free_port()
    bin_dir = Path(sys.executable).parent
    serve = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=client_env(uri, PATH=f"{bin_dir}:{os.environ['PATH']}"), cwd=work, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}", serve)
        results = work / "results.csv"
        cli(uri, "predict", "--url", f"http://127.0.0.1:{port}", "--input", str(tiny_data), "--output", str(results),
            cwd=work)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    table = pd.read_csv(results)
    assert len(table) == 60 and table["error"].isna().all(), table["error"].dropna().head()
    assert table["predicted_count"].between(1, 5).all() and table["expected_quantity"].notna().all()
    assert (work / "results_manual_check.csv").exists()


def test_two_tune_workers_share_a_study_on_postgresql(team, tiny_data, tmp_path_factory, monkeypatch):
    server, uri = team
    work = tmp_path_factory.mktemp("tune")
    cache = tmp_path_factory.getbasetemp() / "team-cache"
    storage = server.pg_url("optuna")
    command = [sys.executable, "-m", "bin_counter", "tune", "--recipe", "study", *train_options(tiny_data, cache),
               "--n-trials", "4",
               "--storage", storage, "--study-name", "team", "--batch-size-range", "8,16", "--epochs-range", "1,2"]
    env = client_env(uri, PGPASSFILE=str(server.pgpass))
    workers = [subprocess.Popen(command, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]

    monkeypatch.setenv("PGPASSFILE", str(server.pgpass))
    study = optuna.load_study(study_name="team", storage=storage)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in study.trials if t.state in done]
    assert len(finished) == 4, [t.state for t in study.trials]
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 4, "a configuration ran twice"
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials if t not in finished)

    import mlflow

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = [run for run in client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()],
                                              max_results=1000) if "trial_state" in run.data.tags]
    assert len(runs) == 4, "every trial is one MLflow run on the server, none lost or doubled"
    parents = {run.data.tags.get("mlflow.parentRunId") for run in runs}
    assert len(parents) <= 2 and None not in parents


def test_an_unauthenticated_client_is_refused_by_the_team_server(team, monkeypatch):
    import mlflow

    server, uri = team
    search = f"{uri}/api/2.0/mlflow/experiments/search"
    assert requests.post(search, json={"max_results": 1}, timeout=30).status_code == 401  # before: 200, anyone
    assert requests.post(search, json={"max_results": 1}, timeout=30, auth=("admin", "guess")).status_code == 401
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(mlflow.exceptions.MlflowException):  # no registering (and no code/ to overwrite) for strangers
        mlflow.MlflowClient(tracking_uri=uri).create_registered_model(MODEL + "-stranger")
    assert (server.dir / "env").stat().st_mode & 0o777 == 0o600  # it holds the admin password
    assert server.admin_password_file.stat().st_mode & 0o777 == 0o600


def test_tune_storage_waits_out_a_postgres_restart(team, monkeypatch):
    """A storage call made while the database is down waits for it instead of failing the worker."""
    server, _ = team
    monkeypatch.setenv("PGPASSFILE", str(server.pgpass))
    study = open_study(TuneConfig(base=TrainConfig(), space=SearchSpace(), storage=server.pg_url("optuna"),
                                  study_name="restart", search="study"))
    study.ask()  # the pool now holds a connection the restart will break
    bindir = postgres_bindir()
    server.stop_postgres(bindir)
    outcome = {}

    def ask():
        try:
            outcome["trial"] = study.ask()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(3)
    assert thread.is_alive() and not outcome, f"failed while the database was down: {outcome}"
    server.start_postgres(bindir, server.state()["pg_port"])
    thread.join(120)
    assert outcome.get("trial") is not None and outcome["trial"].number == 1, outcome


def test_stop_leaves_alone_a_recorded_pid_that_is_now_another_program(tmp_path):
    """A pid file outlives its process; if the pid is reused, stop must not kill the newcomer."""
    server = TeamServer(tmp_path / "server")
    server.pids.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        for name in ("mlflow", "moto", "postgres"):
            (server.pids / f"{name}.pid").write_text(f"{stranger.pid}\n")
        assert server.running() == {"mlflow": None, "moto": None, "postgres": None}
        assert server.stop() == []
        assert stranger.poll() is None, "stop killed a process it did not start"
        assert not list(server.pids.iterdir())
        status = subprocess.run([*SCRIPT, "status", "--dir", str(server.dir)], capture_output=True, text=True)
        assert status.returncode == 1 and "not running" in status.stdout
    finally:
        stranger.kill()
        stranger.wait()


def kept_with_real_s3(folder: Path) -> TeamServer:
    """A folder as a start with --artifacts-destination s3://team/artifacts leaves it (the cluster stopped)."""
    server = TeamServer(folder)
    server.pg_data.mkdir(parents=True)
    (server.pg_data / "PG_VERSION").write_text("15\n")
    server.save_state({"pg_port": free_port(), "workers": 2, "mlflow_port": free_port(),
                       "artifacts_destination": "s3://team/artifacts", "s3_endpoint": None})
    return server


def test_a_plain_start_never_wipes_a_database_kept_with_real_s3(tmp_path):
    server = kept_with_real_s3(tmp_path / "server")
    for destination in (None, "s3://other/artifacts"):  # `make server`, or another bucket
        result = subprocess.run([*SCRIPT, "start", "--dir", str(server.dir),
                                 *(["--artifacts-destination", destination] if destination else [])],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "keeps the database of artifacts in s3://team/artifacts" in result.stderr
        assert "--fresh" in result.stderr and (server.pg_data / "PG_VERSION").exists()  # before: rmtree'd


def test_two_starts_of_one_folder_at_once_are_refused(tmp_path):
    import fcntl

    server = kept_with_real_s3(tmp_path / "server")
    with open(server.dir / "start.lock", "w") as held:  # a start in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        result = subprocess.run([*SCRIPT, "start", "--dir", str(server.dir), "--artifacts-destination",
                                 "s3://team/artifacts"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "another `start` of" in result.stderr
    assert (server.pg_data / "PG_VERSION").exists()


def test_stop_leaves_alone_a_reused_pid_whose_command_line_mentions_mlflow(tmp_path):
    server = TeamServer(tmp_path / "server")
    server.pids.mkdir(parents=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "mlflow moto postgres"])
    try:
        for name in ("mlflow", "moto", "postgres"):
            (server.pids / f"{name}.pid").write_text(f"{stranger.pid} 12345\n")  # another process's start time
        assert server.stop() == [] and stranger.poll() is None  # before: killed, the substring test matched
    finally:
        stranger.kill()
        stranger.wait()


def test_private_files_are_never_readable_by_others_and_the_env_file_survives_odd_folder_names(tmp_path):
    from tools.team_server import write_env, write_private

    old = os.umask(0)
    try:
        (tmp_path / "pgpass").write_text("left by someone\n")
        write_private(tmp_path / "pgpass", "127.0.0.1:*:*:postgres:secret\n")
    finally:
        os.umask(old)
    assert (tmp_path / "pgpass").stat().st_mode & 0o777 == 0o600
    odd = tmp_path / "team server $HOME; x"
    write_env(tmp_path / "env", {"PGPASSFILE": str(odd / "pgpass")})
    shown = subprocess.run(["bash", "-c", f"source {tmp_path / 'env'}; printf %s \"$PGPASSFILE\""],
                           capture_output=True, text=True)
    assert shown.stdout == str(odd / "pgpass")  # before: split at the space, $HOME expanded
