"""The servable model: an MLflow pyfunc that takes raw images and returns counts.

Input: a DataFrame with an `image` column of base64-encoded JPEG/PNG bytes (and, where known, each photo's
`expected_quantity`). The model never opens files: a `path` column (read by earlier versions) is answered with a
400, so no client of `mlflow models serve` or a SageMaker endpoint can make the server probe its files or block a
worker on a FIFO. In-process callers read their files themselves (`clients.predict_files`). Output per image:
predicted_count, confidence, prob_<count> for every class, the count set, the record check, and `error` (empty
unless params={"on_error": "skip"} turned a bad image into a row instead of a 400).

Any number of rows: they are decoded and resized a batch at a time with Pillow and numpy, by threads one batch
ahead of the forward pass, so memory beyond the input frame stays flat. The forward pass is the model's ONNX graph
on ONNX Runtime; PyTorch is imported only when it runs the weights instead (`BIN_COUNTER_ENGINE=torch`, a GPU
model, a model logged before the graph).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from bin_counter import BinCounterError, one_line
from bin_counter.core.answers import answer_frame
from bin_counter.core.calibration import CountCalibration
from bin_counter.core.inference import ENGINE_VARIABLE, OnnxSession, onnx_runtime_missing, requested_engine
from bin_counter.core.pixels import EvalPixels, decode_base64_image
from bin_counter.serving.limits import max_image_bytes

log = logging.getLogger(__name__)
# Images per forward pass: 16 views (4 photos with test-time views, 16 without). ONNX Runtime's arena grows to the
# largest batch it has run: 32 photos x 4 views took 1.6 GB on the first request, 4 x 4 under 200 MB, at the same
# images/s on CPU (experiments/benchmarks/bench_batch_memory.py).
VIEWS_PER_FORWARD = 16
PATHS_REFUSED = "paths are not accepted; send base64 in `image`"
TORCH_STACK = ["torch", "torchvision", "efficientnet-pytorch", "efficientnet-lite-pytorch"]


def signature(classes: list[int], calibration: dict | None = None) -> ModelSignature:
    # `path` stays in the schema only so that a client still sending it hears why it is refused
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False),
                     ColSpec("double", "expected_quantity", required=False)])
    outputs = Schema([ColSpec("long", "predicted_count"), ColSpec("double", "confidence"),
                      *[ColSpec("double", f"prob_{c}") for c in classes], ColSpec("double", "uncertainty"),
                      ColSpec("string", "count_set"), ColSpec("double", "record_p"), ColSpec("string", "record_check"),
                      ColSpec("string", "error")])
    calibration = calibration or {"coverage": 0.9, "false_alarm": 0.05}
    params = ParamSchema([ParamSpec("on_error", "string", "raise"),
                          ParamSpec("coverage", "double", float(calibration["coverage"])),
                          ParamSpec("false_alarm", "double", float(calibration["false_alarm"]))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class BinCounterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        self.classes = self.config["classes"]
        self.pixels = eval_pixels(self.config)
        self.batch_size = max(1, VIEWS_PER_FORWARD // (4 if self.config.get("tta", False) else 1))
        self.engine = serving_engine(self.config, context.artifacts)
        # models logged before `decoding` stored only the decode's name
        self.decoding = self.config.get("decoding", {"how": self.config.get("decode", "argmax")})
        self.calibration = CountCalibration.from_dict(self.config.get("calibration"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Counts, count sets and, where a row carries `expected_quantity`, the check of that record."""
        params = params or {}
        on_error = params.get("on_error", "raise")
        images = image_column(model_input)
        probs = np.full((len(images), len(self.classes)), np.nan)
        errors = {}
        with contextlib.closing(prepared_batches(images, self.pixels, self.batch_size)) as batches:
            for rows, batch, failed in batches:
                if failed and on_error != "skip":
                    i = min(failed)
                    raise MlflowException(f"row {i}: {failed[i]}", INVALID_PARAMETER_VALUE)
                errors.update(failed)
                if rows:
                    probs[rows] = self.engine(batch)
        frame = answer_frame(probs, self.classes, self.decoding, self.calibration, record_column(model_input),
                             coverage=number_param(params, "coverage"), false_alarm=number_param(params, "false_alarm"))
        frame["error"] = [errors.get(i, "") for i in range(len(probs))]
        return frame


def eval_pixels(config: dict) -> EvalPixels:
    """Training's eval transform in numpy. Models logged before 0.3 do not store the backbone's normalisation:
    the backbone table (torch's side of the core) has it."""
    if "mean" not in config:
        from bin_counter.core.models import backbone_spec

        spec = backbone_spec(config["backbone"])
        return EvalPixels(config["image_size"], spec.mean, spec.std)
    return EvalPixels(config["image_size"], tuple(config["mean"]), tuple(config["std"]))


def serving_engine(config: dict, artifacts: dict):
    """numpy batch -> class probabilities: the ONNX graph, or the weights in PyTorch where torch is installed
    and is asked for (or a GPU is there, or the model has no graph)."""
    graph = artifacts.get("onnx")
    if not torch_runnable():
        return slim_engine(config, graph)
    return torch_side_engine(config, artifacts["weights"], graph)


def torch_runnable() -> bool:
    """torch is installed and the model's code holds torch's side of the core: a CPU model ships without it, and
    loads in an environment that has torch (a notebook's, Spark's, the project's) on the slim path."""
    try:
        return find_spec("torch") is not None and find_spec("bin_counter.core.engine") is not None
    except ImportError:  # an import hook that refuses it
        return False


def slim_engine(config: dict, graph: str | None) -> OnnxSession:
    wanted = requested_engine()
    if wanted == "torch" or not graph or not Path(graph).is_file():
        why = f"{ENGINE_VARIABLE}=torch" if wanted == "torch" else "this model has no ONNX graph and"
        install = " ".join(config.get("torch_requirements") or TORCH_STACK)
        raise BinCounterError(f"{why} needs PyTorch, which this environment lacks: pip install {install}")
    missing = onnx_runtime_missing()
    if missing:
        raise BinCounterError(f"{missing}: pip install onnxruntime")
    return OnnxSession(graph)


def torch_side_engine(config: dict, weights: str, graph: str | None):
    import torch

    from bin_counter.core.engine import probability_engine
    from bin_counter.core.models import create_model

    def weighted_model():
        model = create_model(config["backbone"], len(config["classes"]), pretrained=False)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return OnNumpy(probability_engine(weighted_model, config.get("tta", False), device, graph,
                                      int8=config.get("int8", False)))


class OnNumpy:
    """A torch-side engine (tensors in, tensors out) for the served model's numpy batches."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if isinstance(self.engine, OnnxSession):
            return self.engine.run(batch)
        import torch

        return self.engine(torch.from_numpy(batch)).numpy()


def record_column(model_input):
    """The recorded quantities a request carries (`expected_quantity`), or None."""
    if isinstance(model_input, pd.DataFrame) and "expected_quantity" in model_input.columns:
        return model_input["expected_quantity"]
    return None


def number_param(params: dict, name: str) -> float | None:
    """A coverage or false-alarm rate from the request; it must lie strictly between 0 and 1."""
    value = params.get(name)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise refuse(f"{name} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise refuse(f"{name} must be between 0 and 1 (exclusive), got {value}")
    return value


_decoders: tuple[int, ThreadPoolExecutor] | None = None
_decoders_lock = threading.Lock()


def decoders() -> ThreadPoolExecutor:
    """The process's decoding threads, shared by every request, so a server decodes at most this many images at
    once however many requests it answers (a pool per request multiplied them). Made on first use, and again in
    a forked worker, which inherits the pool but not its threads."""
    global _decoders
    with _decoders_lock:
        if _decoders is None or _decoders[0] != os.getpid():
            _decoders = (os.getpid(), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                         thread_name_prefix="bin-counter-decode"))
        return _decoders[1]


def prepared_batches(images: list, pixels, batch_size: int):
    """(rows, array, {row: reason}) per batch of `images`, decoded and resized by threads one batch ahead of
    the model (Pillow and ONNX Runtime release the GIL), so the model is not kept waiting and memory stays bounded
    by two batches, not by the rows of a request."""
    def prepare(text):
        try:
            return pixels(decode_image(text)), None
        except ValueError as exc:
            return None, str(exc)

    pool = decoders()

    def submit(part: list) -> list:
        return [pool.submit(prepare, text) for text in part]

    def texts(start: int, stop: int) -> list:
        # a batch's texts only: a pandas 3 string column made whole into Python strings is a second copy of the frame
        return list(images.iloc[start:stop]) if isinstance(images, pd.Series) else list(images[start:stop])

    current, ahead = [], submit(texts(0, batch_size))
    try:
        for start in range(0, len(images), batch_size):
            current = ahead  # the next batch decodes while this one runs
            ahead = submit(texts(start + batch_size, start + 2 * batch_size))
            results = [future.result() for future in current]
            rows = [start + i for i, (array, _) in enumerate(results) if array is not None]
            failed = {start + i: reason for i, (_, reason) in enumerate(results) if reason is not None}
            batch = np.stack([array for array, _ in results if array is not None]) if rows else None
            yield rows, batch, failed
    finally:  # also when the caller stops early (a bad row answered 400): its decodes not yet started are dropped
        for future in current + ahead:
            future.cancel()


def refuse(reason: str) -> MlflowException:
    return MlflowException(reason, INVALID_PARAMETER_VALUE)  # the scoring server answers 400 with the reason


def image_column(model_input) -> pd.Series:
    """The request's base64 images, after the checks that need no decoding."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise refuse("input must be a table with an `image` column of base64 images")
    if "path" in model_input.columns and model_input["path"].map(lambda p: isinstance(p, str) and p != "").any():
        raise refuse(PATHS_REFUSED)
    if "image" not in model_input.columns:
        raise refuse("input needs an `image` column of base64-encoded JPEG/PNG bytes")
    return model_input["image"]


def decode_image(text):
    """One row's image; its size is checked on the base64 text, before anything is decoded."""
    if isinstance(text, str) and len(text) // 4 * 3 > max_image_bytes():
        raise ValueError(f"image is about {len(text) // 4 * 3:,} bytes, over the limit of {max_image_bytes():,} "
                         "(BIN_COUNTER_MAX_IMAGE_BYTES)")
    return decode_base64_image(text)


def load_model(model_uri: str):
    """A logged model through stock MLflow, or one line saying why not."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # MlflowException, OSError... one line is what the user needs
        raise BinCounterError(f"cannot load model {model_uri}: {one_line(exc)}") from None
