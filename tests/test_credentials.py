"""Passwords never printed: a storage URL with one is refused, and neither `main`'s links nor a verbose
traceback shows the tracking password."""
from __future__ import annotations

import mlflow
import pytest

from bin_counter.cli import main
from conftest import PASSWORD, TRACKING_WITH_PASSWORD, free_port


@pytest.mark.parametrize("storage", [f"postgresql://optuna:{PASSWORD}@127.0.0.1:1/optuna",
                                     f"postgresql://optuna:{PASSWORD}/x#y@127.0.0.1:1/optuna",
                                     f"postgresql://optuna@127.0.0.1:1/optuna?password={PASSWORD}"])
def test_tune_refuses_a_storage_url_carrying_a_password(capsys, tmp_path, storage):
    from bin_counter.cli import main
    from bin_counter.commands.tune import SearchSpace, TuneConfig, study_params
    from bin_counter.config import TrainConfig

    params = study_params(TuneConfig(base=TrainConfig(), space=SearchSpace(), storage=storage))
    assert PASSWORD not in params["storage"]  # masked even where it is never logged
    with pytest.raises(SystemExit) as exit_info:  # before anything is logged: MLflow logs a -P storage=... itself
        main(["tune", "--storage", storage, "--data", str(tmp_path), "--n-trials", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "carries a password" in err
    assert "PGPASSFILE" in err and "PGPASSWORD" in err and PASSWORD not in err
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_main_prints_where_to_look_without_the_tracking_password(monkeypatch):
    from bin_counter.commands.pipeline import where_to_look

    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING_WITH_PASSWORD)
    line = where_to_look("1", "0123abcd", "bin-counter-sample")
    assert PASSWORD not in line and "https://alice:***@mlflow.example.com:5443/" in line


def test_verbose_traceback_and_server_errors_never_show_the_tracking_password(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cretpw@127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for verbose in ([], ["-v"]):
        with pytest.raises(SystemExit) as ended:
            main([*verbose, "predict", "--model-uri", "runs:/0123456789abcdef/model", "--input", str(tmp_path)])
        err = capsys.readouterr().err
        assert ended.value.code == 2 and "s3cretpw" not in err and err.strip().splitlines()[-1].startswith("error:")
        assert ("Traceback" in err) == bool(verbose)
