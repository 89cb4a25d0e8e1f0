"""One line per error for the user; the traceback only under -v."""
from __future__ import annotations

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
