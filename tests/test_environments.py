"""The project's own environment as `mlflow run` builds it, from the MLproject's conda.yaml: conda reads it as
it is, `--env-manager uv` (and virtualenv) take its python and pip list."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.projects import _project_spec
from mlflow.utils.environment import _PythonEnv

from conftest import make_abid_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def conda_pip_list() -> list[str]:
    dependencies = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    (pip,) = [d["pip"] for d in dependencies if isinstance(d, dict)]
    return pip


def test_conda_yaml_installs_what_pyproject_depends_on():
    """Before: conda.yaml lacked onnx, onnxruntime, psycopg and flask-wtf, so `mlflow run` without
    `--env-manager local` built an environment in which training's ONNX Runtime forward pass could not import."""
    assert sorted(conda_pip_list()) == sorted(pyproject()["dependencies"])


def test_conda_yaml_names_no_path_relative_to_where_pip_runs():
    """Before: `-e .` was installed from the temporary directory MLflow's uv manager runs pip in."""
    assert [line for line in conda_pip_list() if line.startswith(("-e", ".", "/", "file:"))] == []


def test_mlflow_reads_the_python_and_pip_list_uv_installs():
    project = _project_spec.load_project(str(ROOT))
    assert project.env_type == "conda_env" and Path(project.env_config_path) == ROOT / "conda.yaml"
    env = _PythonEnv.from_conda_yaml(project.env_config_path)
    assert env.python == "3.11"  # not pinned to a patch release: uv takes any local 3.11 (or fetches one)
    assert env.build_dependencies == ["pip"] and env.dependencies == conda_pip_list()


def project_copy(directory: Path) -> Path:
    """The files a clone has (tracked, plus new ones not ignored): no .venv, mlruns or data of the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, directory / name)
    return directory


def fresh_process_env(tracking_uri: str, env_root: Path) -> dict[str, str]:
    """The caller's environment minus what would let the run import this checkout or this virtualenv's packages."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    # mlflow and uv from this virtualenv; MLflow builds the run's environment under env_root
    return {**env, "PATH": f"{BIN}:{env['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_ENV_ROOT": str(env_root), "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a cold uv cache downloads torch's CUDA stack (~3 GB of wheels) from the index
def test_mlflow_run_main_in_a_fresh_uv_environment(tmp_path, mlflow_store):
    """`mlflow run . -e main --env-manager uv` as a user runs it from a clone, with no environment beforehand: uv
    builds one from conda.yaml, and the main job prepares, trains, evaluates and registers in it."""
    project = project_copy(tmp_path / "project")
    source = make_abid_dir(tmp_path / "abid", per_class=10)
    env_root = tmp_path / "envs"
    argv = [str(BIN / "mlflow"), "run", str(project), "-e", "main", "--env-manager", "uv",
            "--experiment-name", "fresh-uv", "-P", f"source={source}", "-P", f"out={tmp_path / 'data'}",
            "-P", "num_workers=0", "-P", f"cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(argv, cwd=tmp_path, env=fresh_process_env(mlflow_store, env_root), capture_output=True,
                          text=True, timeout=3500)
    assert done.returncode == 0, done.stderr[-3000:]

    (built,) = [p for p in env_root.iterdir() if p.is_dir()]  # the one environment MLflow made for the run
    python = built / "bin" / "python"
    assert python.exists() and Path(python.resolve()).parent != BIN
    where = subprocess.run([str(python), "-c", "import onnxruntime, torch; print(torch.__file__)"],
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(built))
    runs = mlflow.search_runs(experiment_names=["fresh-uv"], filter_string="tags.mlflow.project.entryPoint = 'main'")
    assert list(runs["status"]) == ["FINISHED"] and list(runs["tags.mlflow.project.env"]) == ["uv"]
    assert 0 <= runs["metrics.test/accuracy"].iloc[0] <= 1
