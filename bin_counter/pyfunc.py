"""The servable model: an MLflow pyfunc that takes raw images and returns counts.

Input: a DataFrame with an `image` column of base64-encoded JPEG/PNG bytes. The model never opens files: a
`path` column (read by earlier versions) is answered with a 400, so no client of `mlflow models serve` or a
SageMaker endpoint can make the server probe its files or block a worker on a FIFO. In-process callers read
their files themselves (`predict_files`). Output per image: predicted_count, confidence, prob_<count> for every
class, and `error` (empty unless params={"on_error": "skip"} turned a bad image into a row instead of a 400).

Limits, read from the serving process's environment at every request:
  BIN_COUNTER_MAX_ROWS         rows per request (default 64)
  BIN_COUNTER_MAX_IMAGE_BYTES  bytes of one image after base64 decoding (default 6 MB, a SageMaker endpoint's payload)
More rows than that is a 400 before anything is decoded; a larger image is a bad row. Rows are decoded and
transformed BATCH at a time, by threads one batch ahead of the forward pass, so memory does not grow with the
number of rows.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from bin_counter import BinCounterError, one_line

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).parent
BATCH = 32
DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_IMAGE_BYTES = 6 * 1024 * 1024
PATHS_REFUSED = "paths are not accepted; send base64 in `image`"


def limit(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def max_rows() -> int:
    return limit("BIN_COUNTER_MAX_ROWS", DEFAULT_MAX_ROWS)


def max_image_bytes() -> int:
    return limit("BIN_COUNTER_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES)


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
        from bin_counter.core.calibration import CountCalibration
        from bin_counter.core.data import eval_transform
        from bin_counter.core.engine import probability_engine
        from bin_counter.core.models import create_model

        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        self.classes = self.config["classes"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = create_model(self.config["backbone"], len(self.classes), pretrained=False)
        model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.engine = probability_engine(model, self.config.get("tta", False), device, context.artifacts.get("onnx"),
                                         int8=self.config.get("int8", False))
        self.transform = eval_transform(self.config["backbone"], self.config["image_size"])
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
        with contextlib.closing(prepared_batches(images, self.transform)) as batches:
            for rows, batch, failed in batches:
                if failed and on_error != "skip":
                    i = min(failed)
                    raise MlflowException(f"row {i}: {failed[i]}", INVALID_PARAMETER_VALUE)
                errors.update(failed)
                if rows:
                    probs[rows] = self.engine(batch).numpy()
        return self._frame(probs, errors, record_column(model_input), params)

    def _frame(self, probs: np.ndarray, errors: dict[int, str], records, params: dict) -> pd.DataFrame:
        from bin_counter.core.answers import answer_frame

        frame = answer_frame(probs, self.classes, self.decoding, self.calibration, records,
                             coverage=number_param(params, "coverage"), false_alarm=number_param(params, "false_alarm"))
        frame["error"] = [errors.get(i, "") for i in range(len(probs))]
        return frame


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


def prepared_batches(images: list, transform, batch_size: int = BATCH):
    """(rows, tensor, {row: reason}) per batch of `images`, decoded and transformed by threads one batch ahead of
    the model (PIL and ONNX Runtime release the GIL), so the model is not kept waiting and memory stays bounded
    by two batches, not by the rows of a request."""
    def prepare(text):
        try:
            return transform(decode_image(text)), None
        except ValueError as exc:
            return None, str(exc)

    pool = decoders()

    def submit(part: list) -> list:
        return [pool.submit(prepare, text) for text in part]

    current, ahead = [], submit(images[:batch_size])
    try:
        for start in range(0, len(images), batch_size):
            current = ahead  # the next batch decodes while this one runs
            ahead = submit(images[start + batch_size:start + 2 * batch_size])
            results = [future.result() for future in current]
            rows = [start + i for i, (tensor, _) in enumerate(results) if tensor is not None]
            failed = {start + i: reason for i, (_, reason) in enumerate(results) if reason is not None}
            batch = torch.stack([tensor for tensor, _ in results if tensor is not None]) if rows else None
            yield rows, batch, failed
    finally:  # also when the caller stops early (a bad row answered 400): its decodes not yet started are dropped
        for future in current + ahead:
            future.cancel()


def refuse(reason: str) -> MlflowException:
    return MlflowException(reason, INVALID_PARAMETER_VALUE)  # the scoring server answers 400 with the reason


def image_column(model_input) -> list:
    """The request's base64 images, after the checks that need no decoding (columns, row count)."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise refuse("input must be a table with an `image` column of base64 images")
    if "path" in model_input.columns and model_input["path"].map(lambda p: isinstance(p, str) and p != "").any():
        raise refuse(PATHS_REFUSED)
    if "image" not in model_input.columns:
        raise refuse("input needs an `image` column of base64-encoded JPEG/PNG bytes")
    if len(model_input) > max_rows():
        raise refuse(f"{len(model_input)} rows in one request, over the limit of {max_rows()} "
                     "(BIN_COUNTER_MAX_ROWS); send smaller requests")
    return list(model_input["image"])


def decode_image(text):
    """One row's image; its size is checked on the base64 text, before anything is decoded."""
    from bin_counter.core.data import decode_base64_image

    if isinstance(text, str) and len(text) // 4 * 3 > max_image_bytes():
        raise ValueError(f"image is about {len(text) // 4 * 3:,} bytes, over the limit of {max_image_bytes():,} "
                         "(BIN_COUNTER_MAX_IMAGE_BYTES)")
    return decode_base64_image(text)


def read_image_file(path: str | Path) -> bytes:
    """The bytes of a regular image file, or ValueError: a FIFO or device would block, a huge file is no photo."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"not a regular file: {path}")
        if info.st_size > max_image_bytes():
            raise ValueError(f"{path} is {info.st_size:,} bytes, over the limit of {max_image_bytes():,} "
                             "(BIN_COUNTER_MAX_IMAGE_BYTES)")
        with open(path, "rb") as handle:
            return handle.read(max_image_bytes() + 1)
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def encode_files(paths: list[str]) -> tuple[list[str], dict[int, str]]:
    """base64 of each file, as a client sends them, and the reason for each file that could not be read."""
    images, errors = [], {}
    for i, path in enumerate(paths):
        try:
            images.append(base64.b64encode(read_image_file(path)).decode())
        except ValueError as exc:
            images.append("")
            errors[i] = str(exc)
    return images, errors


def load_model(model_uri: str):
    """A logged model through stock MLflow, or one line saying why not."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # MlflowException, OSError... one line is what the user needs
        raise BinCounterError(f"cannot load model {model_uri}: {one_line(exc)}") from None


def request_frame(images: list[str], records=None) -> pd.DataFrame:
    """The model's input: base64 images and, where known, each photo's recorded quantity."""
    frame = pd.DataFrame({"image": images})
    if records is not None:
        frame["expected_quantity"] = pd.to_numeric(pd.Series(list(records)), errors="coerce").astype(float)
    return frame


def predict_files(model, paths: list[str], records=None, params: dict | None = None) -> pd.DataFrame:
    """In-process batch use: the files are read here and sent as base64, as any client would, in requests within
    the row limit; unreadable files come back with `error` set, never a crash. `records` are the photos' recorded
    quantities (NaN where unknown), `params` the request's coverage / false_alarm."""
    images, read_errors = encode_files(paths)
    frame = request_frame(images, records)
    params = {**(params or {}), "on_error": "skip"}
    parts = [model.predict(frame.iloc[start:start + max_rows()].reset_index(drop=True), params=params)
             for start in range(0, len(images), max_rows())]
    if not parts:
        return pd.DataFrame(columns=["predicted_count", "confidence", "error"])
    result = pd.concat(parts, ignore_index=True)
    for i, reason in read_errors.items():  # the file's own reason, not "empty image field"
        result.loc[i, "error"] = reason
    return result


def encode_image(path: str | Path, max_side: int | None = None) -> str:
    """base64 of an image file; `max_side` shrinks it first (input examples stay small)."""
    if max_side is None:
        return base64.b64encode(Path(path).read_bytes()).decode()
    from bin_counter.core.abid import read_image

    image = read_image(path)  # the one decoder: JPEG/PNG only, EXIF orientation applied
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode()


def requirements() -> list[str]:
    """Pinned to what trained the model, so a serving container runs the same MLflow and torch."""
    from importlib.metadata import version

    names = ["torch", "torchvision", "pillow", "pandas", "numpy", "efficientnet-pytorch", "efficientnet-lite-pytorch",
             "onnxruntime"]
    return [f"mlflow=={mlflow.__version__}", *[f"{n}=={version(n)}" for n in names]]


def inference_graph(model, config: dict, calibration_images: list[str]) -> bytes:
    """The ONNX graph that serves the model: fp32, or int8 calibrated on `calibration_images` if config asks."""
    from bin_counter.core.abid import read_image
    from bin_counter.core.data import eval_transform
    from bin_counter.core.engine import ViewAveraged, export_onnx, quantize_int8

    graph = export_onnx(ViewAveraged(model, config.get("tta", False)), config["image_size"])
    if not config.get("int8"):
        return graph
    if not calibration_images:
        raise ValueError("an int8 graph needs training images to calibrate on (not available when streaming)")
    transform = eval_transform(config["backbone"], config["image_size"])
    images = []
    for path in calibration_images:
        try:
            images.append(transform(read_image(path)))
        except ValueError as exc:  # as in training: an unreadable image is skipped, not the model lost
            log.warning("int8 calibration skips %s: %s", path, exc)
    if not images:
        raise BinCounterError("no readable training image to calibrate the int8 graph on")
    return quantize_int8(graph, [torch.stack(images[k:k + 16]) for k in range(0, len(images), 16)])


def input_example(images: Iterable[str], count: int = 2) -> pd.DataFrame | None:
    """The first `count` readable images, shrunk. An image may be gone or broken since training skipped it, and
    the trained model must not be lost for want of an example: those are skipped, and with none readable the model
    is logged without one (its signature still says what it takes)."""
    encoded = []
    for path in images:
        try:
            encoded.append(encode_image(path, max_side=96))
        except (ValueError, OSError) as exc:
            log.warning("input example skips %s: %s", path, exc)
        if len(encoded) == count:
            break
    return pd.DataFrame({"image": encoded}) if encoded else None


def log_model(model, config: dict, example_images: Iterable[str], registered_name: str | None = None,
              calibration_images: list[str] = (), model_type: str | None = None, tags: dict | None = None):
    """Log (and optionally register) the model under `model/` of the active run; returns ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # the inference graph is exported once here, so no serving process needs an exporter or a compiler
        (tmp / "model.onnx").write_bytes(inference_graph(model, config, list(calibration_images)))
        # The package travels with the model (minus the bundled images) so a serving container needs no install.
        code = tmp / "code" / "bin_counter"
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("sample", "__pycache__"))
        example = input_example(example_images)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "serving_model.py"),
            artifacts={"weights": str(tmp / "weights.pt"), "config": str(tmp / "config.json"),
                       "onnx": str(tmp / "model.onnx")},
            code_paths=[str(code)],
            signature=signature(config["classes"], config.get("calibration")),
            input_example=example,
            pip_requirements=requirements(),
            registered_model_name=registered_name,
            model_type=model_type,
            tags=tags,
        )
