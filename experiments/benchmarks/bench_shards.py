"""Data loading images/s: loose JPEG files vs WebDataset shards on local disk vs shards streamed from S3 (a local
moto server), same data, same transform, one run. No model: this measures the input pipeline alone.

    python experiments/benchmarks/bench_shards.py [--workers 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import boto3  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bin_counter.cloud.shards import ShardStream, shard_urls, stream_collate  # noqa: E402
from bin_counter.commands.prepare import build_data_dir, upload_prepared  # noqa: E402
from bin_counter.config import PrepareConfig  # noqa: E402
from bin_counter.core.data import ManifestImages, eval_transform, make_loader  # noqa: E402
from bin_counter.core.manifest import read_manifest  # noqa: E402
from conftest import start_moto_server  # noqa: E402


def rate(loader) -> float:
    start, seen = time.perf_counter(), 0
    for images, _, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    data = Path(tempfile.mkdtemp()) / "data"
    result = build_data_dir(PrepareConfig(out=str(data), split=(1, 0, 0), shard_size=100, workers=2))
    transform = eval_transform("efficientnet-lite0")
    frame = read_manifest(data)
    loose = make_loader(ManifestImages(frame, [1, 2, 3, 4, 5], transform), 32, shuffle=False,
                        num_workers=args.workers)
    local = DataLoader(ShardStream(shard_urls(str(data), "train"), [1, 2, 3, 4, 5], transform), batch_size=32,
                       num_workers=args.workers, collate_fn=stream_collate)
    server, _ = start_moto_server(set_env=True)
    boto3.client("s3").create_bucket(Bucket="bench")
    upload_prepared(result, "s3://bench/abid", workers=4)
    remote = DataLoader(ShardStream(shard_urls("s3://bench/abid", "train"), [1, 2, 3, 4, 5], transform),
                        batch_size=32, num_workers=args.workers, collate_fn=stream_collate)
    rate(loose)  # warm the page cache for a fair comparison
    rates = {"loose files": rate(loose), "local shards": rate(local), "S3 shards (moto)": rate(remote)}
    print(f"{len(frame)} images, 224 px transform, batch 32, {args.workers} DataLoader workers, {os.cpu_count()} cores")
    for name, value in rates.items():
        print(f"  {name:17s} {value:7.1f} images/s  ({value / rates['loose files']:.2f}x loose files)")
    server.stop()


if __name__ == "__main__":
    main()
