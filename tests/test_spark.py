"""Batch scoring on Spark with stock MLflow (docs/spark.md): `mlflow.pyfunc.spark_udf` on real photos read with
Spark's binaryFile source gives the counts of the same model loaded in-process."""
import base64
import os
import shutil
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from bin_counter.commands.train import train
from bin_counter.config import TrainConfig
from bin_counter.core.abid import read_image
from bin_counter.core.dataset import SAMPLE_DIR
from bin_counter.core.pixels import decode_base64_image
from bin_counter.serving.clients import encode_files

PHOTOS = 128  # above an HTTP request's 64 rows, in one in-process call
RESULT_TYPE = "predicted_count long, confidence double"
PHOTO = SAMPLE_DIR / "bin-images" / sorted(p.name for p in (SAMPLE_DIR / "bin-images").glob("*.jpg"))[0]


def mime_lines(raw: bytes, end: str) -> str:
    """base64 as Spark's base64() writes it by default (spark.sql.chunkBase64String.enabled): 76-character lines."""
    text = base64.b64encode(raw).decode()
    return end.join(text[i:i + 76] for i in range(0, len(text), 76))


@pytest.mark.parametrize("end", ["\r\n", "\n"])
def test_base64_in_mime_lines_decodes_to_the_same_photo(end):
    """Before: Spark's F.base64("content") was answered "image field is not valid base64" for every photo."""
    text = mime_lines(PHOTO.read_bytes(), end)
    assert end in text
    assert np.array_equal(np.asarray(decode_base64_image(text)), np.asarray(read_image(PHOTO)))


def test_base64_with_other_stray_bytes_is_still_refused():
    text = base64.b64encode(PHOTO.read_bytes()).decode()
    with pytest.raises(ValueError, match="not valid base64"):
        decode_base64_image(text[:100] + "*" + text[100:])


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")  # the `spark` extra
    from pyspark.sql import SparkSession

    # the Python workers run this interpreter (not `python3` from PATH), so they import this MLflow and ONNX Runtime
    old, os.environ["PYSPARK_PYTHON"] = os.environ.get("PYSPARK_PYTHON"), sys.executable
    session = (SparkSession.builder.master("local[2]").appName("bin-counter-test")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2").getOrCreate())
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


@pytest.mark.slow
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
    local = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))  # one call, 128 rows
    local.index = [os.path.basename(p) for p in paths]

    assert len(scored) == PHOTOS and list(scored.index) == list(local.index)
    assert scored["predicted_count"].tolist() == local["predicted_count"].tolist()
    assert scored["confidence"].to_numpy() == pytest.approx(local["confidence"].to_numpy(), abs=1e-5)
    assert scored["predicted_count"].nunique() > 1  # a real model's answers, not one constant
