"""Debugger rules fired by crafted trainings on real images, a healthy run that fires none, and the profiler report."""
import re
import shutil
import subprocess

import mlflow
import pandas as pd
import pytest

from bin_counter import BinCounterError
from bin_counter.commands.train import train
from bin_counter.config import RECIPES, TrainConfig

pytestmark = pytest.mark.slow


# The crafted trainings use the study's plain switches, so that each fires its rule for the reason it was built.
STUDY = {k: v for k, v in RECIPES["study"].items() if k not in ("lr", "epochs")}


def run_tags(tiny_data, tmp_path, **overrides) -> dict:
    cfg = TrainConfig(data=str(tiny_data), batch_size=8, feature_views=2, num_workers=0,
                      cache_dir=str(tmp_path.parent / "rules-cache"), **{**STUDY, **overrides})
    result = train(cfg, save_model=False)
    return {k: v for k, v in mlflow.get_run(result.run_id).data.tags.items() if k.startswith("debugger.")}


def test_healthy_training_fires_no_rule(tiny_data, tmp_path):
    assert run_tags(tiny_data, tmp_path, epochs=3, lr=1e-3) == {}


def test_learning_rate_far_too_high_explodes(tiny_data, tmp_path):
    tags = run_tags(tiny_data, tmp_path, epochs=2, lr=1e4)
    assert "gradient norm" in tags["debugger.exploding_gradients"]


def test_nan_loss_stops_with_clear_error_and_keeps_best_epoch(tiny_data, tmp_path):
    with pytest.raises(BinCounterError, match=r"NaN/inf at epoch 2; the best epoch \(1\) was kept as models:/"):
        train(TrainConfig(data=str(tiny_data), head="sgd", image_size=224, batch_size=8, feature_views=1,
                          num_workers=0, epochs=5, lr=1e6,
                          cache_dir=str(tmp_path / "cache")))
    run = mlflow.last_active_run()
    assert "debugger.nan_loss" in run.data.tags and run.data.metrics["train/best_epoch"] == 1
    assert run.info.status == "FAILED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/loss")) == 1  # NaN is not logged


def test_nan_in_the_first_epoch_keeps_nothing(tiny_data, tmp_path):
    with pytest.raises(BinCounterError, match="no model was kept"):
        train(TrainConfig(data=str(tiny_data), head="sgd", image_size=224, batch_size=8, feature_views=1,
                          num_workers=0, epochs=3, lr=1e30,
                          cache_dir=str(tmp_path / "cache")))


def test_learning_rate_far_too_low_does_not_decrease(tiny_data, tmp_path):
    tags = run_tags(tiny_data, tmp_path, epochs=8, lr=1e-9)
    assert "training loss" in tags["debugger.loss_not_decreasing"]


def test_tiny_train_set_overfits(tiny_data, tmp_path):
    tags = run_tags(tiny_data, tmp_path, epochs=6, lr=1e-2)
    assert tags["debugger.overfitting"].startswith("epoch ")


def test_one_label_training_set_is_imbalanced_and_gradients_vanish(tiny_data, tmp_path):
    data = tmp_path / "one-label"
    shutil.copytree(tiny_data, data)
    manifest = pd.read_csv(data / "manifest.csv", dtype={"image_id": str})
    manifest.loc[manifest["split"] == "train", "count"] = 1  # labels shuffled to the extreme: one class
    manifest.to_csv(data / "manifest.csv", index=False)
    tags = run_tags(data, tmp_path, epochs=4, lr=1.0)
    assert re.search(r"count 1: \d+ training images, count \d: 0 ", tags["debugger.class_imbalance"])
    assert "gradient norm" in tags["debugger.vanishing_gradients"]


def test_profiler_report_renders_with_every_section(tiny_data, tmp_path):
    result = train(TrainConfig(data=str(tiny_data), head="sgd", image_size=224, batch_size=4, feature_views=1,
                               num_workers=0, epochs=3,
                               cache_dir=str(tmp_path / "cache"), profile=True))
    run = mlflow.get_run(result.run_id)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "profiler")}
    assert {"profiler/profiler_report.html", "profiler/profiler_summary.md", "profiler/top_operators.txt",
            "profiler/trace.json"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="profiler", dst_path=str(tmp_path))
    html = (tmp_path / "profiler" / "profiler_report.html").read_text()
    for section in ("Summary", "Step time breakdown", "Utilisation and memory", "Profiler findings",
                    "Debugger findings", "Top operators"):
        assert f"<h2>{section}</h2>" in html
    assert html.count("data:image/png;base64,") == 2 and "src=\"http" not in html  # self-contained
    assert "batch_too_small" in html and run.data.tags["profiler.batch_too_small"].startswith("batch size 4")
    assert 0 < run.data.metrics["profile/images_per_s"] and 0.99 < sum(
        run.data.metrics[f"profile/{p}_share"] for p in ("data", "forward", "backward", "optimizer")) < 1.01
    assert "aten::" in (tmp_path / "profiler" / "top_operators.txt").read_text()
    assert '"traceEvents"' in (tmp_path / "profiler" / "trace.json").read_text()[:2000]
    # system metrics are on for every run
    assert any(k.startswith("system/cpu_utilization_percentage") for k in run.data.metrics)
    # a user opens the report: render its first page headless, as a PNG
    chromium = shutil.which("chromium")
    if chromium:
        png = tmp_path / "report.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1000,1400", f"--screenshot={png}",
                        f"file://{local}/profiler_report.html"], capture_output=True, timeout=120)
        assert png.stat().st_size > 20_000


def test_profiled_training_leaves_no_temporary_folder_behind(tiny_data, tmp_path, monkeypatch):
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    train(TrainConfig(data=str(tiny_data), head="sgd", image_size=224, batch_size=8, feature_views=1, num_workers=0,
                      epochs=1, cache_dir=str(tmp_path / "cache"), profile=True, checkpoint_dir=None))
    assert not list((tmp_path / "tmp").glob("bin-counter-profile-*"))  # before: one per run, the trace inside
