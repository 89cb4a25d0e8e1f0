"""The ONNX Runtime inference path gives the eager model's probabilities on real ABID photos, and falls back."""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from bin_counter import BinCounterError
from bin_counter.core.data import eval_transform
from bin_counter.core.dataset import SAMPLE_DIR
from bin_counter.core.engine import FeaturesOnly, OnnxEngine, TorchEngine, ViewAveraged, export_onnx, probability_engine
from bin_counter.core.models import create_model
from bin_counter.pyfunc import encode_image, log_model

CPU = torch.device("cpu")
SIZE = 320
CLASSES = [1, 2, 3, 4, 5]


def real_photos(n: int) -> list[Path]:
    return sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))[:n]


def batch_of(paths: list[Path]) -> torch.Tensor:
    from bin_counter.core.abid import read_image

    transform = eval_transform("efficientnet-lite0", SIZE)
    return torch.stack([transform(read_image(p)) for p in paths])


@pytest.fixture(scope="module")
def counting_model():
    torch.manual_seed(0)
    model = create_model("efficientnet-lite0", len(CLASSES)).eval()
    # a head whose answers vary with the image, so a mismatch in the backbone cannot hide behind a constant
    torch.nn.init.normal_(model.head[-1].weight, std=0.05)
    return model


def test_onnx_graph_gives_the_eager_probabilities_with_views_folded_into_one_batch(counting_model):
    images = batch_of(real_photos(12))
    eager = TorchEngine(ViewAveraged(counting_model, tta=True), CPU)(images)
    onnx = OnnxEngine(export_onnx(ViewAveraged(counting_model, tta=True), SIZE))(images)
    assert onnx.shape == (12, len(CLASSES))
    np.testing.assert_allclose(onnx.numpy(), eager.numpy(), atol=1e-3)
    assert eager.std(0).max() > 0.02  # the comparison is not between two constants
    # the views really are averaged: one view alone answers something else
    single = TorchEngine(ViewAveraged(counting_model, tta=False), CPU)(images)
    assert (single - eager).abs().max() > 1e-3


def test_onnx_backbone_gives_the_eager_features(counting_model):
    images = batch_of(real_photos(6))
    eager = TorchEngine(FeaturesOnly(counting_model), CPU)(images)
    onnx = OnnxEngine(export_onnx(FeaturesOnly(counting_model), SIZE))(images)
    assert onnx.shape == eager.shape == (6, 1280)
    np.testing.assert_allclose(onnx.numpy(), eager.numpy(), atol=1e-3, rtol=1e-3)


def test_export_leaves_the_callers_model_as_it_was(counting_model):
    counting_model.train()
    try:
        export_onnx(FeaturesOnly(counting_model), 224)
        assert counting_model.training and counting_model.head[0].training
    finally:
        counting_model.eval()


def test_engine_choice_follows_the_variable_and_falls_back_with_a_reason(counting_model, tmp_path, monkeypatch,
                                                                          caplog):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(export_onnx(ViewAveraged(counting_model, tta=True), SIZE))
    assert probability_engine(counting_model, True, CPU, graph).name == "onnx"
    monkeypatch.setenv("BIN_COUNTER_ENGINE", "torch")
    assert probability_engine(counting_model, True, CPU, graph).name == "torch"
    monkeypatch.setenv("BIN_COUNTER_ENGINE", "tensorrt")
    with pytest.raises(BinCounterError, match="BIN_COUNTER_ENGINE='tensorrt': choose one of onnx, torch"):
        probability_engine(counting_model, True, CPU, graph)
    monkeypatch.delenv("BIN_COUNTER_ENGINE")
    with caplog.at_level(logging.WARNING, logger="bin_counter.core.engine"):
        assert probability_engine(counting_model, True, CPU, tmp_path / "absent.onnx").name == "torch"
        assert "no ONNX graph" in caplog.text
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
        assert probability_engine(counting_model, True, CPU, graph).name == "torch"
        assert "onnxruntime cannot be imported" in caplog.text


@pytest.mark.slow
def test_logged_model_serves_the_same_counts_through_either_engine_and_without_its_graph(counting_model, tmp_path,
                                                                                         monkeypatch):
    config = {"backbone": "efficientnet-lite0", "classes": CLASSES, "image_size": SIZE, "tta": True,
              "decoding": {"how": "ordinal", "cost": 2.0, "tail_boost": 0.5}}
    photos = real_photos(20)
    with mlflow.start_run():
        info = log_model(counting_model, config, [str(p) for p in photos[:2]])
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    assert (local / "artifacts" / "model.onnx").stat().st_size > 1_000_000  # the graph travels with the model
    frame = pd.DataFrame({"image": [encode_image(p) for p in photos]})
    columns = [f"prob_{c}" for c in CLASSES]

    def served(engine: str, uri: str) -> pd.DataFrame:
        monkeypatch.setenv("BIN_COUNTER_ENGINE", engine)
        model = mlflow.pyfunc.load_model(uri)
        assert model.unwrap_python_model().engine.name == engine
        return model.predict(frame)

    onnx, eager = served("onnx", str(local)), served("torch", str(local))
    np.testing.assert_allclose(onnx[columns].to_numpy(), eager[columns].to_numpy(), atol=1e-3)
    assert (onnx["predicted_count"] == eager["predicted_count"]).all()
    # a model logged before the graph existed still loads, on the eager path
    old = tmp_path / "old"
    shutil.copytree(local, old)
    (old / "artifacts" / "model.onnx").unlink()
    monkeypatch.delenv("BIN_COUNTER_ENGINE")
    legacy = mlflow.pyfunc.load_model(str(old))
    assert legacy.unwrap_python_model().engine.name == "torch"
    assert (legacy.predict(frame)["predicted_count"] == onnx["predicted_count"]).all()
    assert json.loads((local / "artifacts" / "config.json").read_text())["tta"] is True


def test_bad_rows_are_reported_at_their_row_across_batches(counting_model, tmp_path):
    from bin_counter.pyfunc import prepared_batches

    transform = eval_transform("efficientnet-lite0", 64)
    good = encode_image(real_photos(1)[0])
    images = [good, "not base64!", good, "", good]
    batches = list(prepared_batches(images, transform, batch_size=2))
    assert [rows for rows, _, _ in batches] == [[0], [2], [4]]
    assert {row for _, _, failed in batches for row in failed} == {1, 3}
    assert all(batch.shape[0] == len(rows) for rows, batch, _ in batches)


@pytest.mark.slow
def test_int8_switch_logs_a_quantised_graph_calibrated_on_training_images(counting_model, tmp_path, monkeypatch):
    import onnx

    from bin_counter import BinCounterError
    from bin_counter.config import TrainConfig
    from bin_counter.pyfunc import inference_graph

    config = {"backbone": "efficientnet-lite0", "classes": CLASSES, "image_size": 224, "tta": True, "int8": True}
    photos = [str(p) for p in real_photos(40)]
    with pytest.raises(ValueError, match="needs training images to calibrate"):
        inference_graph(counting_model, config, [])
    with pytest.raises(BinCounterError, match="--int8 .* not with --stream"):
        TrainConfig(int8=True, stream=True, head="sgd", data="s3://bucket/data").validate()
    with mlflow.start_run():
        info = log_model(counting_model, config, photos[:2], calibration_images=photos[:16])
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    ops = {node.op_type for node in onnx.load(str(local / "artifacts" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    frame = pd.DataFrame({"image": [encode_image(p) for p in photos[16:]]})  # images it was not calibrated on
    int8 = mlflow.pyfunc.load_model(str(local)).predict(frame)
    monkeypatch.setenv("BIN_COUNTER_ENGINE", "torch")
    fp32 = mlflow.pyfunc.load_model(str(local)).predict(frame)
    columns = [f"prob_{c}" for c in CLASSES]
    difference = np.abs(int8[columns].to_numpy() - fp32[columns].to_numpy())
    assert 0 < difference.mean() < 0.03  # quantised (not the fp32 graph) yet close to it


def test_exports_from_parallel_threads_do_not_collide(counting_model):
    """tune runs trials as threads (n_jobs > 1), and each extracts features through its own export."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        graphs = list(pool.map(lambda _: export_onnx(FeaturesOnly(counting_model), 64), range(3)))
    assert len(set(map(len, graphs))) == 1 and len(graphs[0]) > 1_000_000
