"""`torchrun --nproc_per_node 2` on CPU (gloo): one MLflow run, rank 0 logs, the ranks' shared work matches one
process: the same features, and the same first epoch for the same global batch."""
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from bin_counter.commands.prepare import prepare
from bin_counter.commands.train import train
from bin_counter.config import PrepareConfig, TrainConfig

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_match_one(tmp_path, mlflow_store):
    data = tmp_path / "data"
    prepare(PrepareConfig(out=str(data), limit_per_class=24, split=(0.5, 0.25, 0.25), workers=2))
    options = ["--head", "sgd", "--image-size", "224", "--epochs", "4", "--batch-size", "8", "--feature-views", "2",
               "--num-workers", "0", "--seed", "1"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bin_counter", "train", "--data", str(data), "--cache-dir", str(tmp_path / "cache-ddp"), *options],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run_id:") == 1 and result.stdout.count("Average loss:") == 4  # rank 0 alone prints

    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (ddp,) = [r for r in runs if r.data.params.get("world_size") == "2"]
    assert ddp.info.status == "FINISHED"
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(ddp.info.run_id, "model")}
    history = {key: [m.value for m in sorted(client.get_metric_history(ddp.info.run_id, key), key=lambda m: m.step)]
               for key in ("train_loss", "val_loss")}
    assert len(history["val_loss"]) == 4
    # written once, by rank 0: one file per preprocessing (training views; evaluation views for val and test)
    ddp_cache = sorted((tmp_path / "cache-ddp").glob("*.pt"))
    assert len(ddp_cache) == 2

    # one process with the same global batch (2 ranks x 8 = 16)
    single = train(TrainConfig(data=str(data), head="sgd", image_size=224, epochs=4, batch_size=16, feature_views=2,
                               num_workers=0, seed=1, cache_dir=str(tmp_path / "cache-one")), save_model=False)
    # each rank extracted every other image and the rows were gathered back in place: the same features (float16)
    for path in ddp_cache:
        mine, one = torch.load(path), torch.load(tmp_path / "cache-one" / path.name)
        assert mine["sha"] == one["sha"] and torch.equal(mine["ok"], one["ok"])
        assert torch.allclose(mine["features"].float(), one["features"].float(), atol=5e-3)
    # the first epoch starts from the same seeded head on the same data and global batch: its losses agree to
    # dropout/BatchNorm noise (measured 0.04 and 0.014), well inside the spread between seeds (0.2-0.35 and ~0.05)
    assert history["train_loss"][0] == pytest.approx(single.history["train_loss"][0], abs=0.1)
    assert history["val_loss"][0] == pytest.approx(single.history["val_loss"][0], abs=0.03)
