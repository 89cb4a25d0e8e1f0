"""Download throughput of `prepare` from a local moto S3 server: 1 worker vs N workers, one run.

    python experiments/benchmarks/bench_download.py [--workers 8] [--latency-ms 30]

moto answers on loopback in well under a millisecond, so there the download is CPU-bound and extra workers
only contend for 2 cores. Real S3 takes tens of milliseconds to the first byte; the second measurement puts
that latency back with a delaying proxy (the one the tests use) in front of moto.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import boto3  # noqa: E402

from bin_counter.commands.prepare import build_data_dir  # noqa: E402
from bin_counter.config import PrepareConfig  # noqa: E402
from bin_counter.core.dataset import SAMPLE_DIR  # noqa: E402
from conftest import SlowProxy, start_moto_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    server, _ = start_moto_server(set_env=True)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    ids = [p.stem for p in sorted((SAMPLE_DIR / "metadata").glob("*.json"))]
    for image_id in ids:
        s3.put_object(Bucket="bench", Key=f"bin-images/{image_id}.jpg",
                      Body=(SAMPLE_DIR / "bin-images" / f"{image_id}.jpg").read_bytes())
        s3.put_object(Bucket="bench", Key=f"metadata/{image_id}.json",
                      Body=(SAMPLE_DIR / "metadata" / f"{image_id}.json").read_bytes())
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    proxy = SlowProxy(endpoint, delay=args.latency_ms / 1000)
    for label, url in (("loopback, no latency", endpoint), (f"{args.latency_ms:.0f} ms per GET", proxy.url)):
        os.environ["AWS_ENDPOINT_URL"] = url
        rates = {}
        for workers in (1, args.workers):
            out = Path(tempfile.mkdtemp())
            start = time.perf_counter()
            result = build_data_dir(PrepareConfig(source="s3://bench", out=str(out), workers=workers))
            seconds = time.perf_counter() - start
            assert result.downloaded == 2 * len(ids)
            rates[workers] = len(ids) / seconds
            print(f"[{label}] workers={workers:2d}: {len(ids)} pairs in {seconds:.2f} s = "
                  f"{rates[workers]:.1f} images/s")
            shutil.rmtree(out)
        print(f"[{label}] speed-up {args.workers} workers vs 1: {rates[args.workers] / rates[1]:.2f}x")
    print(f"({os.cpu_count()} cores; prepare's time includes listing, validation and copying)")
    proxy.close()
    server.stop()


if __name__ == "__main__":
    main()
