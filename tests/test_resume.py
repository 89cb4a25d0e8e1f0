"""SIGTERM (spot reclaim, Ctrl-C) mid-training, then --resume: same MLflow run, same result as no interruption."""
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from bin_counter import BinCounterError
from bin_counter.commands.train import train
from bin_counter.config import TrainConfig

pytestmark = pytest.mark.slow
OPTIONS = dict(head="sgd", image_size=224, epochs=5, batch_size=8, feature_cache=False, num_workers=0, seed=3)


def test_sigterm_then_resume_matches_an_uninterrupted_run(tiny_data, tmp_path):
    reference = train(TrainConfig(data=str(tiny_data), checkpoint_dir=str(tmp_path / "ref"), **OPTIONS),
                      save_model=False)
    assert not list((tmp_path / "ref").glob("*.pt")), "a finished run leaves no checkpoint behind"

    checkpoints = tmp_path / "ckpt"
    command = [sys.executable, "-m", "bin_counter", "train", "--data", str(tiny_data), "--checkpoint-dir",
               str(checkpoints), "--head", "sgd", "--image-size", "224", "--epochs", "5", "--batch-size", "8",
               "--no-feature-cache", "--num-workers", "0", "--seed", "3"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("*.pt")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # after the first finished epoch, in the middle of the second
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "interrupted by SIGTERM" in err and "--resume" in err
    (saved,) = checkpoints.glob("*.pt")
    run_id = saved.stem
    assert mlflow.get_run(run_id).info.status == "KILLED"

    resumed = train(TrainConfig(data=str(tiny_data), checkpoint_dir=str(checkpoints), resume="latest", **OPTIONS),
                    save_model=False)
    assert resumed.run_id == run_id and mlflow.get_run(run_id).info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run_id, "val/loss")
    # epochs 1-5 are all in the run; an epoch logged just before SIGTERM but not yet checkpointed is trained and
    # logged again (at most one repeat), and every logged value is the uninterrupted run's
    assert {m.step for m in history} == {1, 2, 3, 4, 5} and len(history) <= 6
    for m in history:
        assert m.value == pytest.approx(reference.history["val_loss"][m.step - 1], rel=1e-5), m.step
    np.testing.assert_allclose(resumed.history["val_loss"], reference.history["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed.history["train_loss"], reference.history["train_loss"], rtol=1e-5)
    assert resumed.best_epoch == reference.best_epoch
    assert resumed.test_metrics["accuracy"] == reference.test_metrics["accuracy"]
    assert not list(checkpoints.glob("*.pt"))


def test_resume_refuses_other_settings_and_missing_checkpoints(tiny_data, tmp_path):
    with pytest.raises(BinCounterError, match="no checkpoint"):
        train(TrainConfig(data=str(tiny_data), checkpoint_dir=str(tmp_path / "none"), resume="latest", **OPTIONS))
    from bin_counter.core import checkpoint

    (tmp_path / "c").mkdir()
    import torch

    from bin_counter.commands.train import data_digest, split_frames
    from bin_counter.config import as_params

    digest = data_digest(split_frames(str(tiny_data)))
    saved = {**as_params(TrainConfig(data=str(tiny_data), **OPTIONS)), "lr": 0.5, "data_digest": digest}
    torch.save({"config": saved, "run_id": "x"}, tmp_path / "c" / "x.pt")
    with pytest.raises(BinCounterError, match=r"other settings \(lr\)"):
        train(TrainConfig(data=str(tiny_data), checkpoint_dir=str(tmp_path / "c"), resume="x", **OPTIONS))
    # same options, other data: the checkpoint's digest no longer matches what --data holds
    torch.save({"config": {**saved, "lr": OPTIONS.get("lr", TrainConfig().lr), "data_digest": "0" * 32},
                "run_id": "x"}, tmp_path / "c" / "x.pt")
    with pytest.raises(BinCounterError, match="trained on other data"):
        train(TrainConfig(data=str(tiny_data), checkpoint_dir=str(tmp_path / "c"), resume="x", **OPTIONS))
    assert checkpoint.latest(tmp_path / "c").name == "x.pt"


def test_sigterm_during_feature_extraction_marks_the_run_killed_without_a_false_checkpoint_hint(tiny_data, tmp_path):
    """The logistic head's work is its feature pass: a spot reclaim there left the run RUNNING (the process died
    of the signal), and an interrupt named a checkpoint that was never written."""
    command = [sys.executable, "-m", "bin_counter", "train", "--data", str(tiny_data), "--checkpoint-dir",
               str(tmp_path / "ckpt"), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]
    process = subprocess.Popen(command, env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not mlflow.search_runs(search_all_experiments=True, output_format="list"):
        time.sleep(0.2)
    time.sleep(4)  # past building the model: into the feature pass (tens of seconds for 60 images at 320 px)
    assert not list((tmp_path / "cache").glob("*.pt")), "the feature pass ended before the signal"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "interrupted by SIGTERM before anything was checkpointed" in err and "--resume" not in err
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED" and not list((tmp_path / "ckpt").glob("*.pt"))
