"""The servable model: an MLflow pyfunc that takes raw images and returns counts.

Input: a DataFrame with an `image` column of base64-encoded JPEG/PNG bytes (what a REST client sends) and/or a
`path` column of local files (batch use). Output per image: predicted_count, confidence, prob_<count> for every
class, and `error` (empty unless params={"on_error": "skip"} turned a bad image into a row instead of a 400).
"""
from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

PACKAGE_DIR = Path(__file__).parent
BATCH = 32


def output_columns(classes: list[int]) -> list[str]:
    return ["predicted_count", "confidence", *[f"prob_{c}" for c in classes], "error"]


def signature(classes: list[int]) -> ModelSignature:
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema([ColSpec("long", "predicted_count"), ColSpec("double", "confidence"),
                      *[ColSpec("double", f"prob_{c}") for c in classes], ColSpec("string", "error")])
    params = ParamSchema([ParamSpec("on_error", "string", "raise")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class BinCounterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from bin_counter.data import eval_transform
        from bin_counter.models import create_model

        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        self.classes = self.config["classes"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = create_model(self.config["backbone"], len(self.classes), pretrained=False)
        model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model = model.to(self.device).eval()
        self.transform = eval_transform(self.config["backbone"], self.config["image_size"])
        self.tta = self.config.get("tta", False)
        self.decode = self.config.get("decode", "argmax")

    def _load(self, row: pd.Series):
        from bin_counter.data import decode_base64_image, open_image

        image = row.get("image")
        if isinstance(image, str) and image:
            return decode_base64_image(image)
        path = row.get("path")
        if isinstance(path, str) and path:
            return open_image(path)
        if isinstance(image, str):
            raise ValueError("empty image field")
        raise ValueError("row has neither an `image` (base64) nor a `path`")

    @torch.no_grad()
    def _probabilities(self, batch: torch.Tensor) -> np.ndarray:
        from bin_counter.data import dihedral_views

        batch = batch.to(self.device)
        views = dihedral_views(batch) if self.tta else [batch]  # as in training's evaluation
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            probs = torch.stack([torch.softmax(self.model(v).float(), dim=1) for v in views]).mean(0)
        return probs.cpu().numpy()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        on_error = (params or {}).get("on_error", "raise")
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not {"image", "path"} & set(model_input.columns):
            raise MlflowException("input needs an `image` (base64) or `path` column", INVALID_PARAMETER_VALUE)
        tensors, errors = {}, {}
        for i, (_, row) in enumerate(model_input.iterrows()):
            try:
                tensors[i] = self.transform(self._load(row))
            except ValueError as exc:
                if on_error != "skip":
                    raise MlflowException(f"row {i}: {exc}", INVALID_PARAMETER_VALUE) from None
                errors[i] = str(exc)
        probs = np.full((len(model_input), len(self.classes)), np.nan)
        good = sorted(tensors)
        for start in range(0, len(good), BATCH):
            rows = good[start:start + BATCH]
            probs[rows] = self._probabilities(torch.stack([tensors[i] for i in rows]))
        from bin_counter.metrics import decode

        ok = ~np.isnan(probs[:, 0])
        counts = decode(np.nan_to_num(probs), self.classes, self.decode)
        chosen = np.nan_to_num(probs)[np.arange(len(probs)), np.searchsorted(self.classes, counts)]
        frame = pd.DataFrame({
            "predicted_count": np.where(ok, counts, -1).astype("int64"),
            "confidence": np.where(ok, chosen, np.nan),  # the probability of the count returned
        })
        for j, count in enumerate(self.classes):
            frame[f"prob_{count}"] = probs[:, j]
        frame["error"] = [errors.get(i, "") for i in range(len(model_input))]
        return frame


def encode_image(path: str | Path, max_side: int | None = None) -> str:
    """base64 of an image file; `max_side` shrinks it first (input examples stay small)."""
    if max_side is None:
        return base64.b64encode(Path(path).read_bytes()).decode()
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode()


def requirements() -> list[str]:
    """Pinned to what trained the model, so a serving container runs the same MLflow and torch."""
    from importlib.metadata import version

    names = ["torch", "torchvision", "pillow", "pandas", "numpy", "efficientnet-pytorch", "efficientnet-lite-pytorch"]
    return [f"mlflow=={mlflow.__version__}", *[f"{n}=={version(n)}" for n in names]]


def log_model(model, config: dict, example_images: list[str], registered_name: str | None = None):
    """Log (and optionally register) the model under `model/` of the active run; returns ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # The package travels with the model (minus the bundled images) so a serving container needs no install.
        code = tmp / "code" / "bin_counter"
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("sample", "__pycache__"))
        example = pd.DataFrame({"image": [encode_image(p, max_side=96) for p in example_images[:2]]})
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "serving_model.py"),
            artifacts={"weights": str(tmp / "weights.pt"), "config": str(tmp / "config.json")},
            code_paths=[str(code)],
            signature=signature(config["classes"]),
            input_example=example,
            pip_requirements=requirements(),
            registered_model_name=registered_name,
        )
