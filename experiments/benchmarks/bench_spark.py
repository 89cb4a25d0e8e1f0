"""Spark batch scoring (`mlflow.pyfunc.spark_udf`, env_manager="local", local[N]) against the in-process model
(`predict_files`, what `bin-counter predict` calls) on the same photos: photos/s of each, their ratio and whether
the counts agree, in one run (docs/spark.md).

    python experiments/benchmarks/bench_spark.py [--model-uri URI] [--photos DIR] [--limit 256] [--master local[2]]
Without --model-uri a default-recipe model is trained first on a slice of the bundled sample (speed, not accuracy).
"""
from __future__ import annotations

import argparse
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

from bin_counter.commands.prepare import build_data_dir  # noqa: E402
from bin_counter.commands.train import train  # noqa: E402
from bin_counter.config import PrepareConfig, TrainConfig  # noqa: E402
from bin_counter.core.dataset import SAMPLE_DIR  # noqa: E402
from bin_counter.serving.clients import predict_files  # noqa: E402


def trained_model(work: Path) -> str:
    data = work / "data"
    build_data_dir(PrepareConfig(out=str(data), limit_per_class=16, workers=2))
    with redirect_stdout(StringIO()):
        return train(TrainConfig(data=str(data), num_workers=0, cache_dir=str(work / "cache"))).model_uri


def spark_counts(spark, model_uri: str, paths: list[str]):
    from pyspark.sql import functions as F

    count = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="predicted_count long, confidence double",
                                    env_manager="local")
    files = spark.read.format("binaryFile").load(paths)
    answers = files.select("path", count(F.base64("content")).alias("answer")).select("path", "answer.*")
    return answers.toPandas()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-uri")
    parser.add_argument("--photos", default=str(SAMPLE_DIR / "bin-images"), help="a folder of JPEG photos")
    parser.add_argument("--limit", type=int, default=128, help="photos scored by each")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--rows-per-batch", type=int, default=64, help="spark.sql.execution.arrow.maxRecordsPerBatch")
    parser.add_argument("--onnx-threads", type=int, default=1,
                        help="ONNX Runtime threads per Spark Python worker (BIN_COUNTER_ONNX_THREADS; 0: all cores)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp())
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    model_uri = args.model_uri or trained_model(work)
    paths = [str(p) for p in sorted(Path(args.photos).glob("*.jpg"))[:args.limit]]
    print(f"{len(paths)} photos from {args.photos}, model {model_uri}, {os.cpu_count()} CPU cores")

    start = time.perf_counter()
    local = predict_files(mlflow.pyfunc.load_model(model_uri), paths)
    local_s = time.perf_counter() - start
    print(f"in-process (load_model + predict_files): {local_s:.1f} s, {len(paths) / local_s:.1f} photos/s")

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers' Python: this one, not python3 on PATH
    # the workers inherit it; one pool per worker over every core would make the N workers fight for them
    os.environ["BIN_COUNTER_ONNX_THREADS"] = str(args.onnx_threads)
    start = time.perf_counter()
    spark = (SparkSession.builder.master(args.master).config("spark.ui.enabled", "false")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.rows_per_batch)).getOrCreate())
    spark.range(1).collect()
    started_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        scored = spark_counts(spark, model_uri, paths)
        spark_s = time.perf_counter() - start
    finally:
        spark.stop()
    by_name = dict(zip(scored["path"].map(os.path.basename), scored["predicted_count"]))
    same = sum(by_name.get(os.path.basename(p)) == c for p, c in zip(paths, local["predicted_count"]))
    print(f"spark {args.master} (spark_udf + binaryFile, {args.rows_per_batch} rows per Arrow batch, "
          f"{args.onnx_threads} ONNX thread(s) per worker): "
          f"{spark_s:.1f} s, {len(paths) / spark_s:.1f} photos/s; session start {started_s:.1f} s not counted")
    print(f"spark / in-process throughput: {local_s / spark_s:.2f}x; counts identical for {same} of {len(paths)}")


if __name__ == "__main__":
    main()
