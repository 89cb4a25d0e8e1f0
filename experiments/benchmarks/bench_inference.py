"""Inference speed of the counting model, every engine on the same real ABID photos, one run, one machine.

    python experiments/benchmarks/bench_inference.py [--photos 1000] [--requests 40] [--skip-serve]

1. The served forward pass (default model: lite0 at 320 px, the 4 test-time views of each image) at batch 1 and
   32: eager PyTorch (NCHW), eager channels_last (the previous inference path), ONNX Runtime fp32 and int8.
2. Decode + resize of a photo, alone, in one thread and in the serving threads.
3. The logged model through stock `mlflow.pyfunc.load_model` on full-size photos sent as base64, each engine
   (BIN_COUNTER_ENGINE), counts compared.
4. `predict` (the command's function) on a folder of --photos real photos, decode included, each engine.
5. `mlflow models serve` over loopback, batch-1 latency, each engine.
The head is an untrained one (speed does not depend on its weights); counts are compared between engines.
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from io import StringIO
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from served import served  # noqa: E402
from torch import nn  # noqa: E402

from bin_counter.commands.predict import LocalModel, predict  # noqa: E402
from bin_counter.config import PredictConfig, TrainConfig  # noqa: E402
from bin_counter.core.abid import read_image as open_image  # noqa: E402
from bin_counter.core.data import eval_transform  # noqa: E402
from bin_counter.core.dataset import SAMPLE_DIR  # noqa: E402
from bin_counter.core.engine import OnnxEngine, TorchEngine, ViewAveraged, export_onnx, quantize_int8  # noqa: E402
from bin_counter.core.models import create_model  # noqa: E402
from bin_counter.serving.packaging import log_model  # noqa: E402

SHARED_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "abid-sample"
CPU = torch.device("cpu")


class PlainEager(nn.Module):
    """The counting model in NCHW, without the channels_last conversion CountingModel.features makes."""

    def __init__(self, model):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x):
        return self.head(self.backbone(x))


def latencies(engine, batch: torch.Tensor, calls: int) -> np.ndarray:
    engine(batch)  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        engine(batch)
        times.append(time.perf_counter() - start)
    return np.array(times)


@contextmanager
def engine_variable(name: str | None):
    old = os.environ.pop("BIN_COUNTER_ENGINE", None)
    if name:
        os.environ["BIN_COUNTER_ENGINE"] = name
    try:
        yield
    finally:
        os.environ.pop("BIN_COUNTER_ENGINE", None)
        if old is not None:
            os.environ["BIN_COUNTER_ENGINE"] = old


def forward_table(model, cfg: TrainConfig, photos: list[Path]) -> None:
    transform = eval_transform(cfg.backbone, cfg.image_size)
    batch32 = torch.stack([transform(open_image(p)) for p in photos[:32]])
    start = time.perf_counter()
    fp32 = export_onnx(ViewAveraged(model, cfg.tta), cfg.image_size)
    exported = time.perf_counter() - start
    calibration = torch.stack([transform(open_image(p)) for p in photos[-64:]])
    start = time.perf_counter()
    int8 = quantize_int8(fp32, list(calibration.split(16)))
    quantised = time.perf_counter() - start
    plain = PlainEager(model).to(memory_format=torch.contiguous_format)
    engines = {
        "eager PyTorch (NCHW)": TorchEngine(ViewAveraged(plain, cfg.tta), CPU),
        "eager channels_last (before)": TorchEngine(ViewAveraged(model.to(memory_format=torch.channels_last),
                                                                 cfg.tta), CPU),
        "ONNX Runtime fp32": OnnxEngine(fp32),
        "ONNX Runtime int8": OnnxEngine(int8),
    }
    print(f"\n## 1. Forward pass: {cfg.backbone} at {cfg.image_size} px, {4 if cfg.tta else 1} views per image "
          f"(export {exported:.1f} s, int8 quantisation {quantised:.1f} s)\n")
    print("| engine | batch 32 images/s | batch 32 p50 / p95 ms | batch 1 p50 / p95 ms | vs eager (b32) |")
    print("|---|---|---|---|---|")
    reference, outputs = None, {}
    for name, engine in engines.items():
        big = latencies(engine, batch32, 3)
        one = latencies(engine, batch32[:1], 15)
        rate = 32 / np.median(big)
        reference = reference or rate
        outputs[name] = engine(batch32)
        print(f"| {name} | {rate:.1f} | {np.median(big) * 1000:.0f} / {np.percentile(big, 95) * 1000:.0f} | "
              f"{np.median(one) * 1000:.0f} / {np.percentile(one, 95) * 1000:.0f} | {rate / reference:.2f}x |")
    base = outputs["eager PyTorch (NCHW)"]
    for name in ("ONNX Runtime fp32", "ONNX Runtime int8"):
        print(f"{name}: max |p - p_eager| {float((outputs[name] - base).abs().max()):.2e}")


def decode_table(cfg: TrainConfig, photos: list[Path]) -> None:
    transform = eval_transform(cfg.backbone, cfg.image_size)
    blobs = [p.read_bytes() for p in photos[:200]]
    start = time.perf_counter()
    images = [open_image(b) for b in blobs]
    decode = (time.perf_counter() - start) / len(blobs)
    start = time.perf_counter()
    for image in images:
        transform(image)
    resize = (time.perf_counter() - start) / len(blobs)
    threads = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda b: transform(open_image(b)), blobs))
        pooled = (time.perf_counter() - start) / len(blobs)
    size = np.mean([len(b) for b in blobs]) / 1024
    print(f"\n## 2. Decode and resize ({len(blobs)} photos, mean {size:.0f} KiB)\n")
    print(f"decode {decode * 1000:.1f} ms, resize+normalise {resize * 1000:.1f} ms per photo in one thread "
          f"({1 / (decode + resize):.0f} photos/s); {threads} threads: {1 / pooled:.0f} photos/s")


def pyfunc_table(model_dir: Path, photos: list[Path]) -> dict:
    frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in photos[:256]]})
    print(f"\n## 3. Stock mlflow.pyfunc.load_model, {len(frame)} full-size photos as base64 (64 per call)\n")
    print("| engine | load s | images/s end to end |")
    print("|---|---|---|")
    results = {}
    for name in ("torch", "onnx"):
        with engine_variable(name):
            start = time.perf_counter()
            loaded = mlflow.pyfunc.load_model(str(model_dir))
            load = time.perf_counter() - start
            start = time.perf_counter()
            parts = [loaded.predict(frame[k:k + 64]) for k in range(0, len(frame), 64)]
            rate = len(frame) / (time.perf_counter() - start)
        results[name] = pd.concat(parts, ignore_index=True)
        print(f"| {name} | {load:.1f} | {rate:.1f} |")
    same = (results["torch"]["predicted_count"] == results["onnx"]["predicted_count"]).mean()
    columns = [c for c in results["onnx"].columns if c.startswith("prob_")]
    gap = np.abs(results["torch"][columns].to_numpy() - results["onnx"][columns].to_numpy()).max()
    print(f"identical counts: {same:.3f}; max probability difference {gap:.1e}")
    return results


def predict_table(model_dir: Path, photos: list[Path], work: Path) -> None:
    folder = work / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    print(f"\n## 4. `predict` on a folder of {len(photos)} real photos (decode included, batch 16 as the CLI)\n")
    print("| engine | images/s | wall s |")
    print("|---|---|---|")
    counts = {}
    for name in ("torch", "onnx"):
        with engine_variable(name), redirect_stdout(StringIO()):
            counter = LocalModel(str(model_dir))
            start = time.perf_counter()
            config = PredictConfig(input=str(folder), output=str(work / f"{name}.csv"))
            counts[name] = predict(config, counter)["predicted_count"].to_numpy()
            wall = time.perf_counter() - start
        print(f"| {name} | {len(photos) / wall:.1f} | {wall:.0f} |")
    print(f"identical counts: {(counts['torch'] == counts['onnx']).mean():.3f}")


def serve_table(model_dir: Path, photos: list[Path], requests_per_engine: int) -> None:
    print(f"\n## 5. `mlflow models serve` over loopback, one photo per request, {requests_per_engine} requests\n")
    print("| engine | p50 ms | p95 ms |")
    print("|---|---|---|")
    bodies = [{"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()]]}}
              for p in photos[:requests_per_engine]]
    for name in ("torch", "onnx"):
        with served(str(model_dir), BIN_COUNTER_ENGINE=name) as url:
            session = requests.Session()
            session.post(url + "/invocations", json=bodies[0], timeout=120).raise_for_status()  # warm-up
            times = []
            for body in bodies:
                start = time.perf_counter()
                session.post(url + "/invocations", json=body, timeout=120).raise_for_status()
                times.append(time.perf_counter() - start)
        p50, p95 = np.percentile(times, [50, 95]) * 1000
        print(f"| {name} | {p50:.0f} | {p95:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    source = SHARED_SAMPLE if (SHARED_SAMPLE / "bin-images").is_dir() else SAMPLE_DIR
    photos = sorted((source / "bin-images").glob("*.jpg"))[:args.photos]
    cfg = TrainConfig()
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{len(photos)} photos from {source}")
    torch.manual_seed(0)
    model = create_model(cfg.backbone, 5).eval()
    torch.nn.init.normal_(model.head[-1].weight, std=0.05)
    forward_table(model, cfg, photos)
    decode_table(cfg, photos)
    work = Path(tempfile.mkdtemp())
    try:
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
        config = {"backbone": cfg.backbone, "classes": [1, 2, 3, 4, 5], "image_size": cfg.image_size, "tta": cfg.tta,
                  "decoding": cfg.decoding}
        with mlflow.start_run():
            info = log_model(model, config, [str(p) for p in photos[:2]])
        model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(work / "model")))
        pyfunc_table(model_dir, photos)
        predict_table(model_dir, photos, work)
        if not args.skip_serve:
            serve_table(model_dir, photos, args.requests)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
