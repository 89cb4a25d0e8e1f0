"""`predict` with odd inputs and failing models: another CSV than the manifest, requests that fail or do not
fit, an unreachable model, a batch size below one."""
from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bin_counter import BinCounterError
from bin_counter.cli import main
from conftest import SAMPLE_IMAGES, b64_file, free_port, small_prepared


def test_predict_input_other_csv_reads_that_csv_not_the_sibling_manifest(tmp_path):
    from bin_counter.commands.predict import collect

    out = small_prepared(tmp_path).out
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    manifest.iloc[:2].to_csv(out / "other.csv", index=False)
    images = collect(str(out / "other.csv"), tmp_path / "cache")
    assert list(images["image_id"]) == list(manifest["image_id"][:2])
    pd.DataFrame({"file": ["x.jpg"]}).to_csv(out / "not_a_manifest.csv", index=False)
    with pytest.raises(BinCounterError, match="not_a_manifest.csv lacks columns"):
        collect(str(out / "not_a_manifest.csv"), tmp_path / "cache")
    with pytest.raises(BinCounterError, match="input not found"):
        collect(str(out / "missing.csv"), tmp_path / "cache")


class FlakyModelServer:
    """A served model on 127.0.0.1 that answers like `mlflow models serve`, except that any request holding
    the `poison` image gets a 500; it records every request's body size, rows and status."""

    def __init__(self, poison: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[int, int, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rows = [row[0] for row in json.loads(body)["dataframe_split"]["data"]]
                if poison in rows:
                    answer, status = b'{"error_code": "INTERNAL_ERROR", "message": "worker crashed"}', 500
                else:
                    predictions = [{"predicted_count": 1 + len(r) % 5, "confidence": 0.9, "error": ""} for r in rows]
                    answer, status = json.dumps({"predictions": predictions}).encode(), 200
                server.requests.append((len(body), len(rows), status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()


def test_failed_requests_are_recorded_and_the_rest_counted_in_requests_that_fit(tmp_path, monkeypatch):
    from bin_counter.commands.predict import RestModel, predict
    from bin_counter.config import PredictConfig

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in SAMPLE_IMAGES[:9]:
        (folder / path.name).write_bytes(path.read_bytes())
    poison = folder / "00000-poison.jpg"
    poison.write_bytes(SAMPLE_IMAGES[9].read_bytes())
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    noise.save(folder / "huge.jpg", quality=100)  # ~200 kB: no request can carry it
    largest = max(len(b64_file(p)) for p in folder.glob("0*.jpg"))
    limit = 3 * (largest + 10) + 100  # room for three images per request
    monkeypatch.setenv("BIN_COUNTER_MAX_REQUEST_BYTES", str(limit))
    server = FlakyModelServer(poison=b64_file(poison))
    try:
        results = predict(PredictConfig(input=str(folder), output=str(tmp_path / "results.csv"), batch_size=16),
                          RestModel(server.url))
    finally:
        server.close()
    written = pd.read_csv(tmp_path / "results.csv", dtype={"image_id": str}).set_index("image_id")
    assert len(written) == 11 and len(results) == 11
    assert len(server.requests) >= 3 and all(size <= limit for size, _, _ in server.requests)
    assert "over the" in written.loc["huge", "error"] and "request limit" in written.loc["huge", "error"]
    failed = written[written["error"].fillna("").str.contains("answered 500")]
    (failed_rows,) = [rows for _, rows, status in server.requests if status == 500]
    assert "00000-poison" in failed.index and len(failed) == failed_rows  # the poison's request, no more
    counted = written[written["error"].isna()]
    assert len(counted) == 11 - 1 - len(failed) and counted["predicted_count"].between(1, 5).all()
    check = pd.read_csv(tmp_path / "results_manual_check.csv", dtype={"image_id": str})
    assert set(failed.index) | {"huge"} <= set(check["image_id"])
    assert (check.set_index("image_id").loc[list(failed.index), "check_reason"]
            == "not counted: the request failed").all()


def test_unreachable_model_still_writes_every_image_with_its_error(tmp_path, capsys):
    from bin_counter.commands.predict import RestModel, predict
    from bin_counter.config import PredictConfig

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in SAMPLE_IMAGES[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    nobody = f"http://user:hunter2@127.0.0.1:{free_port()}"  # a closed port
    with pytest.raises(BinCounterError, match="no image was counted") as error:
        predict(PredictConfig(input=str(folder), output=str(tmp_path / "results.csv")), RestModel(nobody))
    written = pd.read_csv(tmp_path / "results.csv")
    assert len(written) == 3 and written["error"].str.contains("cannot reach").all()
    assert "hunter2" not in str(error.value) + capsys.readouterr().out + written.to_csv()


@pytest.mark.parametrize("size", ["0", "-1"])
def test_predict_batch_size_must_be_positive(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as ended:
        main(["predict", "--model-uri", "x", "--input", str(tmp_path), "--batch-size", size])
    assert ended.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
