"""A served model's own environment, as `mlflow models serve --env-manager uv` (or a serving container) builds it
from the model's requirements: time from nothing to the first answer and the environment's size on disk, for a
CPU model (`requirements("cpu")`: ONNX Runtime, no torch) against a GPU one (`requirements("cuda")`: the torch
stack), each with a cold package cache (a fresh UV_CACHE_DIR) and a fresh environment root, in one run.

    python experiments/benchmarks/bench_serving_env.py [--photos 8]
Both models are the default backbone, untrained (the weights do not change what gets installed); the package
index must be reachable. The caches and environments are deleted at the end.
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from served import served  # noqa: E402

from bin_counter.core.dataset import SAMPLE_DIR  # noqa: E402
from bin_counter.core.models import create_model  # noqa: E402
from bin_counter.serving.packaging import log_model  # noqa: E402

CONFIG = {"backbone": "efficientnet-lite0", "classes": [1, 2, 3, 4, 5], "image_size": 320, "tta": True,
          "decoding": {"how": "argmax"}, "int8": False}


def logged_model(device: str, work: Path, photos: list[Path]) -> Path:
    torch.manual_seed(0)  # the same weights in both, so both answer the same counts
    with mlflow.start_run():
        info = log_model(create_model(CONFIG["backbone"], len(CONFIG["classes"]), pretrained=False).eval(), CONFIG,
                         [str(p) for p in photos[:2]], device=device)
    return Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(work / f"model-{device}")))


def disk_mb(*paths: Path) -> float:
    """Bytes on disk, each hard-linked file once (uv links an environment's files to its cache)."""
    out = subprocess.run(["du", "-skc", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[-1].split()[0]) / 1024


def first_answer(model_dir: Path, work: Path, body: dict) -> dict:
    cache, envs = work / "uv-cache", work / "envs"
    start = time.perf_counter()
    with served(str(model_dir), env_manager="uv", wait_s=1800, UV_CACHE_DIR=str(cache),
                MLFLOW_ENV_ROOT=str(envs)) as url:
        response = requests.post(url + "/invocations", json=body, timeout=600)
        seconds = time.perf_counter() - start
        response.raise_for_status()
        counts = [row["predicted_count"] for row in response.json()["predictions"]]
    names = {line.split("==")[0] for line in (model_dir / "requirements.txt").read_text().split()}
    return {"seconds": seconds, "env_mb": disk_mb(envs), "cache_mb": disk_mb(cache), "both_mb": disk_mb(envs, cache),
            "torch": "torch" in names, "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=8, help="real photos in the first request")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.pop("PYTHONPATH", None)  # the served environment must not import this checkout
    work = Path(tempfile.mkdtemp(prefix="bench-serving-env-"))
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    photos = sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))[:args.photos]
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(p.read_bytes()).decode()] for p in photos]}}
    print(f"{os.cpu_count()} CPU cores; mlflow models serve --env-manager uv, cold UV_CACHE_DIR each; "
          f"first request {len(photos)} photos")
    results = {}
    try:
        for device in ("cpu", "cuda"):
            model_dir = logged_model(device, work / device, photos)
            results[device] = first_answer(model_dir, work / device, body)
            r = results[device]
            print(f"{device:4s} (torch in requirements: {r['torch']}): first answer {r['seconds']:.0f} s, "
                  f"environment {r['env_mb']:,.0f} MB, uv cache {r['cache_mb']:,.0f} MB, "
                  f"both {r['both_mb']:,.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    slim, full = results["cpu"], results["cuda"]
    print(f"slim / torch: time to first answer {slim['seconds'] / full['seconds']:.2f}, environment on disk "
          f"{slim['env_mb'] / full['env_mb']:.2f}, with its cache {slim['both_mb'] / full['both_mb']:.2f}; "
          f"same counts: {slim['counts'] == full['counts']}")


if __name__ == "__main__":
    main()
