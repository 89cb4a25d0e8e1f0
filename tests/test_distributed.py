"""`torchrun --nproc_per_node 2` on CPU (gloo): one MLflow run, rank 0 logs, accuracy matches one process."""
import os
import subprocess
import sys

import mlflow
import pytest

from bin_counter.config import PrepareConfig, TrainConfig
from bin_counter.prepare import prepare
from bin_counter.train import train

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_match_one(tmp_path, mlflow_store):
    data = tmp_path / "data"
    prepare(PrepareConfig(out=str(data), limit_per_class=24, split=(0.5, 0.25, 0.25), workers=2))
    options = ["--head", "sgd", "--image-size", "224", "--epochs", "4", "--batch-size", "8", "--feature-views", "2", "--num-workers", "0", "--seed", "1"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bin_counter", "train", "--data", str(data), "--cache-dir", str(tmp_path / "cache-ddp"), *options],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run_id:") == 1 and result.stdout.count("Average loss:") == 4  # rank 0 alone prints

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (ddp,) = [r for r in runs if r.data.params.get("world_size") == "2"]
    assert ddp.info.status == "FINISHED" and mlflow.MlflowClient().list_artifacts(ddp.info.run_id, "model") is not None
    assert len(mlflow.MlflowClient().get_metric_history(ddp.info.run_id, "val_loss")) == 4
    # written once, by rank 0: one file per preprocessing (training views; evaluation views for val and test)
    assert len(list((tmp_path / "cache-ddp").glob("*.pt"))) == 2

    single = train(TrainConfig(data=str(data), head="sgd", image_size=224, epochs=4, batch_size=8, feature_views=2, num_workers=0, seed=1,
                               cache_dir=str(tmp_path / "cache-one")), save_model=False)
    # 30 test images: two runs of the same recipe differ by chance alone by up to ~0.25 (two binomial SEs)
    assert abs(ddp.data.metrics["test_accuracy"] - single.test_metrics["accuracy"]) <= 0.25
