"""The served model over loopback (latency p50/p95 and images/s at batch 1 and 16, bounded request count) and
`predict` in batches vs one image at a time, in one run.

    python experiments/benchmarks/bench_serving.py [--model-uri URI] [--requests 40]
Without --model-uri a model is trained first on a slice of the bundled sample (1 epoch: speed, not accuracy).
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
from served import served  # noqa: E402

from bin_counter.commands.predict import images_in_manifest  # noqa: E402
from bin_counter.commands.prepare import build_data_dir  # noqa: E402
from bin_counter.commands.train import train  # noqa: E402
from bin_counter.config import PrepareConfig, TrainConfig  # noqa: E402
from bin_counter.core.manifest import read_manifest  # noqa: E402
from bin_counter.serving.clients import LocalModel, count_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-uri")
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp())
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    data = work / "data"
    build_data_dir(PrepareConfig(out=str(data), limit_per_class=16, workers=2))
    model_uri = args.model_uri
    if not model_uri:
        with redirect_stdout(StringIO()):
            model_uri = train(TrainConfig(data=str(data), epochs=1, feature_views=1, num_workers=0,
                                          cache_dir=str(work / "cache"))).model_uri
    paths = list(read_manifest(data)["abs_path"])
    images = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]

    with served(model_uri) as url:
        session = requests.Session()
        print(f"served {model_uri} on {url}, {os.cpu_count()} CPU cores, {args.requests} requests per batch size")
        for batch in (1, 16):
            latencies, errors = [], 0
            for i in range(args.requests):
                rows = [[images[(i * batch + j) % len(images)]] for j in range(batch)]
                start = time.perf_counter()
                response = session.post(url + "/invocations", timeout=120,
                                        json={"dataframe_split": {"columns": ["image"], "data": rows}})
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200
            p50, p95 = np.percentile(latencies, [50, 95]) * 1000
            print(f"batch {batch:2d}: p50 {p50:.0f} ms, p95 {p95:.0f} ms, "
                  f"{batch * len(latencies) / sum(latencies):.1f} images/s, errors {errors}")

    frame = images_in_manifest(data).head(64)
    model = LocalModel(model_uri)
    rates = {}
    for batch in (16, 1):
        start = time.perf_counter()
        count_images(model, list(frame["path"]), batch)
        rates[batch] = len(frame) / (time.perf_counter() - start)
    print(f"predict: batch 16 {rates[16]:.1f} images/s, one at a time {rates[1]:.1f} images/s, "
          f"ratio {rates[16] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
