"""Batch scoring on Spark with stock MLflow (docs/spark.md): `mlflow.pyfunc.spark_udf` on real photos read with
Spark's binaryFile source gives the counts of the same model loaded in-process."""
import os
import shutil
import sys

import mlflow
import pandas as pd
import pytest

from bin_counter.commands.prepare import SAMPLE_DIR
from bin_counter.commands.train import train
from bin_counter.config import TrainConfig
from bin_counter.pyfunc import encode_files

pytestmark = pytest.mark.slow
PHOTOS = 128  # two of the model's 64-row requests, several Arrow batches on each of the 2 cores
RESULT_TYPE = "predicted_count long, confidence double"


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")  # the `spark` extra
    from pyspark.sql import SparkSession

    # the Python workers run this interpreter (not `python3` from PATH), so they import this MLflow and ONNX Runtime
    old, os.environ["PYSPARK_PYTHON"] = os.environ.get("PYSPARK_PYTHON"), sys.executable
    session = (SparkSession.builder.master("local[2]").appName("bin-counter-test")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "2")
               # rows per predict call: photos are large rows, and the model still refuses over 64 in one call
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "32")
               .getOrCreate())
    yield session
    session.stop()
    if old is None:
        os.environ.pop("PYSPARK_PYTHON")
    else:
        os.environ["PYSPARK_PYTHON"] = old


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory):
    """A real model trained on real photos, in a store of its own, and the photos to score."""
    root = tmp_path_factory.mktemp("spark")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    old, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        result = train(TrainConfig(data=str(tiny_data), head="sgd", image_size=224, epochs=2, batch_size=8,
                                   feature_views=1, tta=False, num_workers=0, cache_dir=str(root / "cache")))
    finally:
        os.chdir(old)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    photos = root / "photos"
    photos.mkdir()
    for path in sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))[:PHOTOS]:
        shutil.copy(path, photos)
    return uri, result.model_uri, photos


def test_spark_udf_counts_equal_the_in_process_model(spark, served, monkeypatch):
    from pyspark.sql import functions as F

    store, model_uri, photos = served
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    count = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=RESULT_TYPE, env_manager="local")
    files = spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg").load(str(photos))
    scored = (files.select(F.regexp_extract("path", r"([^/]+)$", 1).alias("name"),
                           count(F.base64("content").alias("image")).alias("answer"))
              .select("name", "answer.predicted_count", "answer.confidence")
              .toPandas().set_index("name").sort_index())

    paths = sorted(str(p) for p in photos.glob("*.jpg"))
    images, unreadable = encode_files(paths)
    assert unreadable == {}
    # one call with every photo, as a notebook makes it; the model's row limit (64, an HTTP request's bound) is
    # raised here only until the model stops enforcing it
    monkeypatch.setenv("BIN_COUNTER_MAX_ROWS", str(len(images)))
    local = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))
    local.index = [os.path.basename(p) for p in paths]

    assert len(scored) == PHOTOS and list(scored.index) == list(local.index)
    assert scored["predicted_count"].tolist() == local["predicted_count"].tolist()
    assert scored["confidence"].to_numpy() == pytest.approx(local["confidence"].to_numpy(), abs=1e-5)
    assert scored["predicted_count"].nunique() > 1  # a real model's answers, not one constant
