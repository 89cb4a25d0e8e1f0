"""`train --profile` of the default model (frozen features, solved head): the README's commands verbatim, the
feature pass's report with ONNX Runtime's operator table, its trace and the system metrics; the MLproject entry."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from bin_counter.cli import parse, train_config
from bin_counter.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def readme_profile_commands() -> list[str]:
    """Every `bin-counter ...` line of the profiling page (docs/profiling.md), each [--optional] flag with and
    without."""
    section = (ROOT / "docs" / "profiling.md").read_text()
    commands = []
    for line in re.findall(r"^(bin-counter [^#\n]+)", section, re.MULTILINE):
        optional = re.findall(r"\[([^\]]+)\]", line)
        plain = re.sub(r"\s*\[[^\]]+\]", "", line).strip()
        commands += [plain, *[f"{plain} {flag}" for flag in optional]]
    return commands


def test_the_readme_names_the_profiling_commands():
    assert readme_profile_commands() == ["bin-counter train --data data --profile",
                                         "bin-counter train --data data --profile --no-feature-cache"]


def test_mlflow_run_profile_profiles_the_default_recipe():
    from mlflow.projects import _project_spec

    command = _project_spec.load_project(str(ROOT)).get_entry_point("profile").compute_command({}, "/tmp")
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "bin_counter"]
    assert train_config(parse(argv[3:])) == TrainConfig(profile=True)


def test_profile_is_a_setting_of_the_default_head():
    """Before: `--profile profiles training epochs: add --head sgd` refused the README's command."""
    TrainConfig(profile=True).validate()


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_profile_commands())
def test_readme_profiling_command_logs_the_feature_pass_report(command, tiny_data, tmp_path):
    (tmp_path / "data").symlink_to(tiny_data)
    argv = [sys.executable, "-m", "bin_counter", *shlex.split(command)[1:], "--num-workers", "0"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = re.findall(r"run_id: (\w+)", done.stdout)[-1]
    run = mlflow.get_run(run_id)
    assert run.data.params["head"] == "logistic" and run.data.params["profile"] == "True"
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="profiler", dst_path=str(tmp_path)))
    assert {p.name for p in local.iterdir()} >= {"profiler_report.html", "profiler_summary.md", "top_operators.txt",
                                                 "trace.json", "onnxruntime_trace.json"}
    operators = (local / "top_operators.txt").read_text()
    assert operators.startswith("ONNX Runtime per-operator time") and "Conv" in operators
    html = (local / "profiler_report.html").read_text()
    for section in ("Summary", "Step time breakdown", "Utilisation and memory", "Profiler findings", "Top operators"):
        assert f"<h2>{section}</h2>" in html
    assert "decode + resize" in html and "feature pass" in html
    summary = (local / "profiler_summary.md").read_text()
    assert "solve (after the feature pass)" in summary
    metrics = run.data.metrics
    assert metrics["profile/images_per_s"] > 0 and metrics["profile/solve_seconds"] > 0
    assert 0.99 < metrics["profile/data_share"] + metrics["profile/forward_share"] < 1.01
    assert any(k.startswith("system/cpu_utilization_percentage") for k in metrics)
    assert '"traceEvents"' in (local / "trace.json").read_text()[:2000]
    assert "test/accuracy" in metrics  # the profiled run is still a whole training
