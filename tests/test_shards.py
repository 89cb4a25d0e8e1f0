"""WebDataset-style shards: written by prepare, streamed back from disk and from S3 (moto) for training."""
import tarfile

import mlflow
import pytest

from bin_counter.config import PrepareConfig, TrainConfig
from bin_counter.data import eval_transform
from bin_counter.manifest import read_manifest
from bin_counter.prepare import prepare, upload_prepared
from bin_counter.shards import ShardStream, samples, shard_urls
from bin_counter.train import train

pytestmark = pytest.mark.slow


@pytest.fixture
def sharded(tmp_path):
    out = tmp_path / "data"
    prepare(PrepareConfig(out=str(out), limit_per_class=8, split=(0.5, 0.25, 0.25), workers=2, shard_size=7))
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


def test_stream_shuffles_reproducibly_and_splits_across_workers(sharded):
    urls = shard_urls(str(sharded), "train")
    stream = ShardStream(urls, [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"), shuffle=True, seed=0, buffer=5)
    first = [int(label) for _, label, _ in stream]
    again = [int(label) for _, label, _ in stream]
    stream.set_epoch(1)
    other = [int(label) for _, label, _ in stream]
    assert first == again and sorted(first) == sorted(other) and len(first) == 20


def test_train_streams_shards_from_disk_and_from_s3(sharded, aws, tmp_path):
    local = train(TrainConfig(data=str(sharded), head="sgd", image_size=224, stream=True, epochs=2, batch_size=4, num_workers=0,
                              checkpoint_dir=None), save_model=False)
    run = mlflow.get_run(local.run_id)
    assert run.data.params["stream"] == "True" and run.data.metrics["test_n"] == 10

    aws.create_bucket(Bucket="mine")
    result = prepare(PrepareConfig(out=str(sharded), limit_per_class=8, split=(0.5, 0.25, 0.25), workers=2,
                                   shard_size=7))
    upload_prepared(result, "s3://mine/abid/v1", workers=2)
    keys = {o["Key"] for o in aws.list_objects_v2(Bucket="mine")["Contents"]}
    assert "abid/v1/shards/index.json" in keys and "abid/v1/shards/train-000002.tar" in keys
    remote = train(TrainConfig(data="s3://mine/abid/v1", head="sgd", image_size=224, stream=True, epochs=2, batch_size=4, num_workers=0,
                               checkpoint_dir=None), save_model=False)
    assert remote.history["train_loss"].round(5).tolist() == local.history["train_loss"].round(5).tolist()
