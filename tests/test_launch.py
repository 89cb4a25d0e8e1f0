"""`launch --backend sagemaker`: our train as a SageMaker training job (sagemaker SDK v3 ModelTrainer) on moto."""
import json

import boto3
import pytest

from bin_counter.cli import main

ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"


@pytest.fixture
def sagemaker_env(aws, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")  # moto has no iam:SimulatePrincipalPolicy
    aws.create_bucket(Bucket="mine")
    return aws


def launch(*extra, train_args=("--epochs", "10", "--backbone", "efficientnet-lite0")):
    main(["launch", "--s3-data", "s3://mine/abid/v1", "--role", ROLE, "--output-path", "s3://mine/jobs",
          "--region", "us-east-1", *extra, "--", *train_args])


def test_dry_run_request_is_complete(sagemaker_env, capsys):
    launch("--dry-run", "--spot", "--instance-count", "2")
    request = json.loads(capsys.readouterr().out)
    assert request["HyperParameters"]["epochs"] == "10" and request["HyperParameters"]["backbone"] == "efficientnet-lite0"
    assert request["ResourceConfig"]["InstanceCount"] == 2 and request["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] >= request["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert request["CheckpointConfig"] == {"S3Uri": "s3://mine/jobs/checkpoints", "LocalPath": "/opt/ml/checkpoints"}
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
    assert job["CheckpointConfig"]["S3Uri"] == "s3://mine/jobs/checkpoints"


@pytest.mark.parametrize("train_args, message", [
    (("--epochs",), "needs a value"),
    (("--data", "x"), "from --s3-data"),
    (("--bogus", "1"), "not valid train options"),
])
def test_bad_train_options_are_one_line(sagemaker_env, capsys, train_args, message):
    with pytest.raises(SystemExit):
        launch("--dry-run", train_args=train_args)
    assert message in capsys.readouterr().err
