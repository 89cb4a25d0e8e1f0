"""A freshly logged model served as a serving container builds it: `mlflow models predict --env-manager uv`
makes an environment from the model's own requirements (no torch for a CPU model) and answers real photos with
the counts of the same model in-process."""
import json
import subprocess

import mlflow
import pandas as pd
import pytest
from test_environments import BIN, fresh_process_env
from test_serving_package import SAMPLE_IMAGES, b64, logged

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)  # a cold uv cache downloads the slim stack (mlflow, onnxruntime, scipy...) first
def test_mlflow_models_predict_in_a_fresh_uv_environment_gives_the_in_process_counts(tmp_path, mlflow_store):
    model_dir, _ = logged(tmp_path)
    frame = pd.DataFrame({"image": [b64(p) for p in SAMPLE_IMAGES[:12]]})
    expected = mlflow.pyfunc.load_model(str(model_dir)).predict(frame)
    request, answers = tmp_path / "request.json", tmp_path / "answers.json"
    request.write_text(json.dumps({"dataframe_split": frame.to_dict(orient="split")}))
    done = subprocess.run([str(BIN / "mlflow"), "models", "predict", "-m", str(model_dir), "--env-manager", "uv",
                           "-i", str(request), "-t", "json", "-o", str(answers)],
                          cwd=tmp_path, env=fresh_process_env(mlflow_store, tmp_path / "envs"), capture_output=True,
                          text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-3000:]

    served = pd.DataFrame(json.loads(answers.read_text())["predictions"])
    assert served["predicted_count"].tolist() == expected["predicted_count"].tolist()
    assert served["confidence"].tolist() == pytest.approx(expected["confidence"].tolist(), abs=1e-5)
    # the environment lives in a temporary directory MLflow removes when done: uv's log says what went in
    installed = {line.split()[1].split("==")[0].lower() for line in done.stderr.splitlines()
                 if line.startswith(" + ")}
    assert {"mlflow", "onnxruntime", "pillow"} <= installed and installed.isdisjoint({"torch", "torchvision"})
