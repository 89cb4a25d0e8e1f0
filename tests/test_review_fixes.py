"""Defects an independent review found in this round's changes, each shown here (each test fails on the old code)."""
from __future__ import annotations

import logging

import pytest
import torch

from bin_counter import BinCounterError
from bin_counter.cli import main, parse, train_config
from conftest import free_port


def test_verbose_traceback_and_server_errors_never_show_the_tracking_password(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cretpw@127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for verbose in ([], ["-v"]):
        with pytest.raises(SystemExit) as ended:
            main([*verbose, "predict", "--model-uri", "runs:/0123456789abcdef/model", "--input", str(tmp_path)])
        err = capsys.readouterr().err
        assert ended.value.code == 2 and "s3cretpw" not in err and err.strip().splitlines()[-1].startswith("error:")
        assert ("Traceback" in err) == bool(verbose)


@pytest.mark.parametrize("value, expected", [("on", True), ("off", False), ("yes", True), ("0", False)])
def test_boolean_values_are_read_strictly(value, expected):
    assert train_config(parse(["train", "--tta", value])).tta is expected


def test_an_unknown_boolean_value_is_refused_not_read_as_false(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["train", "--int8", "y"])
    assert ended.value.code == 2 and "expected true or false, got 'y'" in capsys.readouterr().err


def test_launch_refuses_an_unknown_recipe_before_sending_anything(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["launch", "--s3-data", "s3://b/p", "--role", "r", "--output-path", "s3://b/o", "--dry-run", "--",
              "--recipe", "bogus"])
    assert ended.value.code == 2 and "unknown recipe 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "cannot be read"),  # a directory
    ("5\n", "expected a mapping of option: value, got int"),
    ("- a: 1\n", "expected a mapping of option: value, got list"),
    ("tta: maybe\n", "tta: expected true or false"),
    ("epochs: many\n", "epochs:"),
])
def test_bad_settings_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "dir" if content is None else tmp_path / "config.yaml"
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(SystemExit) as ended:
        main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and message in err and "Traceback" not in err


def test_settings_file_values_are_converted_like_options(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("tta: 'false'\nepochs: 5.0\nlr: '0.01'\n")
    cfg = train_config(parse(["train", "--config", str(path)]))
    assert (cfg.tta, cfg.epochs, cfg.lr) == (False, 5, 0.01) and isinstance(cfg.epochs, int)


@pytest.mark.parametrize("size", ["0", "-1"])
def test_predict_batch_size_must_be_positive(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as ended:
        main(["predict", "--model-uri", "x", "--input", str(tmp_path), "--batch-size", size])
    assert ended.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


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
    from bin_counter.core.dataset import SAMPLE_DIR
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


def test_resume_accepts_a_checkpoint_written_before_a_setting_existed(tiny_data, tmp_path):
    """A checkpoint's config without `int8` (added later) was refused as 'written with other settings (int8)'."""
    import mlflow
    from test_hostile_inputs_b import progress_like_fit, tiny_training_state

    from bin_counter.commands.train import data_digest, resume_state, split_frames
    from bin_counter.config import TrainConfig, as_params
    from bin_counter.core import checkpoint

    options = dict(data=str(tiny_data), head="sgd", checkpoint_dir=str(tmp_path / "ckpt"), resume="latest")
    digest = data_digest(split_frames(str(tiny_data)))
    older = {k: v for k, v in as_params(TrainConfig(**options)).items() if k != "int8"}  # as an older version wrote
    with mlflow.start_run() as run:
        pass
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    checkpoint.save(checkpoint.path_for(tmp_path / "ckpt", run.info.run_id), 1, net, optimizer, scheduler, scaler,
                    progress_like_fit(net), loaders, run.info.run_id, {**older, "data_digest": digest})
    assert resume_state(TrainConfig(**options), digest)["run_id"] == run.info.run_id
