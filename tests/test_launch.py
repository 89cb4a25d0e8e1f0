"""`launch --backend sagemaker`: our train as a SageMaker training job (sagemaker SDK v3 ModelTrainer) on moto."""
import json
from pathlib import Path

import boto3
import pytest

import bin_counter
from bin_counter.cli import main

ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"


@pytest.fixture
def sagemaker_env(aws, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")  # moto has no iam:SimulatePrincipalPolicy
    # a job needs a tracking server it can reach (never contacted here: the experiment is given)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    aws.create_bucket(Bucket="mine")
    return aws


def launch(*extra, train_args=("--epochs", "10", "--backbone", "efficientnet-lite0")):
    main(["launch", "--s3-data", "s3://mine/abid/v1", "--role", ROLE, "--output-path", "s3://mine/jobs",
          "--region", "us-east-1", *extra, "--", *train_args])


def test_dry_run_request_is_complete(sagemaker_env, capsys):
    launch("--dry-run", "--spot", "--instance-count", "2")
    request = json.loads(capsys.readouterr().out)
    assert request["HyperParameters"] == {"epochs": "10", "backbone": "efficientnet-lite0"}
    assert request["ResourceConfig"]["InstanceCount"] == 2
    assert request["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] >= request["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert request["CheckpointConfig"]["S3Uri"].startswith("s3://mine/jobs/checkpoints/")  # one prefix per job
    assert request["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert request["Environment"] == {"MLFLOW_TRACKING_URI": "https://mlflow.example.com"}
    channels = {c["ChannelName"]: c for c in request["InputDataConfig"]}
    assert channels["training"]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://mine/abid/v1"
    assert "pytorch-training" in request["AlgorithmSpecification"]["TrainingImage"]
    assert request["RoleArn"] == ROLE and request["OutputDataConfig"]["S3OutputPath"] == "s3://mine/jobs"
    client = boto3.client("sagemaker", region_name="us-east-1")
    assert client.list_training_jobs()["TrainingJobSummaries"] == []  # nothing was sent


def test_training_job_is_created_on_moto(sagemaker_env, capsys):
    launch("--spot")
    assert "training job:" in capsys.readouterr().out
    client = boto3.client("sagemaker", region_name="us-east-1")
    (summary,) = client.list_training_jobs()["TrainingJobSummaries"]
    job = client.describe_training_job(TrainingJobName=summary["TrainingJobName"])
    assert job["HyperParameters"]["epochs"] == "10" and job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"]["S3Uri"].startswith("s3://mine/jobs/checkpoints/")


@pytest.mark.parametrize("train_args, message", [
    (("--epochs",), "--epochs: expected one argument"),
    (("--hflip",), "needs a value"),
    (("--data", "x"), "from --s3-data"),
    (("--bogus", "1"), "not valid train options"),
])
def test_bad_train_options_are_one_line(sagemaker_env, capsys, train_args, message):
    with pytest.raises(SystemExit) as exit_info:
        launch("--dry-run", train_args=train_args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def staged_drivers(request: dict) -> dict[str, str]:
    """The SDK's driver files this request's `sm_drivers` channel points at (staged in moto S3 by the dry run)."""
    (channel,) = [c for c in request["InputDataConfig"] if c["ChannelName"] == "sm_drivers"]
    bucket, prefix = channel["DataSource"]["S3DataSource"]["S3Uri"][len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", region_name="us-east-1")
    return {name: s3.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read().decode()
            for name in ("sm_train.sh", "distributed.json", "sourcecode.json")}


def test_more_than_one_instance_runs_our_entry_script_under_torchrun(sagemaker_env, capsys):
    launch("--dry-run", "--instance-count", "2")
    request = json.loads(capsys.readouterr().out)
    assert request["ResourceConfig"]["InstanceCount"] == 2
    drivers = staged_drivers(request)
    assert "distributed_drivers/torchrun_driver.py" in drivers["sm_train.sh"]
    assert json.loads(drivers["sourcecode.json"])["entry_script"] == "sagemaker_train.py"
    assert "process_count_per_node" in json.loads(drivers["distributed.json"])  # the Torchrun runner's settings

    launch("--dry-run")  # one instance: the entry script alone, no torchrun
    single = staged_drivers(json.loads(capsys.readouterr().out))
    assert "torchrun_driver" not in single["sm_train.sh"] and json.loads(single["distributed.json"]) == {}


def test_checkpoints_without_spot_sync_to_their_own_prefix(sagemaker_env, capsys):
    launch("--dry-run", "--checkpoints")
    request = json.loads(capsys.readouterr().out)
    assert request["CheckpointConfig"]["S3Uri"].startswith("s3://mine/jobs/checkpoints/")
    assert request["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"  # where the entry script resumes from
    assert not request.get("EnableManagedSpotTraining") and "MaxWaitTimeInSeconds" not in request["StoppingCondition"]
    launch("--dry-run")
    assert "CheckpointConfig" not in json.loads(capsys.readouterr().out)  # neither --spot nor --checkpoints


@pytest.mark.slow
def test_entry_script_resumes_a_reclaimed_spot_job(tiny_data, tmp_path):
    """SageMaker restarts a reclaimed spot job with its checkpoint folder restored: the entry script resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    from bin_counter.cloud.sagemaker_jobs import ENTRY_SCRIPT, stage_source

    code = stage_source(tmp_path / "code")
    checkpoints = tmp_path / "opt-ml-checkpoints"
    checkpoints.mkdir()
    env = {**os.environ, "SM_CHANNEL_TRAINING": str(tiny_data), "PYTHONPATH": str(code), "TQDM_DISABLE": "1",
           "BIN_COUNTER_CHECKPOINTS": str(checkpoints)}
    # hyperparameters arrive as `--name value` pairs; fine-tuning a stage makes epochs slow enough to interrupt
    args = [sys.executable, ENTRY_SCRIPT, "--head", "sgd", "--image-size", "224", "--epochs", "4", "--batch-size", "8",
            "--unfreeze-last", "1",
            "--num-workers", "0", "--sagemaker_program", ENTRY_SCRIPT]
    first = subprocess.Popen(args, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None and not list(checkpoints.glob("*.pt")):
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # the spot instance is reclaimed
    _, err = first.communicate(timeout=120)
    saved = list(checkpoints.glob("*.pt"))
    assert len(saved) == 1, err[-2000:]
    saved = saved[0]
    second = subprocess.run(args, cwd=code, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming after epoch" in second.stderr and f"run_id: {saved.stem}" in second.stdout
    assert len(mlflow.MlflowClient().get_metric_history(saved.stem, "val/loss")) == 4


def test_entry_script_is_a_real_file_that_drops_sagemakers_arguments_and_resumes(tmp_path):
    from bin_counter.cloud.sagemaker_jobs import ENTRY_SCRIPT, stage_source
    from bin_counter.sagemaker_entry import train_arguments

    staged = stage_source(tmp_path / "code")
    entry = Path(bin_counter.__file__).parent / "sagemaker_entry.py"
    assert (staged / ENTRY_SCRIPT).read_text() == entry.read_text()
    environ = {"SM_CHANNEL_TRAINING": "/data", "BIN_COUNTER_CHECKPOINTS": str(tmp_path / "ckpt")}
    argv = ["--epochs", "3", "--sagemaker_program", "x.py", "--head", "sgd"]
    assert train_arguments(argv, environ) == ["train", "--data", "/data", "--cache-dir", "/tmp/feature-cache",
                                              "--epochs", "3", "--head", "sgd"]
    (tmp_path / "ckpt").mkdir()
    assert train_arguments(argv, environ)[-2:] == ["--checkpoint-dir", str(tmp_path / "ckpt")]
    (tmp_path / "ckpt" / "last.pt").write_bytes(b"")
    assert train_arguments(argv, environ)[-3:] == ["--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"]


def test_two_launches_in_the_same_second_are_two_jobs(sagemaker_env, monkeypatch):
    """sagemaker v3 names a job base + time to the second; with a fixed base the second launch took the first's
    name (a ResourceInUse on AWS; moto kept one job)."""
    import datetime as real

    import sagemaker.train.utils as sdk_utils

    class FrozenClock(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime(2026, 11, 30, 12, 0, 0)

    monkeypatch.setattr(sdk_utils, "datetime", FrozenClock)
    launch()
    launch()
    names = [job["TrainingJobName"] for job in
             boto3.client("sagemaker", region_name="us-east-1").list_training_jobs()["TrainingJobSummaries"]]
    assert len(names) == 2 and len(set(names)) == 2 and all(n.endswith("-20261130120000") for n in names)


def test_tracking_credentials_travel_as_a_secret_name_and_the_job_reads_them(sagemaker_env, monkeypatch, capsys):
    from bin_counter import BinCounterError
    from bin_counter.sagemaker_entry import tracking_credentials

    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    secrets.create_secret(Name="mlflow-team", SecretString=json.dumps({"username": "ci", "password": "s3cr3t-pw"}))
    secrets.create_secret(Name="empty", SecretString=json.dumps({"user": "x"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ci:s3cr3t-pw@mlflow.example.com")
    launch("--dry-run", "--tracking-secret", "mlflow-team")
    out = capsys.readouterr().out
    environment = json.loads(out)["Environment"]
    assert environment["BIN_COUNTER_TRACKING_SECRET"] == "mlflow-team"
    assert environment["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com" and "s3cr3t-pw" not in out
    # in the job: its role reads the secret into the variables MLflow's client reads
    assert tracking_credentials({"BIN_COUNTER_TRACKING_SECRET": "mlflow-team"}) == {
        "MLFLOW_TRACKING_USERNAME": "ci", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-pw"}
    assert tracking_credentials({}) == {}
    with pytest.raises(BinCounterError, match="holds none of username/password/token"):
        tracking_credentials({"BIN_COUNTER_TRACKING_SECRET": "empty"})
    with pytest.raises(BinCounterError, match=r"^tracking secret missing: .*ResourceNotFound"):
        tracking_credentials({"BIN_COUNTER_TRACKING_SECRET": "missing"})


@pytest.mark.parametrize("uri", ["http://127.0.0.2:5000", "http://127.1:5000", "http://localhost.localdomain:5000",
                                 "http://[::ffff:127.0.0.1]:5000", "http://LOCALHOST.:5000", "http://0x7f.1:5000",
                                 "http://[::1]:5000", "http://0.0.0.0:5000", "http://mlflow.localhost/"])
def test_loopback_tracking_servers_by_any_spelling_are_local_stores(uri):
    from bin_counter.cloud.sagemaker_jobs import is_local_store

    assert is_local_store(uri)


@pytest.mark.parametrize("uri", ["https://mlflow.example.com", "http://10.0.0.5:5000", "http://[2001:db8::1]:5000",
                                 "http://128.0.0.1:5000", "arn:aws:sagemaker:us-east-1:1:mlflow-tracking-server/x"])
def test_remote_tracking_servers_are_not_local_stores(uri):
    from bin_counter.cloud.sagemaker_jobs import is_local_store

    assert not is_local_store(uri)
