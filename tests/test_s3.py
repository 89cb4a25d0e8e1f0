"""prepare and upload against a real moto S3 server on 127.0.0.1, with the real boto3 client."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from bin_counter import BinCounterError
from bin_counter.commands.prepare import build_data_dir, upload_prepared
from bin_counter.config import PrepareConfig
from bin_counter.core.dataset import SAMPLE_DIR
from conftest import SlowProxy, sample_ids

BUCKET = "abid-test"


def fill_bucket(s3, per_class: int, bad: bool = True) -> dict[str, int]:
    """ABID's layout in the bucket: real sample images plus the bad pairs a real crawl meets."""
    s3.create_bucket(Bucket=BUCKET)
    counts = {}
    for count, ids in sample_ids(per_class).items():
        for image_id in ids:
            s3.put_object(Bucket=BUCKET, Key=f"bin-images/{image_id}.jpg",
                          Body=(SAMPLE_DIR / "bin-images" / f"{image_id}.jpg").read_bytes())
            s3.put_object(Bucket=BUCKET, Key=f"metadata/{image_id}.json",
                          Body=(SAMPLE_DIR / "metadata" / f"{image_id}.json").read_bytes())
            counts[image_id] = count
    if bad:
        good = (SAMPLE_DIR / "bin-images" / f"{next(iter(counts))}.jpg").read_bytes()
        pairs = {
            "90001": (b"\xff\xd8\xff\xe0corrupt" * 50, {"EXPECTED_QUANTITY": 2}),
            "90002": (good[: len(good) // 2], {"EXPECTED_QUANTITY": 2}),
            "90003": (good, {"BIN_FCSKU_DATA": {}}),
            "90004": (good, {"EXPECTED_QUANTITY": -1}),
            "90005": (good, {"EXPECTED_QUANTITY": 2.5}),
        }
        for image_id, (image, meta) in pairs.items():
            s3.put_object(Bucket=BUCKET, Key=f"bin-images/{image_id}.jpg", Body=image)
            s3.put_object(Bucket=BUCKET, Key=f"metadata/{image_id}.json", Body=json.dumps(meta))
    return counts


def test_prepare_from_s3_keeps_good_pairs_and_lists_bad_ones(aws, tmp_path):
    counts = fill_bucket(aws, per_class=3)
    result = build_data_dir(PrepareConfig(source=f"s3://{BUCKET}", out=str(tmp_path / "d"), workers=4))
    assert dict(zip(result.manifest["image_id"], result.manifest["count"])) == counts
    reasons = dict(pd.read_csv(tmp_path / "d" / "rejected.csv", dtype=str).values)
    assert set(reasons) == {"90001", "90002", "90003", "90004", "90005"}
    assert "does not decode" in reasons["90001"] and "does not decode" in reasons["90002"]
    assert "EXPECTED_QUANTITY" in reasons["90003"]
    assert "negative" in reasons["90004"] and "not an integer" in reasons["90005"]
    assert result.downloaded == 2 * (len(counts) + 5)


def test_file_list_selects_pairs_and_missing_objects_are_rejected(aws, tmp_path):
    counts = fill_bucket(aws, per_class=2, bad=False)
    chosen = sorted(counts)[:4]
    (tmp_path / "fl.json").write_text(json.dumps({"1": [f"metadata/{i}.json" for i in chosen + ["77777"]]}))
    result = build_data_dir(PrepareConfig(source=f"s3://{BUCKET}", out=str(tmp_path / "d"),
                                         file_list=str(tmp_path / "fl.json"),
                                         workers=2, split=(0, 0, 1)))
    assert sorted(result.manifest["image_id"]) == chosen
    assert result.rejected.set_index("image_id").loc["77777", "reason"] == "missing metadata"


@pytest.mark.slow  # > 5 s: a fresh interpreter or network timeouts
def test_interrupted_download_resumes_without_refetching(aws, moto_endpoint, tmp_path, monkeypatch):
    fill_bucket(aws, per_class=6, bad=False)
    clean = build_data_dir(PrepareConfig(source=f"s3://{BUCKET}", out=str(tmp_path / "clean"), workers=2)).manifest

    proxy = SlowProxy(moto_endpoint, delay=0.05)
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        out = tmp_path / "resumed"
        command = [sys.executable, "-m", "bin_counter", "prepare", "--source", f"s3://{BUCKET}", "--out", str(out),
                   "--workers", "1"]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raw = out / "raw"
        deadline = time.time() + 60
        while time.time() < deadline and len(list(raw.rglob("*.jpg")) + list(raw.rglob("*.json"))) < 12:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        (raw,) = raw.iterdir()  # raw/<key of the source>/bin-images/..., raw/<key>/metadata/...
        done_before = {p: p.stat().st_mtime_ns for p in raw.rglob("*") if p.is_file() and not p.name.startswith(".")}
        assert 12 <= len(done_before) < 60, "the kill must land part-way through the download"
        assert not (out / "manifest.csv").exists()

        proxy.gets.clear()
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        resumed = build_data_dir(PrepareConfig(source=f"s3://{BUCKET}", out=str(out), workers=2))
    finally:
        proxy.close()
    refetched = {path.lstrip("/").split("/", 1)[1] for path in proxy.gets}
    assert not refetched & {str(p.relative_to(raw)) for p in done_before}, "complete files were fetched again"
    assert resumed.already_present == len(done_before) and resumed.downloaded == 60 - len(done_before)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in done_before.items())
    assert not list(out.rglob(".*.part-*"))
    columns = ["image_id", "count", "split", "sha256", "width", "height"]
    pd.testing.assert_frame_equal(clean[columns].sort_values("image_id").reset_index(drop=True),
                                  resumed.manifest[columns].sort_values("image_id").reset_index(drop=True))


def test_upload_round_trip_skips_unchanged_objects(aws, tmp_path):
    aws.create_bucket(Bucket="mine")
    result = build_data_dir(PrepareConfig(out=str(tmp_path / "d"), limit_per_class=2, workers=2))
    first = upload_prepared(result, "s3://mine/abid/v1", workers=4)
    assert first.transferred == 10 + 3 and first.skipped == 0
    keys = {o["Key"] for o in aws.list_objects_v2(Bucket="mine")["Contents"]}
    assert "abid/v1/manifest.csv" in keys and {f"abid/v1/{p}" for p in result.manifest["path"]} <= keys
    body = aws.get_object(Bucket="mine", Key=f"abid/v1/{result.manifest['path'][0]}")["Body"].read()
    assert body == (tmp_path / "d" / result.manifest["path"][0]).read_bytes()
    again = upload_prepared(result, "s3://mine/abid/v1", workers=4)
    assert again.transferred == 0 and again.skipped == 13


def test_missing_bucket_is_one_clear_line(aws, tmp_path):
    with pytest.raises(BinCounterError, match="does not exist"):
        build_data_dir(PrepareConfig(source="s3://no-such-bucket", out=str(tmp_path / "d"), workers=1))


@pytest.mark.slow  # > 5 s: a fresh interpreter or network timeouts
def test_unreachable_endpoint_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from bin_counter.cli import main
    from conftest import free_port

    unreachable = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
                   "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    for name, value in unreachable.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as ended:
        main(["prepare", "--source", "s3://abid", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err and "cannot reach S3" in err


def test_interrupted_upload_never_leaves_an_index_naming_missing_data(aws, moto_endpoint, tmp_path, monkeypatch):
    from conftest import LoopbackProxy

    aws.create_bucket(Bucket="mine")
    result = build_data_dir(PrepareConfig(out=str(tmp_path / "d"), limit_per_class=4, workers=2, shard_size=4))
    denied = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
              b"<Message>Access Denied</Message></Error>")
    proxy = LoopbackProxy(moto_endpoint, lambda handler, body: (403, denied) if handler.command == "PUT"
                          and "test-000000.tar" in handler.path else None)  # the upload dies at a shard
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        with pytest.raises(BinCounterError, match="refused"):
            upload_prepared(result, "s3://mine/v1", workers=8)
    finally:
        proxy.close()
    time.sleep(1)  # uploads already running when the error came finish in the background
    keys = {o["Key"] for o in aws.list_objects_v2(Bucket="mine").get("Contents", [])}
    assert "v1/shards/train-000000.tar" in keys or "v1/images" in " ".join(keys)
    assert not {"v1/manifest.csv", "v1/dataset.json", "v1/shards/index.json"} & keys


def test_s3_data_dir_is_fetched_again_after_another_upload_to_its_prefix(aws, tmp_path, monkeypatch):
    from bin_counter.cloud.s3 import local_copy
    from bin_counter.core.manifest import read_classes

    monkeypatch.chdir(tmp_path)
    aws.create_bucket(Bucket="mine")
    for classes, rows in (([1, 2, 3], "first"), ([0, 1, 2, 3, 4, 5], "second")):  # two prepare --upload runs
        aws.put_object(Bucket="mine", Key="abid/dataset.json", Body=json.dumps({"classes": classes}))
        aws.put_object(Bucket="mine", Key="abid/manifest.csv", Body=f"image_id\n{rows}\n")
        local = local_copy("s3://mine/abid")
        assert read_classes(local) == classes and rows in (local / "manifest.csv").read_text()  # before: the first
