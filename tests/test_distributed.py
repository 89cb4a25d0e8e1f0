"""`torchrun --nproc_per_node 2` on CPU (gloo): one MLflow run, rank 0 logs, the ranks' shared work matches one
process: the same features, and the same first epoch for the same global batch."""
import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from bin_counter.commands.prepare import build_data_dir
from bin_counter.commands.train import train
from bin_counter.config import PrepareConfig, TrainConfig

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_match_one(tmp_path, mlflow_store):
    data = tmp_path / "data"
    build_data_dir(PrepareConfig(out=str(data), limit_per_class=24, split=(0.5, 0.25, 0.25), workers=2))
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
    history = {key.replace("/", "_"): [m.value for m in sorted(client.get_metric_history(ddp.info.run_id, key),
                                                                  key=lambda m: m.step)]
               for key in ("train/loss", "val/loss")}
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


def _extract_one_image_on_two_ranks(rank: int, init: str, frame_path: str, out: str) -> None:
    import pandas as pd
    import torch.distributed as dist

    from bin_counter.core.data import eval_transform
    from bin_counter.core.features import cached_features
    from bin_counter.core.models import create_model

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        frame = pd.read_pickle(frame_path)
        features, ok = cached_features(create_model("efficientnet-lite0", 5), frame, [1, 2, 3, 4, 5],
                                       eval_transform("efficientnet-lite0"), views=1, description={}, cache_dir=None,
                                       batch_size=2, num_workers=0, seed=0, device=torch.device("cpu"), desc="val")
        torch.save((features, ok), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_extract_a_split_of_one_image(tiny_data, tmp_path):
    """Rank 1's share of a one-image split is empty: before, it raised "no readable image" and the run died."""
    import torch.multiprocessing as mp

    from bin_counter.core.manifest import read_manifest

    read_manifest(tiny_data, "val").head(1).to_pickle(tmp_path / "frame.pkl")
    mp.spawn(_extract_one_image_on_two_ranks, nprocs=2, join=True,
             args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "frame.pkl"), str(tmp_path)))
    (first, first_ok), (second, second_ok) = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    assert first_ok.tolist() == second_ok.tolist() == [True] and torch.equal(first, second)


def test_torchrun_streams_an_odd_number_of_shards_with_two_workers_per_rank(tmp_path, mlflow_store):
    """3 training shards over 2 ranks x 2 workers give the ranks 14 and 6 images (unequal batch counts: DDP hung),
    and the single val shard gave rank 1 nothing to score ("no readable image"); rank 0 reported its share only."""
    data = tmp_path / "data"
    prepared = build_data_dir(PrepareConfig(out=str(data), limit_per_class=6, split=(0.6, 0.2, 0.2), workers=2,
                                           shard_size=7)).manifest
    index = json.loads((data / "shards" / "index.json").read_text())
    assert len(index["train"]) == 3 and len(index["val"]) == 1
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bin_counter",
         "train", "--stream", "--data", str(data), "--head", "sgd", "--image-size", "160", "--epochs", "1",
         "--batch-size", "4", "--num-workers", "2", "--no-tta", "--checkpoint-dir", str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
              if r.data.params.get("world_size") == "2"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/n"] == (prepared["split"] == "test").sum()  # the whole split, not rank 0's share
