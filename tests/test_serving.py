"""Registry, serving over real HTTP, batch prediction and SageMaker deployment (moto) of a real trained model."""
import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from PIL import Image

from bin_counter.commands.predict import LocalModel, predict
from bin_counter.commands.registry import promote
from bin_counter.commands.train import train
from bin_counter.config import PredictConfig, PromoteConfig, TrainConfig
from bin_counter.core.manifest import read_manifest
from conftest import free_port, make_abid_dir, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tiny_data, tmp_path_factory):
    """One sqlite store with model `bins` v1 (and v2) trained on real sample images."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    old = os.getcwd()
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        for seed in (0, 1):
            train(TrainConfig(data=str(tiny_data), head="sgd", image_size=224, epochs=2, batch_size=8, feature_views=1,
                              num_workers=0, seed=seed,
                              cache_dir=str(root / "cache"), register_as="bins"))
    finally:
        os.chdir(old)
    return uri


@pytest.fixture
def use_registry(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    mlflow.set_tracking_uri(registry)
    return registry


def b64(image: Image.Image, fmt="JPEG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_promote_moves_champion_only_on_real_gain(use_registry, tiny_data):
    def promote_bins(version: str, **options) -> dict:
        return promote(PromoteConfig(name="bins", data=str(tiny_data), version=version, **options))

    client = mlflow.MlflowClient()
    first = promote_bins("1")
    assert first["decision"] == "first champion"
    assert str(client.get_model_version_by_alias("bins", "champion").version) == "1"
    # v2 must beat v1 by a full F1 point of 1.0: impossible, so it becomes the challenger
    held = promote_bins("2", min_gain=1.0)
    assert held["alias"] == "challenger"
    assert str(client.get_model_version_by_alias("bins", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("bins", "challenger").version) == "2"
    tags = client.get_model_version("bins", "2").tags
    assert tags["promotion_decision"] == "not better than champion" and tags["compared_with_version"] == "1"
    assert float(tags["candidate/f1_macro"]) == pytest.approx(held["candidate"], abs=1e-4)
    assert float(tags["champion/f1_macro"]) == pytest.approx(held["champion"], abs=1e-4)
    assert tags["data_digest"]
    # any gain above -1 wins: v2 takes the champion alias
    won = promote_bins("2", min_gain=-1.0)
    assert won["decision"] == "better than champion"
    assert str(client.get_model_version_by_alias("bins", "champion").version) == "2"
    # v1 back against champion v2 with no margin: it wins exactly when its F1 is higher
    back = promote_bins("1", min_gain=0.0)
    v1_wins = back["candidate"] > back["champion"]
    assert back["decision"] == ("better than champion" if v1_wins else "not better than champion")
    assert back["alias"] == ("champion" if v1_wins else "challenger")
    champion = client.get_model_version_by_alias("bins", "champion").version
    assert str(champion) == ("1" if v1_wins else "2")

    # MAE is lower-is-better: the gain is champion - candidate, so no candidate gains 10 counts of MAE ...
    other = "2" if str(champion) == "1" else "1"
    held = promote_bins(other, metric="mae", min_gain=10.0)
    assert (held["decision"], held["alias"]) == ("not better than champion", "challenger")
    assert str(client.get_model_version_by_alias("bins", "champion").version) == str(champion)
    tags = client.get_model_version("bins", other).tags
    assert tags["promotion_metric"] == "mae" and float(tags["candidate/mae"]) == pytest.approx(held["candidate"],
                                                                                               abs=1e-4)
    # ... and with no margin the candidate wins exactly when its MAE is lower (higher would win if the sign were lost)
    lower = promote_bins(other, metric="mae", min_gain=0.0)
    assert lower["decision"] == ("better than champion" if lower["candidate"] < lower["champion"]
                                 else "not better than champion")
    # allowed to be up to 10 counts of MAE worse, any candidate takes the alias; the names before 0.2 still work
    assert promote_bins(other, metric="test_mae", min_gain=-10.0)["alias"] == "champion"
    # the promotion's scores are linked to the model they measured, with the split they were measured on
    promote_run = mlflow.last_active_run()
    candidate_model = mlflow.pyfunc.load_model(f"models:/bins/{other}").model_id
    logged = mlflow.MlflowClient().get_logged_model(candidate_model)
    assert any(m.key == "candidate/mae" and m.run_id == promote_run.info.run_id and m.dataset_name == "abid-test"
               for m in logged.metrics)
    promote_bins("1", min_gain=-10.0)  # v1 champion again for the serving tests
    assert str(client.get_model_version_by_alias("bins", "champion").version) == "1"


def test_promote_run_id_through_the_cli(use_registry, tiny_data, capsys):
    from bin_counter.cli import main

    client = mlflow.MlflowClient()
    client.set_registered_model_alias("bins", "champion", "1")
    v2 = client.get_model_version("bins", "2")
    # the run's registered version is the candidate; a full F1 point is out of reach, so it stays the challenger
    main(["promote", "--name", "bins", "--run-id", v2.run_id, "--data", str(tiny_data), "--min-gain", "1.0"])
    assert "bins v2: f1_macro" in capsys.readouterr().out
    assert client.get_model_version("bins", "2").tags["promotion_decision"] == "not better than champion"
    assert str(client.get_model_version_by_alias("bins", "challenger").version) == "2"
    assert str(client.get_model_version_by_alias("bins", "champion").version) == "1"
    # a run whose model is not registered under the name yet is registered, then promoted
    main(["promote", "--name", "bins-by-run", "--run-id", v2.run_id, "--data", str(tiny_data)])
    (registered,) = client.search_model_versions("name='bins-by-run'")
    assert registered.run_id == v2.run_id and registered.tags["promotion_decision"] == "first champion"
    assert client.get_model_version_by_alias("bins-by-run", "champion").version == registered.version
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["promote", "--name", "bins", "--run-id", "0" * 32, "--data", str(tiny_data)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.strip().splitlines()[-1] == f"error: model 'bins': Run with id={'0' * 32} not found"
    assert "Traceback" not in err


def test_registered_version_holds_the_best_epoch(use_registry):
    version = mlflow.MlflowClient().get_model_version("bins", "1")
    run = mlflow.get_run(version.run_id)
    history = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/loss")]
    config = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/model/artifacts/config.json")
    assert config["best_epoch"] == 1 + history.index(min(history))


def test_served_model_over_http(use_registry, tiny_data, tmp_path):
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("bins", "champion", "1")
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", "models:/bins@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, server)
        images = list(read_manifest(tiny_data, "test")["abs_path"][:3])
        good = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(Path(p).read_bytes()).decode()] for p in images]}}
        response = requests.post(url + "/invocations", json=good, timeout=60)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        assert len(rows) == 3 and all(r["predicted_count"] in (1, 2, 3, 4, 5) and r["error"] == "" for r in rows)
        # the same images through the registered model in-process give the same counts
        local = LocalModel("models:/bins@champion")(images)
        assert [r["predicted_count"] for r in rows] == list(local["predicted_count"])
        # with recorded quantities: count sets and the record check, as in-process
        recorded = {"dataframe_split": {"columns": ["image", "expected_quantity"],
                                        "data": [[row[0], q] for row, q in zip(good["dataframe_split"]["data"],
                                                                               (1, 40, None))]},
                    "params": {"coverage": 0.8}}
        checked = requests.post(url + "/invocations", json=recorded, timeout=60).json()["predictions"]
        in_process = LocalModel("models:/bins@champion")(images, [1, 40, None], {"coverage": 0.8})
        assert [r["count_set"] for r in checked] == list(in_process["count_set"]) and checked[0]["count_set"]
        assert [r["record_check"] for r in checked] == list(in_process["record_check"])
        assert checked[0]["record_check"] in ("suspect", "consistent") and 0 < checked[0]["record_p"] <= 1
        assert checked[1]["record_check"] == "outside" and checked[2]["record_check"] == ""
        bad_coverage = requests.post(url + "/invocations", json={**recorded, "params": {"coverage": 1.5}}, timeout=60)
        assert bad_coverage.status_code == 400 and "coverage must be between 0 and 1" in bad_coverage.json()["message"]

        bomb = Image.new("L", (9500, 9500))  # 90 MP of zeros: ~100 kB as PNG
        huge = Image.new("L", (10000, 10000), color=128)  # a 100-megapixel photo
        bad_payloads = {
            "not base64": "%%% not base64 %%%",
            "not an image": base64.b64encode(b"hello, I am not a JPEG").decode(),
            "empty": "",
            "decompression bomb": b64(bomb, "PNG"),
            "100 megapixels": b64(huge, "JPEG"),
        }
        for label, value in bad_payloads.items():
            bad = requests.post(url + "/invocations", json={"dataframe_records": [{"image": value}]}, timeout=120)
            assert 400 <= bad.status_code < 500, (label, bad.status_code, bad.text[:500])
            message = bad.json()["message"]
            assert any(word in message for word in ("base64", "image", "pixel")), (label, message[:300])
            again = requests.post(url + "/invocations", json=good, timeout=60)  # still serving
            assert again.status_code == 200
        # the server opens no files for its clients: a `path` row is refused, whatever the file
        for path in (images[0], "/etc/passwd"):
            probe = requests.post(url + "/invocations", json={"dataframe_records": [{"path": path}]}, timeout=30)
            assert probe.status_code == 400 and "paths are not accepted" in probe.json()["message"]
        not_json = requests.post(url + "/invocations", data=b"\x00\x01", timeout=30,
                                 headers={"Content-Type": "application/json"})
        assert 400 <= not_json.status_code < 500

        # batch prediction through the REST endpoint: same counts, unreadable files listed, not fatal
        folder = make_abid_dir(tmp_path / "abid", per_class=1)
        (folder / "bin-images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
        from bin_counter.commands.predict import RestModel

        results = predict(PredictConfig(input=str(folder), output=str(tmp_path / "rest.csv")), RestModel(url))
        assert len(results) == 6 and results.set_index("image_id").loc["broken", "needs_check"]
        assert "image" in results.set_index("image_id").loc["broken", "error"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_predict_folder_manifest_and_s3(use_registry, tiny_data, tmp_path, aws):
    folder = make_abid_dir(tmp_path / "abid", per_class=2)
    some_image = next((folder / "bin-images").glob("*.jpg"))
    (folder / "bin-images" / "truncated.jpg").write_bytes(some_image.read_bytes()[:400])
    (folder / "bin-images" / "notes.jpg").write_text("not an image at all")
    model = LocalModel("models:/bins/1")
    out = tmp_path / "results.csv"
    results = predict(PredictConfig(input=str(folder), output=str(out)), model)
    written = pd.read_csv(out, dtype={"image_id": str})
    assert len(written) == 12 and set(written.columns) >= {"image_id", "predicted_count", "confidence", "count_set",
                                                           "expected_quantity", "record_p", "record_check"}
    table = written.set_index("image_id")
    assert table.loc["notes", "check_reason"] == "unreadable image" and isinstance(table.loc["notes", "error"], str)
    assert table.loc["truncated", "check_reason"] == "unreadable image"
    readable = written[written["error"].isna()]
    assert readable["expected_quantity"].notna().all()  # from ABID metadata beside the images
    # every record is judged, and only an unreadable photo or a suspect record goes to people
    assert readable["record_check"].isin(["suspect", "consistent"]).all()
    assert (readable["needs_check"] == (readable["record_check"] == "suspect")).all()
    check = pd.read_csv(tmp_path / "results_manual_check.csv")
    assert len(check) == int(written["needs_check"].sum()) >= 2

    # --records over the metadata, by image_id and by path (path wins where ids repeat)
    first, second = sorted(readable["image_id"])[:2]
    records = tmp_path / "records.csv"
    pd.DataFrame({"image_id": [first, second], "path": ["", str(folder / "bin-images" / f"{second}.jpg")],
                  "expected_quantity": [0, 40]}).to_csv(records, index=False)
    rechecked = predict(PredictConfig(input=str(folder), output=str(tmp_path / "r.csv"), records=str(records)), model)
    rechecked = rechecked.set_index("image_id")
    assert rechecked.loc[first, "expected_quantity"] == 0 and rechecked.loc[second, "expected_quantity"] == 40
    assert (rechecked.loc[[first, second], "check_reason"] == "record outside the counts the model knows").all()

    from_manifest = predict(PredictConfig(input=str(tiny_data), output=str(tmp_path / "m.csv")), model)
    assert len(from_manifest) == 60 and from_manifest["expected_quantity"].notna().all()

    aws.create_bucket(Bucket="incoming")
    for path in sorted((folder / "bin-images").glob("0*.jpg"))[:4]:
        aws.put_object(Bucket="incoming", Key=f"today/bin-images/{path.name}", Body=path.read_bytes())
        aws.put_object(Bucket="incoming", Key=f"today/metadata/{path.stem}.json",
                       Body=(folder / "metadata" / f"{path.stem}.json").read_bytes())
    from_s3 = predict(PredictConfig(input="s3://incoming/today", output=str(tmp_path / "s3.csv")), model)
    assert len(from_s3) == 4 and from_s3["expected_quantity"].notna().all()
    batched = predict(PredictConfig(input=str(folder), output=str(tmp_path / "b1.csv"), batch_size=1), model)
    assert list(batched["predicted_count"]) == list(results["predicted_count"])


def test_deploy_to_sagemaker_on_moto(use_registry, aws, capsys):
    from bin_counter.cli import main

    aws.create_bucket(Bucket="models")
    common = ["--endpoint", "bins", "--region", "us-east-1"]
    create = ["deploy", "--model-uri", "models:/bins/1", *common, "--execution-role-arn",
              "arn:aws:iam::123456789012:role/sm", "--image-url",
              f"123456789012.dkr.ecr.us-east-1.amazonaws.com/mlflow-pyfunc:{mlflow.__version__}", "--bucket", "models"]
    main(create + ["--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["action"] == "create" and plan["config"]["instance_type"] == "ml.m5.large"
    assert not aws.list_objects_v2(Bucket="models").get("Contents")
    main(create)
    from mlflow.deployments import get_deploy_client

    client = get_deploy_client("sagemaker:/us-east-1")
    assert [d["EndpointName"] for d in client.list_deployments()] == ["bins"]
    assert client.get_deployment("bins")["EndpointStatus"] == "InService"
    assert any(o["Key"].endswith("model.tar.gz") for o in aws.list_objects_v2(Bucket="models")["Contents"])
    import boto3

    sagemaker = boto3.client("sagemaker", region_name="us-east-1")
    models = [sagemaker.describe_model(ModelName=m["ModelName"]) for m in sagemaker.list_models()["Models"]]
    environment = models[0]["PrimaryContainer"]["Environment"]
    # one scoring worker with ONNX Runtime's own threads, not MLflow's worker per vCPU each taking every core
    assert environment["MLFLOW_MODELS_WORKERS"] == "1" and environment["BIN_COUNTER_ENGINE"] == "onnx"
    assert environment["BIN_COUNTER_ONNX_THREADS"] == "0"
    capsys.readouterr()
    main(create + ["--update", "--workers", "2", "--threads-per-worker", "1", "--dry-run"])
    planned = json.loads(capsys.readouterr().out)["config"]["env"]
    assert planned["MLFLOW_MODELS_WORKERS"] == "2" and planned["BIN_COUNTER_ONNX_THREADS"] == "1"
    # the same endpoint through MLflow's own CLI: users can equally type `mlflow deployments ...`
    listed = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mlflow"), "deployments", "get", "-t",
                             "sagemaker:/us-east-1", "--name", "bins"], capture_output=True, text=True, env=os.environ)
    assert listed.returncode == 0 and "InService" in listed.stdout
    main(["deploy", *common, "--delete"])
    assert client.list_deployments() == []


def test_deploy_errors_are_one_line(use_registry, capsys):
    from bin_counter.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", "--endpoint", "x", "--region", "us-east-1", "--model-uri", "models:/bins/1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--execution-role-arn is required" in err


