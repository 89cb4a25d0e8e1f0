"""The study end to end on real sample images with a real sqlite MLflow store."""
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from bin_counter.commands.evaluate import evaluate
from bin_counter.commands.train import train
from bin_counter.config import EvaluateConfig, TrainConfig
from bin_counter.core.data import ManifestImages, eval_transform
from bin_counter.core.features import cached_features
from bin_counter.core.manifest import read_manifest
from bin_counter.core.metrics import STUDY_REGEXES
from bin_counter.core.models import create_model, freeze

pytestmark = pytest.mark.slow


def test_train_log_load_evaluate(tiny_data, tmp_path, capsys):
    cfg = TrainConfig(data=str(tiny_data), head="sgd", image_size=224, epochs=2, batch_size=8, feature_views=2,
                      num_workers=0,
                      cache_dir=str(tmp_path / "cache"), register_as="bin-counter-test")
    result = train(cfg)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"run_id: {result.run_id}"
    for regex in STUDY_REGEXES.values():
        assert len(re.findall(regex, out)) == 2  # one line per epoch
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.params["backbone"] == "efficientnet-lite0" and run.data.tags["dataset_digest"]
    assert {"val/loss", "train/loss", "test/accuracy", "test_per_class/f1_3", "train/best_epoch",
            "test/majority_accuracy", "test/ece_top_label", "test/set_coverage"} <= set(run.data.metrics)
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "val/loss")
    assert len(history) == 2 and run.data.metrics["train/best_epoch"] == 1 + int(np.argmin([h.value for h in history]))
    # the training run carries the pictures people look at, and its logged model says what it is
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"confusion_matrix.png", "per_class.png", "reliability.png", "risk_coverage.png",
            "test_predictions.csv"} <= artifacts and "training_history.png" in artifacts  # two epochs: a curve
    logged = mlflow.MlflowClient().get_logged_model(mlflow.models.get_model_info(result.model_uri).model_id)
    assert logged.tags["bin_counter.backbone"] == "efficientnet-lite0" and logged.model_type.startswith("efficientnet")
    assert all(v != "" for v in run.data.params.values()) and "cache_dir" not in run.data.params
    version = mlflow.MlflowClient().get_registered_model("bin-counter-test").latest_versions[0]
    assert version.run_id == result.run_id

    report = evaluate(EvaluateConfig(model_uri=result.model_uri, data=str(tiny_data), split="test",
                                     output=str(tmp_path / "metrics.json")))
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["accuracy"] == pytest.approx(report.metrics["accuracy"]) and set(doc["per_class"]) == {"1", "2", "3",
                                                                                                      "4", "5"}
    # the model's own test metrics (in-memory, cached features) agree with the logged model's on the same images
    assert report.metrics["accuracy"] == pytest.approx(result.test_metrics["accuracy"], abs=1 / 12 + 1e-9)
    eval_run = mlflow.last_active_run()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(eval_run.info.run_id)}
    assert {"confusion_matrix.png", "per_class.png", "test_per_class.csv", "test_predictions.csv", "test_metrics.json",
            "reliability.png", "risk_coverage.png"} <= artifacts
    # evaluate and train share the headline keys, and the evaluation is on the model's page with its dataset
    assert {"test/accuracy", "test/f1_macro", "test/mae"} <= set(eval_run.data.metrics) & set(run.data.metrics)
    evaluated = mlflow.MlflowClient().get_logged_model(logged.model_id)
    assert any(m.key == "test/accuracy" and m.run_id == eval_run.info.run_id and m.dataset_name == "abid-test"
               for m in evaluated.metrics)

    # a fresh process, with nothing but the package, loads the model and counts base64 JPEGs of any batch size
    images = list(read_manifest(tiny_data, "test")["abs_path"][:3])
    payload = json.dumps([base64.b64encode(Path(p).read_bytes()).decode() for p in images])
    code = ("import json,sys,mlflow,pandas as pd; m=mlflow.pyfunc.load_model(sys.argv[1]);"
            "print(m.predict(pd.DataFrame({'image': json.loads(sys.argv[2])})).to_json(orient='records'))")
    proc = subprocess.run([sys.executable, "-c", code, result.model_uri, payload], capture_output=True, text=True,
                          cwd=tmp_path, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 3 and all(r["predicted_count"] in range(1, 6) and 0 < r["confidence"] <= 1 for r in rows)
    assert all(abs(sum(r[f"prob_{c}"] for c in range(1, 6)) - 1) < 1e-4 for r in rows)


def test_feature_cache_equals_full_forward(tiny_data, tmp_path):
    frame = read_manifest(tiny_data, "val")
    classes = [1, 2, 3, 4, 5]
    model = create_model("efficientnet-lite0", 5)
    freeze(model, 0)
    model.eval()
    transform = eval_transform("efficientnet-lite0")
    args = dict(views=1, description={"t": 1}, cache_dir=tmp_path, batch_size=4, num_workers=0, seed=0,
                device=torch.device("cpu"), desc="val")
    features, ok = cached_features(model, frame, classes, transform, **args)
    assert ok.all() and len(list(tmp_path.glob("*.pt"))) == 1
    images = torch.stack([transform(__import__("PIL.Image", fromlist=["Image"]).open(p).convert("RGB"))
                          for p in frame["abs_path"]])
    with torch.no_grad():
        full = model(images)
        from_cache = model.head(features[:, 0])
    assert torch.allclose(full, from_cache, atol=2e-2)  # float16 storage: ~1e-3 relative
    assert torch.equal(full.argmax(1), from_cache.argmax(1))
    again, _ = cached_features(model, frame, classes, transform, **args)  # second call reads the file
    assert torch.equal(again, features)


def test_corrupt_images_in_a_dataset_are_reported_not_crashed_on(tiny_data, tmp_path, caplog):
    frame = read_manifest(tiny_data, "val").head(4).copy()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(Path(frame.loc[0, "abs_path"]).read_bytes()[:300])
    frame.loc[0, "abs_path"] = str(bad)
    dataset = ManifestImages(frame, [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"))
    assert dataset[0] is None and dataset[1] is not None
    assert "skipping image" in caplog.text and frame.loc[0, "image_id"] in caplog.text
    model = create_model("efficientnet-lite0", 5)
    features, ok = cached_features(model, frame, [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"), views=1,
                                   description={}, cache_dir=None, batch_size=2, num_workers=0, seed=0,
                                   device=torch.device("cpu"), desc="val")
    assert ok.tolist() == [False, True, True, True]


def test_full_forward_path_fine_tunes_last_stage(tiny_data, tmp_path):
    cfg = TrainConfig(data=str(tiny_data), head="sgd", image_size=224, epochs=1, batch_size=8, unfreeze_last=1,
                      num_workers=0,
                      cache_dir=str(tmp_path / "cache"))
    result = train(cfg)
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert int(run.data.params["trainable_params"]) > 100_000  # the head alone has 6,405 + BN
    assert not list((tmp_path / "cache").glob("*.pt"))  # no feature cache once the backbone learns




def test_one_missing_test_image_does_not_lose_the_trained_model(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    Path(read_manifest(data, "test")["abs_path"][0]).unlink()  # the first candidate for the input example
    result = train(TrainConfig(data=str(data), image_size=224, tta=False, num_workers=0,
                               cache_dir=str(tmp_path / "cache"), checkpoint_dir=None))
    assert result.model_uri and mlflow.MlflowClient().get_run(result.run_id).info.status == "FINISHED"
    example = mlflow.models.Model.load(result.model_uri).load_input_example(result.model_uri)
    assert len(example) == 2
