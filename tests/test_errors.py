"""One line per error for the user; the traceback only under -v."""
from __future__ import annotations

import os

import pytest

from bin_counter import one_line
from bin_counter.cli import main


def test_one_line_takes_the_first_non_empty_line_collapsed_and_bounded():
    assert one_line(ValueError("\n  bucket   not found \n  <Error><Code>NoSuchBucket</Code>...")) == "bucket not found"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("x" * 1000), limit=50) == "x" * 50


def test_cli_prints_one_line_and_the_traceback_only_when_verbose(tmp_path, capsys):
    argv = ["predict", "--model-uri", "runs:/abc/model", "--input", str(tmp_path), "--no-such-flag"]
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    # a model that does not exist: the user's error, one line
    argv = ["predict", "--model-uri", str(tmp_path / "no-model"), "--input", str(tmp_path)]
    with pytest.raises(SystemExit) as ended:
        main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("error: cannot load model") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["-v", *argv])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: cannot load")


def test_a_tracking_server_that_is_not_sagemakers_gives_no_plugin_warnings(tmp_path, monkeypatch, capsys, caplog):
    """With the sagemaker extra installed, its MLflow plugin warned 'list index out of range' on every request to
    any other tracking server (239 lines for one `compare`)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NoSuchModel(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such model"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoSuchModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        with pytest.raises(SystemExit) as ended:
            main(["predict", "--model-uri", "models:/bins@champion", "--input", str(tmp_path)])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.strip().splitlines()[-1].startswith("error: cannot load model")
    assert "list index out of range" not in err + caplog.text


def one_error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as ended:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert ended.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    return errors[0]


@pytest.mark.slow  # extracts features of a split
def test_a_split_with_no_readable_image_is_one_line_not_a_value_error(tmp_path, capsys):
    from bin_counter.commands.prepare import build_data_dir
    from bin_counter.config import PrepareConfig
    from bin_counter.core.manifest import read_manifest

    data = tmp_path / "data"
    build_data_dir(PrepareConfig(out=str(data), limit_per_class=2, split=(0.5, 0.5, 0), workers=2))
    for path in read_manifest(data, "train")["abs_path"]:
        os.unlink(path)  # a new file: the prepared image may be a hard link to the bundled sample's
        open(path, "wb").write(b"\xff\xd8 not a photo")
    err = one_error_line(capsys, ["train", "--data", str(data), "--image-size", "224", "--num-workers", "0",
                                  "--cache-dir", str(tmp_path / "cache"), "--no-tta"])
    assert "no readable image in the train split (5 listed" in err


@pytest.mark.parametrize("option", [["--folds", "1"], ["--repeats", "0"]])
def test_crossval_with_one_fold_or_no_repeat_is_one_line(tmp_path, capsys, option):
    err = one_error_line(capsys, ["crossval", *option])
    assert "--folds must be at least 2 and --repeats at least 1" in err


def test_manifest_count_outside_the_dataset_classes_is_one_line_not_a_key_error(tiny_data, tmp_path, capsys):
    import shutil

    import pandas as pd

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("images"))
    frame = pd.read_csv(data / "manifest.csv", dtype=str)
    frame.loc[0, "count"] = "7"
    frame.to_csv(data / "manifest.csv", index=False)
    for argv in (["train", "--data", str(data)], ["evaluate", "--model-uri", "runs:/x/model", "--data", str(data),
                                                  "--split", frame.loc[0, "split"]]):
        assert "has counts 7 outside the classes [1, 2, 3, 4, 5]" in one_error_line(capsys, argv)
