"""The inference engine's choices and fallbacks: an unknown engine, a graph ONNX Runtime cannot load, int8 run
eagerly, int8 calibration over an unreadable image."""
from __future__ import annotations

import logging

import pytest
import torch

from bin_counter import BinCounterError
from bin_counter.core.dataset import SAMPLE_DIR


def small_model():
    from bin_counter.core.models import create_model

    return create_model("efficientnet-lite0", 5, pretrained=False).eval()


def test_an_unknown_engine_is_a_one_line_error_not_a_traceback(monkeypatch):
    from bin_counter.core.engine import feature_engine

    monkeypatch.setenv("BIN_COUNTER_ENGINE", "tensorrt")
    with pytest.raises(BinCounterError, match="choose one of onnx, torch"):
        feature_engine(small_model(), 64, torch.device("cpu"))


def test_a_graph_onnx_runtime_cannot_load_falls_back_to_the_weights(tmp_path, caplog):
    from bin_counter.core.engine import probability_engine

    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="bin_counter.core.engine"):
        engine = probability_engine(small_model(), True, torch.device("cpu"), graph)
    assert engine.name == "torch" and "ONNX Runtime cannot load" in caplog.text
    assert engine(torch.rand(2, 3, 64, 64)).shape == (2, 5)


def test_an_int8_model_run_eagerly_says_its_counts_can_differ(tmp_path, monkeypatch, caplog):
    from bin_counter.core.engine import probability_engine

    monkeypatch.setenv("BIN_COUNTER_ENGINE", "torch")
    with caplog.at_level(logging.WARNING, logger="bin_counter.core.engine"):
        probability_engine(small_model(), True, torch.device("cpu"), None, int8=True)
    assert "not the model's int8 graph" in caplog.text


def test_int8_calibration_skips_an_unreadable_training_image(tmp_path, caplog):
    from bin_counter.pyfunc import inference_graph

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    photos = [str(p) for p in sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))[:4]]
    config = {"backbone": "efficientnet-lite0", "classes": [1, 2, 3, 4, 5], "image_size": 64, "tta": False,
              "int8": True}
    with caplog.at_level(logging.WARNING, logger="bin_counter.pyfunc"):
        graph = inference_graph(small_model(), config, [str(broken), *photos])
    assert len(graph) > 100_000 and "int8 calibration skips" in caplog.text
    with pytest.raises(BinCounterError, match="no readable training image"):
        inference_graph(small_model(), config, [str(broken)])
