"""Cloud jobs on moto: they need a reachable tracking store, get no credentials, resume only their own run, and
refuse bad options before anything is sent."""
from __future__ import annotations

import json

import pytest

from bin_counter.cli import main
from conftest import PASSWORD, TRACKING_WITH_PASSWORD, LoopbackProxy

ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"


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


def test_launch_refuses_an_unknown_recipe_before_sending_anything(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["launch", "--s3-data", "s3://b/p", "--role", "r", "--output-path", "s3://b/o", "--dry-run", "--",
              "--recipe", "bogus"])
    assert ended.value.code == 2 and "unknown recipe 'bogus'" in capsys.readouterr().err
