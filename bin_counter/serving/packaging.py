"""Logging a trained model: its weights, its ONNX graph, its config, the serving code it runs and the
requirements of the environment that serves it.

Two targets (`train --serve-device`):
  cpu   the ONNX graph on ONNX Runtime: requirements without torch (a fraction of the torch stack's disk and
        install time, experiments/benchmarks/bench_serving_env.py), code/ without torch's side of the core
  cuda  the weights in eager PyTorch with AMP on the GPU (core.engine's default there): the torch stack too
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd

from bin_counter import BinCounterError
from bin_counter.serving.clients import encode_image
from bin_counter.serving.model import TORCH_STACK

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).parents[1]
SERVE_DEVICES = ("cpu", "cuda")
# what the served model imports, module by module (tests/test_serving_package.py holds the list to the imports)
SERVED_CORE = ("abid", "answers", "calibration", "choices", "inference", "metrics", "pixels", "uris")
TORCH_CORE = ("data", "engine", "models")
SLIM_STACK = ["onnxruntime", "numpy", "pillow", "pandas", "scipy", "scikit-learn"]


def pinned(names: list[str]) -> list[str]:
    return [f"{name}=={version(name)}" for name in names]


def requirements(device: str = "cpu") -> list[str]:
    """Pinned to what trained the model, so a serving container runs the same MLflow and libraries."""
    check_device(device)
    names = SLIM_STACK + (TORCH_STACK if device == "cuda" else [])
    return [f"mlflow=={mlflow.__version__}", *pinned(names)]


def check_device(device: str) -> None:
    if device not in SERVE_DEVICES:
        raise BinCounterError(f"serve device {device!r}: choose one of {', '.join(SERVE_DEVICES)}")


def served_modules(device: str = "cpu") -> list[str]:
    """The package's files a model serving on `device` runs, relative to the package."""
    core = SERVED_CORE + (TORCH_CORE if device == "cuda" else ())
    serving = sorted(p.name for p in (PACKAGE_DIR / "serving").glob("*.py"))
    return ["__init__.py", "core/__init__.py", *[f"core/{name}.py" for name in core],
            *[f"serving/{name}" for name in serving]]


def copy_served_code(device: str, target: Path) -> Path:
    """bin_counter/ under `target` with only the serving package and the core it imports: a model carries no
    CLI, commands, cloud adapters or tools, and a slim one none of torch's side of the core."""
    root = target / "bin_counter"
    for relative in served_modules(device):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_DIR / relative, root / relative)
    return root


def serving_config(config: dict) -> dict:
    """The model's config.json: what training decided, plus what a torch-free server needs to know: the
    backbone's normalisation, and what to install to run the weights instead of the graph."""
    from bin_counter.core.models import backbone_spec

    spec = backbone_spec(config["backbone"])
    return {**config, "mean": list(spec.mean), "std": list(spec.std), "torch_requirements": pinned(TORCH_STACK)}


def inference_graph(model, config: dict, calibration_images: list[str]) -> bytes:
    """The ONNX graph that serves the model: fp32, or int8 calibrated on `calibration_images` if config asks."""
    import torch

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
              calibration_images: list[str] = (), model_type: str | None = None, tags: dict | None = None,
              device: str = "cpu"):
    """Log (and optionally register) the model under `model/` of the active run; returns ModelInfo."""
    import torch

    from bin_counter.serving.model import signature

    check_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(serving_config(config), indent=2))
        # the inference graph is exported once here, so no serving process needs an exporter or a compiler
        (tmp / "model.onnx").write_bytes(inference_graph(model, config, list(calibration_images)))
        code = copy_served_code(device, tmp / "code")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "serving" / "served.py"),
            artifacts={"weights": str(tmp / "weights.pt"), "config": str(tmp / "config.json"),
                       "onnx": str(tmp / "model.onnx")},
            code_paths=[str(code)],
            signature=signature(config["classes"], config.get("calibration")),
            input_example=input_example(example_images),
            pip_requirements=requirements(device),
            registered_model_name=registered_name,
            model_type=model_type,
            tags={**(tags or {}), "bin_counter.serve_device": device},
        )
