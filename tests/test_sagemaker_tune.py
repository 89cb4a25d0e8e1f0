"""`tune --backend sagemaker`: the request is complete, it reaches a moto server through the real sagemaker SDK v3,
and the code it ships runs our `train` as SageMaker would start it."""
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

from bin_counter.cli import main
from bin_counter.core.metrics import STUDY_REGEXES

ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"


@pytest.fixture
def sagemaker_env(aws, monkeypatch):
    # moto has no iam:SimulatePrincipalPolicy, which the SDK uses to vet the role: the SDK's own switch skips it
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    # the jobs need a tracking server they can reach (never contacted here: the experiment is given)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    aws.create_bucket(Bucket="mine")
    return aws


def run_tune(*extra):
    main(["tune", "--backend", "sagemaker", "--s3-data", "s3://mine/abid/v1", "--role", ROLE,
          "--output-path", "s3://mine/jobs", "--region", "us-east-1", *extra])


def test_dry_run_prints_the_complete_request(sagemaker_env, capsys):
    run_tune("--dry-run", "--n-trials", "5")
    request = json.loads(capsys.readouterr().out)
    config = request["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "Average loss"}
    assert config["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 5
    ranges = config["ParameterRanges"]
    assert {r["Name"]: (r["MinValue"], r["MaxValue"]) for r in ranges["IntegerParameterRanges"]} == {
        "batch-size": ("32", "128"), "epochs": ("5", "15")}
    (lr,) = ranges["ContinuousParameterRanges"]
    assert (lr["Name"], float(lr["MinValue"]), float(lr["MaxValue"]), lr["ScalingType"]) == (
        "lr", 1e-4, 5e-2, "Logarithmic")
    definition = request["TrainingJobDefinition"]
    regexes = {m["Name"]: m["Regex"] for m in definition["AlgorithmSpecification"]["MetricDefinitions"]}
    assert regexes == STUDY_REGEXES
    assert "pytorch-training" in definition["AlgorithmSpecification"]["TrainingImage"]
    assert definition["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://mine/abid/v1"
    assert definition["RoleArn"] == ROLE and definition["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert definition["StaticHyperParameters"]["backbone"] == "efficientnet-lite0"
    # the study's search trains the study's model: its recipe (SGD head, 224 px, ...) under every job's `train`
    static = definition["StaticHyperParameters"]
    assert (static["recipe"], static["head"], static["image-size"]) == ("study", "sgd", "224")
    assert not sagemaker_env.list_objects_v2(Bucket="mine").get("Contents"), "a dry run uploads nothing"


@pytest.mark.slow  # trains in a subprocess
def test_tuning_job_is_created_on_moto_and_its_code_runs_our_train(sagemaker_env, tiny_data, tmp_path, capsys,
                                                                  mlflow_store):
    import boto3

    run_tune("--n-trials", "4")
    assert "tuning job:" in capsys.readouterr().out
    client = boto3.client("sagemaker", region_name="us-east-1")
    (summary,) = client.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
    job = client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=summary["HyperParameterTuningJobName"])
    assert job["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 4
    assert job["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]["MetricName"] == "Average loss"
    static = job["TrainingJobDefinition"]["StaticHyperParameters"]
    assert static["sagemaker_program"] == "sagemaker_train.py"

    # the code the job ships: fetch it back and start it the way the container would
    bucket, key = re.match(r"s3://([^/]+)/(.+)", static["sagemaker_submit_directory"]).groups()
    body = sagemaker_env.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        archive.extractall(tmp_path / "code", filter="data")
    code = tmp_path / "code"
    assert (code / "bin_counter" / "commands" / "train.py").exists() and not (code / "bin_counter" / "sample").exists()
    assert "mlflow==" in (code / "requirements.txt").read_text()
    hyperparameters = {**{k: v for k, v in static.items()}, "batch-size": "8", "lr": "0.001", "epochs": "1",
                       "feature-views": "1"}
    args = [item for k, v in hyperparameters.items() for item in (f"--{k}", v)]
    env = {**os.environ, "SM_CHANNEL_TRAINING": str(tiny_data), "PYTHONPATH": str(code), "TQDM_DISABLE": "1",
           "MLFLOW_TRACKING_URI": mlflow_store}  # in place of the job's tracking server
    result = subprocess.run([sys.executable, "sagemaker_train.py", *args], cwd=code, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for regex in STUDY_REGEXES.values():  # what SageMaker's metric definitions will read
        assert re.search(regex, result.stdout)


def test_missing_inputs_are_one_line(sagemaker_env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--backend", "sagemaker", "--dry-run", "--region", "us-east-1"])
    assert exit_info.value.code == 2 and "--s3-data" in capsys.readouterr().err
