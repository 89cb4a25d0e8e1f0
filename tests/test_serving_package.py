"""The serving package as a logged model ships it: the pixels of training, only the serving code and the core it
imports in code/, requirements without torch for a CPU model, a model that loads and answers where torch cannot be
imported, and a model logged by 0.2 that still loads, serves and competes in `promote`."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from bin_counter.core.abid import read_image
from bin_counter.core.data import eval_transform
from bin_counter.core.models import create_model
from bin_counter.core.pixels import EvalPixels
from bin_counter.serving.packaging import TORCH_STACK, log_model, served_modules

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = sorted((ROOT / "bin_counter" / "sample" / "bin-images").glob("*.jpg"))
FIXTURE = ROOT / "tests" / "fixtures" / "model-0.2.0.tar.gz"
CLASSES = [1, 2, 3, 4, 5]
SIZE = 64


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("resnet18", len(CLASSES), pretrained=False).eval()


def logged(tmp_path: Path, device: str = "cpu", seed: int = 0, registered: str | None = None) -> tuple[Path, str]:
    """A freshly logged model (untrained ResNet18 at 64 px: real weights, graph, code and requirements), as a
    local directory and as its model URI."""
    config = {"backbone": "resnet18", "classes": CLASSES, "image_size": SIZE, "tta": False,
              "decoding": {"how": "argmax"}, "int8": False}
    with mlflow.start_run():
        info = log_model(small_model(seed), config, [str(p) for p in SAMPLE_IMAGES[:2]], registered, device=device)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / f"model-{device}")))
    return local, info.model_uri


def shipped_files(model_dir: Path) -> list[str]:
    code = model_dir / "code" / "bin_counter"
    return sorted(str(p.relative_to(code)) for p in code.rglob("*.py"))


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "resnet18"])
def test_served_pixels_are_training_eval_transform_pixels(backbone):
    from bin_counter.core.models import backbone_spec

    spec = backbone_spec(backbone)
    for path in SAMPLE_IMAGES[:6]:
        image = read_image(path)
        expected = eval_transform(backbone, 224)(image).numpy()
        served = EvalPixels(224, spec.mean, spec.std)(image)
        assert served.shape == expected.shape and served.dtype == np.float32
        assert np.abs(served - expected).max() < 1e-6, path.name


def test_served_probabilities_are_the_training_time_probabilities(tmp_path):
    model_dir, _ = logged(tmp_path)
    photos = SAMPLE_IMAGES[:8]
    answers = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"image": [b64(p) for p in photos]}))
    transform = eval_transform("resnet18", SIZE)
    with torch.no_grad():
        eager = torch.softmax(small_model()(torch.stack([transform(read_image(p)) for p in photos])), 1).numpy()
    served = answers[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(served, eager, atol=2e-5)
    assert answers["predicted_count"].tolist() == [CLASSES[i] for i in eager.argmax(1)]


def test_cpu_model_ships_only_the_serving_package_and_its_core_and_no_torch(tmp_path):
    model_dir, _ = logged(tmp_path)
    files = shipped_files(model_dir)
    assert files == sorted(served_modules("cpu"))
    assert not [f for f in files if f.startswith(("commands/", "cloud/")) or f in ("cli.py", "config.py",
                                                                                   "tracking.py", "plots.py")]
    assert "core/engine.py" not in files and "core/models.py" not in files
    requirements = (model_dir / "requirements.txt").read_text().split()
    names = {r.split("==")[0].lower() for r in requirements}
    assert names.isdisjoint(TORCH_STACK) and {"mlflow", "onnxruntime", "pillow", "numpy", "pandas"} <= names
    config = json.loads((model_dir / "artifacts" / "config.json").read_text())
    assert config["torch_requirements"][0].startswith("torch==") and len(config["mean"]) == 3


def test_gpu_model_ships_the_torch_stack_and_torch_side_of_the_core(tmp_path):
    model_dir, _ = logged(tmp_path, device="cuda")
    names = {r.split("==")[0].lower() for r in (model_dir / "requirements.txt").read_text().split()}
    assert set(TORCH_STACK) <= names and "onnxruntime" in names
    assert {"core/engine.py", "core/models.py", "core/data.py"} <= set(shipped_files(model_dir))
    with pytest.raises(Exception, match="serve device 'tpu'"):
        logged(tmp_path, device="tpu")


NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):  # as in an environment built from the model's requirements
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "efficientnet_pytorch", "efficientnet_lite_pytorch"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTorch())
"""


def run_fresh(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter outside the repository, so bin_counter comes from the model's code/ (MLflow puts it
    first on sys.path), as in a serving container."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, cwd="/", env={**environ, **(env or {})})


def test_slim_model_loads_and_answers_where_torch_cannot_be_imported(tmp_path):
    model_dir, _ = logged(tmp_path)
    photos = [str(p) for p in SAMPLE_IMAGES[:4]]
    expected = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"image": [b64(Path(p)) for p in photos]}))
    script = NO_TORCH + f"""
import base64, json, sys, mlflow, pandas as pd
model = mlflow.pyfunc.load_model({str(model_dir)!r})
frame = pd.DataFrame({{"image": [base64.b64encode(open(p, "rb").read()).decode() for p in {photos!r}]}})
answers = model.predict(frame)
import bin_counter
print(json.dumps({{"counts": answers["predicted_count"].tolist(), "where": bin_counter.__file__,
                  "loaded": sorted(m for m in sys.modules if m.startswith(("bin_counter", "torch")))}}))
"""
    done = run_fresh(script)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["counts"] == expected["predicted_count"].tolist()
    assert out["where"].startswith(str(model_dir / "code"))
    assert not [m for m in out["loaded"] if m.startswith(("torch", "bin_counter.commands", "bin_counter.cli"))]
    # where torch is installed (a notebook's or Spark's environment) the CPU model, which ships no torch side of
    # the core, still loads: on the graph
    with_torch = run_fresh(script.replace(NO_TORCH, ""))
    assert with_torch.returncode == 0, with_torch.stderr[-2000:]
    assert json.loads(with_torch.stdout.strip().splitlines()[-1])["counts"] == out["counts"]

    asked = run_fresh(NO_TORCH + f"import mlflow; mlflow.pyfunc.load_model({str(model_dir)!r})",
                      env={"BIN_COUNTER_ENGINE": "torch"})
    assert asked.returncode != 0
    assert "BIN_COUNTER_ENGINE=torch needs PyTorch, which this environment lacks: pip install torch==" in asked.stderr


@pytest.fixture
def model_0_2(tmp_path) -> Path:
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path / "model"


def test_model_logged_by_0_2_loads_and_serves_with_its_own_code_and_with_this_release(model_0_2):
    photos = [str(p) for p in SAMPLE_IMAGES[:3]]
    here = mlflow.pyfunc.load_model(str(model_0_2)).predict(pd.DataFrame({"image": [b64(Path(p)) for p in photos]}))
    assert len(here) == 3 and (here["error"] == "").all() and here["count_set"].str.len().gt(0).all()
    script = f"""
import base64, json, mlflow, pandas as pd
model = mlflow.pyfunc.load_model({str(model_0_2)!r})
frame = pd.DataFrame({{"image": [base64.b64encode(open(p, "rb").read()).decode() for p in {photos!r}]}})
import bin_counter
print(json.dumps({{"counts": model.predict(frame)["predicted_count"].tolist(), "where": bin_counter.__file__}}))
"""
    done = run_fresh(script)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["where"].startswith(str(model_0_2 / "code")) and out["counts"] == here["predicted_count"].tolist()


def test_model_logged_by_0_2_competes_in_promote_against_a_new_one(model_0_2, tiny_data, tmp_path):
    from bin_counter.commands.registry import promote
    from bin_counter.config import PromoteConfig

    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_0_2), "model")
    mlflow.register_model(f"runs:/{run.info.run_id}/model", "bins")
    first = promote(PromoteConfig(name="bins", data=str(tiny_data), version="1"))
    assert first["decision"] == "first champion"
    logged(tmp_path, registered="bins")
    second = promote(PromoteConfig(name="bins", data=str(tiny_data), version="2", min_gain=0.0))
    assert second["decision"] == ("better than champion" if second["candidate"] > second["champion"]
                                  else "not better than champion")
    tags = mlflow.MlflowClient().get_model_version("bins", "2").tags
    assert tags["compared_with_version"] == "1"
    assert float(tags["champion/f1_macro"]) == pytest.approx(second["champion"], abs=1e-4)
