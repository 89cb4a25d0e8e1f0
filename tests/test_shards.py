"""WebDataset-style shards: written by prepare, streamed back from disk and from S3 (moto) for training."""
import json
import os
import subprocess
import sys
import tarfile
import zlib

import mlflow
import pytest
import torch
from torch.utils.data import DataLoader, get_worker_info

from bin_counter.cloud.shards import ShardStream, samples, shard_urls
from bin_counter.commands.prepare import build_data_dir, upload_prepared
from bin_counter.commands.train import train
from bin_counter.config import PrepareConfig, TrainConfig
from bin_counter.core.data import eval_transform, open_image
from bin_counter.core.manifest import read_manifest
from conftest import free_port


@pytest.fixture
def sharded(tmp_path):
    out = tmp_path / "data"
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=8, split=(0.5, 0.25, 0.25), workers=2, shard_size=7))
    return out


def test_prepare_writes_webdataset_shards(sharded):
    manifest = read_manifest(sharded)
    urls = shard_urls(str(sharded), "train")
    assert len(urls) == 3  # 20 training images, 7 per shard
    with tarfile.open(urls[0]) as archive:
        names = archive.getnames()
    assert names[:3] == [f"{names[0].split('.')[0]}.{ext}" for ext in ("jpg", "cls", "json")]
    streamed = [s for url in urls for s in samples(url)]
    train_rows = manifest[manifest["split"] == "train"].set_index("image_id")
    assert sorted(s["image_id"] for s in streamed) == sorted(train_rows.index)
    assert all(train_rows.loc[s["image_id"], "count"] == s["count"] for s in streamed)
    assert all(s["jpg"] == (sharded / train_rows.loc[s["image_id"], "path"]).read_bytes() for s in streamed[:3])


def test_stream_shuffles_reproducibly(sharded):
    urls = shard_urls(str(sharded), "train")
    stream = ShardStream(urls, [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"), shuffle=True, seed=0, buffer=5)
    first = [int(label) for _, label, _ in stream]
    again = [int(label) for _, label, _ in stream]
    stream.set_epoch(1)
    other = [int(label) for _, label, _ in stream]
    assert first == again and sorted(first) == sorted(other) and len(first) == 20
    assert first != other  # a new epoch, a new order


def fingerprint(image) -> torch.Tensor:
    """Stands in for the training transform: which DataLoader worker decoded which image."""
    info = get_worker_info()
    return torch.tensor([info.id if info else -1, zlib.crc32(image.tobytes())])


def shard_of_image(urls: list[str]) -> dict[int, str]:
    return {zlib.crc32(open_image(s["jpg"]).tobytes()): url for url in urls for s in samples(url)}


def assert_partition(parts: dict[tuple, list[int]], urls: list[str]) -> None:
    """Every training image once, and each part (rank, worker) reads whole shards that no other part reads."""
    owner = shard_of_image(urls)
    assert sorted(c for crcs in parts.values() for c in crcs) == sorted(owner)
    shards = {part: {owner[c] for c in crcs} for part, crcs in parts.items()}
    for part, mine in shards.items():
        assert all(mine.isdisjoint(theirs) for other, theirs in shards.items() if other != part), shards
        assert len(parts[part]) == sum(1 for c in owner if owner[c] in mine), (part, "read part of a shard")


@pytest.fixture
def five_shards(tmp_path):
    out = tmp_path / "five"
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=8, split=(0.5, 0.25, 0.25), workers=2, shard_size=4))
    return shard_urls(str(out), "train")


def test_dataloader_workers_each_read_their_own_shards(five_shards):
    stream = ShardStream(five_shards, [1, 2, 3, 4, 5], fingerprint, shuffle=True, seed=0, buffer=5)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    parts: dict[tuple, list[int]] = {}
    for item, _, _ in loader:
        worker, crc = item.tolist()
        parts.setdefault((0, worker), []).append(crc)
    assert set(parts) == {(0, 0), (0, 1)}  # two real worker processes, both given shards
    assert_partition(parts, five_shards)


RANK = """
import json, sys, zlib
import torch
from torch.utils.data import DataLoader, get_worker_info
from bin_counter.core import distributed
from bin_counter.cloud.shards import ShardStream


def fingerprint(image):
    return torch.tensor([get_worker_info().id, zlib.crc32(image.tobytes())])


ctx = distributed.setup()
stream = ShardStream(json.loads(sys.argv[1]), [1, 2, 3, 4, 5], fingerprint, shuffle=True, seed=0, buffer=5)
stream.set_epoch(3)
seen = [item.tolist() for item, _, _ in DataLoader(stream, batch_size=None, num_workers=2)]
print(json.dumps({"rank": ctx.rank, "world": ctx.world, "seen": seen}))
distributed.finish()
"""


@pytest.mark.slow  # two processes importing torch: ~15 s
def test_each_rank_and_worker_reads_its_own_shards(five_shards):
    """Two ranks in a real gloo process group (as torchrun starts them), each with two DataLoader workers."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, json.dumps(five_shards)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    answers = [process.communicate(timeout=300) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], [err[-2000:] for _, err in answers]
    parts: dict[tuple, list[int]] = {}
    for out, _ in answers:
        answer = json.loads(out.strip().splitlines()[-1])
        assert answer["world"] == 2
        for worker, crc in answer["seen"]:
            parts.setdefault((answer["rank"], worker), []).append(crc)
    assert set(parts) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # 5 shards over 4 readers: everyone gets one
    assert_partition(parts, five_shards)


@pytest.mark.slow
def test_train_streams_shards_from_disk_and_from_s3(sharded, aws, tmp_path):
    local = train(TrainConfig(data=str(sharded), head="sgd", image_size=224, stream=True, epochs=2, batch_size=4,
                              num_workers=0,
                              checkpoint_dir=None), save_model=False)
    run = mlflow.get_run(local.run_id)
    assert run.data.params["stream"] == "True" and run.data.metrics["test/n"] == 10

    aws.create_bucket(Bucket="mine")
    result = build_data_dir(PrepareConfig(out=str(sharded), limit_per_class=8, split=(0.5, 0.25, 0.25), workers=2,
                                         shard_size=7))
    upload_prepared(result, "s3://mine/abid/v1", workers=2)
    keys = {o["Key"] for o in aws.list_objects_v2(Bucket="mine")["Contents"]}
    assert "abid/v1/shards/index.json" in keys and "abid/v1/shards/train-000002.tar" in keys
    remote = train(TrainConfig(data="s3://mine/abid/v1", head="sgd", image_size=224, stream=True, epochs=2,
                               batch_size=4, num_workers=0,
                               checkpoint_dir=None), save_model=False)
    assert remote.history["train_loss"].round(5).tolist() == local.history["train_loss"].round(5).tolist()
