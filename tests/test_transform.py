"""`bin-counter transform` on a moto server: the photos staged as requests, the SageMaker batch transform job that
`mlflow.sagemaker.deploy_transform_job` creates, and the join of the job's output files into predict's CSV.

moto records the job and marks it Completed without running a container, so the output files are staged here as
the MLflow serving container writes them (`{"predictions": [...]}` per request file, named <request>.out)."""
import base64
import json

import boto3
import mlflow
import pandas as pd
import pytest

from bin_counter.cli import main
from bin_counter.commands import transform as transform_module
from conftest import make_abid_dir

ROLE = "arn:aws:iam::123456789012:role/sm"
IMAGE = f"123456789012.dkr.ecr.us-east-1.amazonaws.com/mlflow-pyfunc:{mlflow.__version__}"
CSV_COLUMNS = ["image_id", "predicted_count", "confidence", "count_set", "expected_quantity", "record_p",
               "record_check", "needs_check", "check_reason", "uncertainty", "error"]  # README: what `predict` writes


class Echo(mlflow.pyfunc.PythonModel):
    """A real MLflow model for the job to name; moto never runs it."""

    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture
def model_uri():
    with mlflow.start_run():
        return mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[]).model_uri


@pytest.fixture
def photos(aws, tmp_path):
    """10 real ABID photos with their metadata and one file that is no image, under s3://bins/today/."""
    folder = make_abid_dir(tmp_path / "abid", per_class=2)
    aws.create_bucket(Bucket="bins")
    expected = {}
    for path in sorted((folder / "bin-images").glob("*.jpg")):
        aws.put_object(Bucket="bins", Key=f"today/bin-images/{path.name}", Body=path.read_bytes())
        aws.put_object(Bucket="bins", Key=f"today/metadata/{path.stem}.json",
                       Body=(folder / "metadata" / f"{path.stem}.json").read_bytes())
        expected[path.stem] = json.loads((folder / "metadata" / f"{path.stem}.json").read_text())["EXPECTED_QUANTITY"]
    aws.put_object(Bucket="bins", Key="today/bin-images/notes.jpg", Body=b"not an image at all")
    return folder, expected


def keys(aws, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in aws.list_objects_v2(Bucket="bins", Prefix=prefix).get("Contents", []))


def test_transform_job_on_moto_then_join_staged_output(aws, photos, model_uri, tmp_path, monkeypatch, capsys):
    folder, expected = photos
    monkeypatch.setattr(transform_module, "ROWS_PER_REQUEST", 4)  # 11 files -> 3 request files
    out = tmp_path / "results.csv"
    command = ["transform", "--model-uri", model_uri, "--input", "s3://bins/today", "--staging", "s3://bins/transform",
               "--execution-role-arn", ROLE, "--image-url", IMAGE, "--region", "us-east-1", "--job-name", "count-today",
               "--output", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main(command)
    # moto completes the job without running the model: no output, so nothing is counted, and the CLI says so
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no image was counted") and "wrote no output for part-0000" in err[-1]

    job = boto3.client("sagemaker", region_name="us-east-1").describe_transform_job(TransformJobName="count-today")
    assert job["TransformJobStatus"] == "Completed"
    assert job["TransformInput"]["DataSource"]["S3DataSource"] == {
        "S3DataType": "S3Prefix", "S3Uri": "s3://bins/transform/count-today/requests/"}
    assert job["TransformInput"]["ContentType"] == "application/json" and job["TransformInput"]["SplitType"] == "None"
    assert job["TransformOutput"]["S3OutputPath"] == "s3://bins/transform/count-today/output"
    assert job["TransformOutput"]["Accept"] == "application/json"
    assert job["TransformResources"] == {"InstanceType": "ml.m5.large", "InstanceCount": 1}
    # archive=False: the SageMaker model and its archive are removed once the job is done
    assert boto3.client("sagemaker", region_name="us-east-1").list_models()["Models"] == []
    assert not [k for k in keys(aws, "") if k.endswith("model.tar.gz")]

    requests_ = keys(aws, "transform/count-today/requests/")
    index = json.loads(aws.get_object(Bucket="bins", Key="transform/count-today/index.json")["Body"].read())
    assert requests_ == [f"transform/count-today/requests/part-{i:05d}-{index['nonce']}.json" for i in range(3)]
    staged = {}
    for part, key in zip(index["parts"], requests_):
        body = json.loads(aws.get_object(Bucket="bins", Key=key)["Body"].read())
        # the recorded quantities travel with the photos: the served model checks them
        assert body["params"] == {"on_error": "skip"}
        assert body["dataframe_split"]["columns"] == ["image", "expected_quantity"]
        assert len(body["dataframe_split"]["data"]) == len(part["rows"]) <= 4
        for row, (b64, sent) in zip(part["rows"], body["dataframe_split"]["data"]):
            staged[row["image_id"]] = base64.b64decode(b64)
            assert row["expected_quantity"] == sent == expected.get(row["image_id"])
    assert set(staged) == set(expected) | {"notes"}
    assert all(staged[i] == (folder / "bin-images" / f"{i}.jpg").read_bytes() for i in expected)

    # the container's answers for parts 0 and 2 (which holds `notes`, last in key order); part 1 never arrives
    assert index["parts"][2]["rows"][-1]["image_id"] == "notes"
    wrong = index["parts"][0]["rows"][0]["image_id"]
    for part in (index["parts"][0], index["parts"][2]):
        predictions = []
        for row in part["rows"]:
            if row["image_id"] == "notes":
                predictions.append({"predicted_count": None, "confidence": None, "error": "cannot identify image file"})
            else:
                suspect = row["image_id"] == wrong
                count = row["expected_quantity"] + (2 if suspect else 0)
                predictions.append({"predicted_count": count, "confidence": 0.9, "prob_1": 0.1, "count_set": str(count),
                                    "record_p": 0.01 if suspect else 0.6, "uncertainty": 0.4,
                                    "record_check": "suspect" if suspect else "consistent", "error": ""})
        aws.put_object(Bucket="bins", Key=f"transform/count-today/output/{part['file']}.out",
                       Body=json.dumps({"predictions": predictions}).encode())
    main(["transform", "--join", "s3://bins/transform/count-today", "--output", str(out)])
    table = pd.read_csv(out, dtype={"image_id": str})
    assert list(table.columns) == CSV_COLUMNS and len(table) == 11
    table = table.set_index("image_id")
    answered = [r["image_id"] for p in index["parts"][::2] for r in p["rows"] if r["image_id"] != "notes"]
    missing = [r["image_id"] for r in index["parts"][1]["rows"]]
    assert table.loc[wrong, "record_check"] == "suspect" and table.loc[wrong, "record_p"] == 0.01
    assert table.loc[wrong, "check_reason"] == "record suspect: the photo contradicts the recorded quantity"
    good = [i for i in answered if i != wrong]
    assert (table.loc[good, "predicted_count"] == table.loc[good, "expected_quantity"]).all()
    assert not table.loc[good, "needs_check"].any()
    assert table.loc["notes", "check_reason"] == "unreadable image"
    assert table.loc["notes", "error"] == "cannot identify image file"
    assert (table.loc[missing, "check_reason"] == "not counted: the request failed").all()
    assert table.loc[missing, "error"].str.contains("wrote no output for part-00001").all()
    check = pd.read_csv(tmp_path / "results_manual_check.csv", dtype={"image_id": str})
    assert set(check["image_id"]) == {wrong, "notes", *missing}


def test_dry_run_stages_locally_and_sends_nothing(aws, photos, model_uri, tmp_path, capsys):
    main(["transform", "--model-uri", model_uri, "--input", "s3://bins/today", "--staging", "s3://bins/transform",
          "--job-name", "plan", "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    request = plan["deploy_transform_job"]
    assert request["s3_input_uri"] == "s3://bins/transform/plan/requests/" and request["split_type"] == "None"
    assert plan["images"] == 11 and plan["request_files"] == 1
    assert keys(aws, "transform/") == []
    assert boto3.client("sagemaker", region_name="us-east-1").list_transform_jobs()["TransformJobSummaries"] == []


@pytest.mark.parametrize("args, message", [
    (["--model-uri", "m", "--input", "s3://bins/today", "--staging", "/tmp/x", "--execution-role-arn", ROLE],
     "--staging must be s3://"),
    (["--model-uri", "m", "--input", "s3://bins/today", "--staging", "s3://bins/t", "--execution-role-arn", ROLE,
      "--job-name", "bad_name!"], "bad --job-name"),
    (["--model-uri", "m", "--input", "s3://bins/today", "--staging", "s3://bins/t"],
     "--execution-role-arn is required"),
    (["--input", "s3://bins/today"], "transform needs --model-uri, --staging"),
    (["--join", "s3://bins/nothing-here"], "no transform staged at s3://bins/nothing-here"),
    (["--join", "results/"], "--join takes the job's s3://"),
])
def test_transform_errors_are_one_line(aws, args, message, capsys):
    aws.create_bucket(Bucket="bins")
    with pytest.raises(SystemExit) as exit_:
        main(["transform", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err


def test_a_reused_job_name_is_refused_before_its_staging_is_overwritten(aws, photos, model_uri, tmp_path, capsys):
    command = ["transform", "--model-uri", model_uri, "--input", "s3://bins/today", "--staging", "s3://bins/t",
               "--execution-role-arn", ROLE, "--image-url", IMAGE, "--region", "us-east-1", "--job-name", "again",
               "--output", str(tmp_path / "out.csv")]
    with pytest.raises(SystemExit):  # moto writes no output: nothing counted
        main(command)
    staged = {k: aws.get_object(Bucket="bins", Key=k)["Body"].read() for k in keys(aws, "t/again/")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(command)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "s3://bins/t/again already holds a staged transform job" in err[-1]
    assert {k: aws.get_object(Bucket="bins", Key=k)["Body"].read() for k in keys(aws, "t/again/")} == staged
    assert transform_module.default_job_name() != transform_module.default_job_name()  # one second apart: two
