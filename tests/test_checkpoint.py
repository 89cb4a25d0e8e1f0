"""Checkpoints never run code, load weights only, restore every random generator, and resume only their own run."""
from __future__ import annotations

import random

import mlflow
import numpy as np
import pytest
import torch

from bin_counter import BinCounterError
from bin_counter.core import checkpoint
from conftest import WritesMarker


def tiny_training_state(seed: int = 0):
    """A real net, optimiser, scheduler, scaler and seeded loaders, as fit() has them."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = torch.utils.data.TensorDataset(torch.arange(20.0))
    loaders = [torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                           generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
    net(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return net, optimizer, scheduler, scaler, loaders


def progress_like_fit(net) -> dict:
    """fit()'s bookkeeping, numpy scalars included (sklearn metrics are numpy floats)."""
    row = {"epoch": 1, "val_loss": np.float64(0.9), "val_f1": np.float32(0.4), "train_loss": 1.1}
    return {"best_loss": np.float64(0.9), "best_state": net.state_dict(), "best_epoch": 1, "best_val": row,
            "rows": [row]}


def draws(loaders) -> list:
    return [torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(2).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1),
            [[batch[0].tolist() for batch in loader] for loader in loaders]]


def test_pickled_os_system_in_checkpoint_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "abc123.pt"
    torch.save({"run_id": "abc123", "config": {}, "epoch": 1, "payload": WritesMarker(marker)}, path)
    with pytest.raises(BinCounterError) as error:
        checkpoint.load(path)
    assert not marker.exists(), "the checkpoint's pickled os.system ran"
    assert "\n" not in str(error.value) and "refused" in str(error.value)
    assert path.exists(), "the file is left for the user to inspect"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a dict"])
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, damage):
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    path = tmp_path / "run1.pt"
    checkpoint.save(path, 1, net, optimizer, scheduler, scaler, progress_like_fit(net), loaders, "run1", {})
    whole = path.read_bytes()
    path.write_bytes({"truncated": whole[: len(whole) // 2], "garbage": b"\x80\x04 not a checkpoint" * 50,
                      "empty": b""}.get(damage, b""))
    if damage == "not a dict":
        torch.save([1, 2, 3], path)
    with pytest.raises(BinCounterError) as error:
        checkpoint.load(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert path.exists()


def test_checkpoint_loads_weights_only_and_restores_every_random_generator(tmp_path):
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    random.seed(7)
    np.random.seed(7)
    np.random.randn()  # numpy now holds a cached gaussian: part of its state
    random.gauss(0, 1)
    path = tmp_path / "run1.pt"
    checkpoint.save(path, 2, net, optimizer, scheduler, scaler, progress_like_fit(net), loaders, "run1",
                    {"lr": 0.001})
    expected = draws(loaders)

    torch.load(path, weights_only=True)  # tensors and plain types only: nothing in it can run code
    state = checkpoint.load(path)
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    net2, optimizer2, scheduler2, scaler2, loaders2 = tiny_training_state(seed=5)
    progress = checkpoint.restore(state, net2, optimizer2, scheduler2, scaler2, loaders2)
    assert draws(loaders2) == expected
    assert progress["best_epoch"] == 1 and progress["best_loss"] == pytest.approx(0.9)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert state["epoch"] == 2 and state["config"] == {"lr": 0.001}


def test_checkpoint_renamed_to_another_run_is_refused(tmp_path):
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    checkpoint.save(tmp_path / "victim.pt", 1, net, optimizer, scheduler, scaler, progress_like_fit(net), loaders,
                    "intruder", {})
    with pytest.raises(BinCounterError, match="belongs to run intruder"):
        checkpoint.load(tmp_path / "victim.pt")


def test_resume_of_a_run_the_tracking_store_lacks_is_one_line(tiny_data, tmp_path):
    """A restarted job whose store lacks the checkpoint's run (a local store left behind) must not crash mid-way."""
    from bin_counter.commands.train import data_digest, split_frames, train
    from bin_counter.config import TrainConfig, as_params

    options = dict(data=str(tiny_data), head="sgd", image_size=224, epochs=2, batch_size=8, feature_cache=False,
                   num_workers=0, checkpoint_dir=str(tmp_path / "ckpt"))
    net, optimizer, scheduler, scaler, loaders = tiny_training_state()
    config = {**as_params(TrainConfig(**options)), "data_digest": data_digest(split_frames(str(tiny_data)))}
    checkpoint.save(checkpoint.path_for(tmp_path / "ckpt", "0123456789abcdef"), 1, net, optimizer, scheduler,
                    scaler, progress_like_fit(net), loaders, "0123456789abcdef", config)
    with pytest.raises(BinCounterError, match="tracking store .* has no run 0123456789abcdef") as error:
        train(TrainConfig(**options, resume="latest"))
    assert "\n" not in str(error.value)


def test_resume_accepts_a_checkpoint_written_before_a_setting_existed(tiny_data, tmp_path):
    """A checkpoint's config without `int8` (added later) was refused as 'written with other settings (int8)'."""
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


def test_a_signal_arriving_while_an_image_is_read_interrupts_training_instead_of_skipping_the_image(tmp_path):
    """A SIGTERM that landed inside read_image was caught as "image does not decode": the image was skipped and
    the interrupted run trained on to the end (seen once in the suite's resume test)."""
    import signal

    from bin_counter.core.abid import read_image
    from bin_counter.core.checkpoint import TrainingInterrupted, interruptible

    class SignalledOnOpen:  # a path whose opening is where the signal lands
        def __fspath__(self):
            signal.raise_signal(signal.SIGTERM)
            return str(tmp_path / "never-reached.jpg")

    with pytest.raises(TrainingInterrupted, match="SIGTERM"), interruptible():
        read_image(SignalledOnOpen())
