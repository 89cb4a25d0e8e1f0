"""S3 transfers against a real moto server on 127.0.0.1 (sometimes through a loopback proxy that refuses some
requests as a locked-down bucket would): hostile keys, caches, concurrent writers, fatal errors, Ctrl-C, listings."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from bin_counter import BinCounterError
from bin_counter.commands.prepare import build_data_dir, upload_prepared
from bin_counter.config import PrepareConfig
from bin_counter.core.files import atomic_write_text
from conftest import LoopbackProxy, SlowProxy, files_outside, jpeg, small_prepared

BUCKET = "hostile-a"


class RefusingProxy(LoopbackProxy):
    """A loopback proxy in front of moto that answers 403 AccessDenied, as a locked-down bucket policy would, to
    the requests `refuse(method, path)` picks, and forwards the rest."""

    def __init__(self, upstream: str, refuse):
        self.refuse = refuse
        self.refused: list[str] = []
        super().__init__(upstream)

    def on_request(self, handler, body):
        if self.refuse(handler.command, handler.path):
            self.refused.append(f"{handler.command} {handler.path}")
            return 403, (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                         b"<Message>Access Denied</Message></Error>")
        return None


@pytest.fixture
def refusing(aws, moto_endpoint, monkeypatch):
    """Start a RefusingProxy and point boto3 (AWS_ENDPOINT_URL) at it."""
    proxies = []

    def start(refuse):
        proxy = RefusingProxy(moto_endpoint, refuse)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


def test_s3_key_with_dotdot_or_absolute_name_cannot_escape_predict_cache(aws, tmp_path, caplog):
    from bin_counter.commands.predict import images_in_s3

    aws.create_bucket(Bucket=BUCKET)
    absolute = str(tmp_path / "outside" / "abs.jpg")  # a key starting with '/', aimed at a folder we can watch
    for key in ("today/ok.jpg", "today/../../../../X/escaped.jpg", absolute, "today/./dot.jpg", "today//twice.jpg"):
        aws.put_object(Bucket=BUCKET, Key=key, Body=jpeg())
    cache = tmp_path / "deep" / "a" / "b" / "c" / "cache"
    with caplog.at_level(logging.WARNING, logger="bin_counter.commands.predict"):
        images = images_in_s3(f"s3://{BUCKET}", cache, workers=2)
    assert files_outside(tmp_path, cache) == []
    assert list(images["image_id"]) == ["ok"] and (cache / "today" / "ok.jpg").read_bytes() == jpeg()
    skipped = "\n".join(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
    assert "'..' part" in skipped and "absolute name" in skipped and "'.' part" in skipped
    assert "empty part" in skipped


def put_pair(s3, key_prefix: str, image_id: str, image: bytes, meta) -> None:
    s3.put_object(Bucket=BUCKET, Key=f"{key_prefix}bin-images/{image_id}.jpg", Body=image)
    s3.put_object(Bucket=BUCKET, Key=f"{key_prefix}metadata/{image_id}.json",
                  Body=meta if isinstance(meta, (str, bytes)) else json.dumps(meta))


def test_one_buckets_download_cache_never_serves_another_prefixs_image(aws, tmp_path):
    aws.create_bucket(Bucket=BUCKET)
    for i in range(4):  # the same ids under two prefixes, with other images and counts
        put_pair(aws, "a/", str(i), jpeg(i), {"EXPECTED_QUANTITY": 1})
        put_pair(aws, "b/", str(i), jpeg(10 + i), {"EXPECTED_QUANTITY": 2})
    out = tmp_path / "d"
    build_data_dir(PrepareConfig(source=f"s3://{BUCKET}/a", out=str(out), workers=2, split=(0, 0, 1)))
    (out / "dataset.json").unlink()  # as an interrupted prepare leaves it: dataset.json is written last
    result = build_data_dir(PrepareConfig(source=f"s3://{BUCKET}/b", out=str(out), workers=2, split=(0, 0, 1)))
    assert set(result.manifest["count"]) == {2}
    for row in result.manifest.itertuples():
        assert (out / row.path).read_bytes() == jpeg(10 + int(row.image_id))


def test_nested_metadata_keys_do_not_give_an_id_twice(aws, tmp_path):
    aws.create_bucket(Bucket=BUCKET)
    for i in range(3):
        put_pair(aws, "", f"n{i}", jpeg(i), {"EXPECTED_QUANTITY": 1 + i})
        aws.put_object(Bucket=BUCKET, Key=f"metadata/archive/n{i}.json", Body=json.dumps({"EXPECTED_QUANTITY": 5}))
    aws.put_object(Bucket=BUCKET, Key="metadata/archive/lonely.json", Body=json.dumps({"EXPECTED_QUANTITY": 1}))
    aws.put_object(Bucket=BUCKET, Key="metadata/../../../../climb.json", Body=json.dumps({"EXPECTED_QUANTITY": 1}))
    out = tmp_path / "d"
    result = build_data_dir(PrepareConfig(source=f"s3://{BUCKET}", out=str(out), workers=2, split=(0, 0, 1)))
    assert sorted(result.manifest["image_id"]) == ["n0", "n1", "n2"]
    assert dict(zip(result.manifest["image_id"], result.manifest["count"])) == {"n0": 1, "n1": 2, "n2": 3}
    rejected = pd.read_csv(out / "rejected.csv", dtype=str)
    reasons = " | ".join(rejected["reason"])
    for i in range(3):
        assert f"nested metadata key ignored: 'metadata/archive/n{i}.json', same id as metadata/n{i}.json" in reasons
    assert "nested metadata key ignored: 'metadata/archive/lonely.json', not directly under metadata/" in reasons
    assert "climb.json" in reasons and files_outside(tmp_path, out) == []


def test_threads_writing_the_same_file_do_not_steal_each_others_temporary(tmp_path):
    from bin_counter.core.files import atomic_path

    target, writers = tmp_path / "out" / "same.txt", 8
    lined_up = threading.Barrier(writers)
    errors = []
    texts = [f"writer {i} " * 5000 for i in range(writers)]

    def write(i):
        try:
            with atomic_path(target) as tmp:
                tmp.write_text(texts[i])
                lined_up.wait(timeout=10)  # every writer holds its temporary at the same moment
        except Exception as exc:  # noqa: BLE001 - the failure is what the test reports
            errors.append(repr(exc))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_text() in texts
    assert [p.name for p in target.parent.iterdir()] == ["same.txt"]
    atomic_write_text(target, "again")
    assert target.read_text() == "again"


def test_fatal_download_error_cancels_the_queue_and_keeps_what_finished(aws, moto_endpoint, tmp_path, monkeypatch):
    from bin_counter.cloud import s3

    aws.create_bucket(Bucket=BUCKET)
    keys = [f"k{i:03d}.jpg" for i in range(60)]
    for key in keys:
        aws.put_object(Bucket=BUCKET, Key=key, Body=jpeg(0) + key.encode())
    # an archived object: GET answers 403 InvalidObjectState, which no retry fixes
    aws.put_object(Bucket=BUCKET, Key=keys[4], Body=b"cold", StorageClass="GLACIER")
    proxy = SlowProxy(moto_endpoint, delay=0.05)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        client = s3.make_client(workers=2)
        dest = tmp_path / "dl"
        with pytest.raises(BinCounterError, match="InvalidObjectState"):
            s3.download(client, BUCKET, [(key, dest / key) for key in keys], workers=2, desc="test")
        time.sleep(0.5)  # the downloads that were running finish in the background
        fetched = len(proxy.gets)
    finally:
        proxy.close()
    assert fetched <= 4 + 1 + 2 * 2 + 2, f"{fetched} GETs: the queue behind the error was not cancelled"
    done = [p for p in dest.iterdir() if not p.name.startswith(".")]
    assert done and all(p.read_bytes() == jpeg(0) + p.name.encode() for p in done)
    assert not list(dest.glob(".*.part-*"))


def ctrl_c_as_in_a_terminal():
    """A shell starts a command with SIGINT deliverable and at its default; the test process may not be so (an
    earlier test's library can leave SIGINT ignored or blocked, and a child inherits both)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_download_stops_promptly_and_keeps_finished_files(aws, moto_endpoint, tmp_path):
    aws.create_bucket(Bucket=BUCKET)
    for i in range(40):
        put_pair(aws, "", f"c{i:02d}", jpeg(i), {"EXPECTED_QUANTITY": 1 + i % 5})
    proxy = SlowProxy(moto_endpoint, delay=0.3)  # a wide window: on a loaded machine the signal may come late
    out = tmp_path / "d"
    try:
        command = [sys.executable, "-m", "bin_counter", "prepare", "--source", f"s3://{BUCKET}", "--out", str(out),
                   "--workers", "2"]
        parent = (f"parent: SIGINT {signal.getsignal(signal.SIGINT)}, "
                  f"blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])}")
        process = subprocess.Popen(command, env={**os.environ, "AWS_ENDPOINT_URL": proxy.url},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=ctrl_c_as_in_a_terminal)
        deadline = time.time() + 120
        while time.time() < deadline and len(proxy.gets) < 6:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        at_interrupt = len(proxy.gets)
        _, stderr = process.communicate(timeout=60)
        after = len(proxy.gets) - at_interrupt
    finally:
        proxy.close()
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, f"{parent}\n{stderr}"
    assert after <= 2 * 2 + 2, f"{after} objects fetched after Ctrl-C: the queue was not cancelled"
    fetched = [p for p in (out / "raw").rglob("*.jpg") if not p.name.startswith(".")]
    assert fetched and all(p.read_bytes() == jpeg(int(p.stem[1:])) for p in fetched)


def test_s3_listing_of_many_images_is_paired_with_metadata_in_linear_time(tmp_path):
    from bin_counter.commands.predict import pair_s3_keys

    n = 20_000
    keys = [f"p/bin-images/{i:06d}.jpg" for i in range(n)] + [f"p/metadata/{i:06d}.json" for i in range(n)]
    start = time.perf_counter()
    rows, jobs = pair_s3_keys(keys, BUCKET, tmp_path / "cache")
    elapsed = time.perf_counter() - start
    assert len(rows) == n and len(jobs) == 2 * n
    assert rows[7]["meta"] == tmp_path / "cache" / "p" / "metadata" / "000007.json"
    assert elapsed < 20, f"{elapsed:.1f} s for {2 * n} keys"  # the quadratic pairing took hours at this size


def test_denied_upload_is_one_line_not_a_traceback(aws, refusing, tmp_path):
    aws.create_bucket(Bucket="locked")
    result = small_prepared(tmp_path)
    proxy = refusing(lambda method, path: method == "PUT")
    with pytest.raises(BinCounterError, match=r"^upload to s3://locked/abid/\S+ refused: .*AccessDenied"):
        upload_prepared(result, "s3://locked/abid", workers=2)
    assert proxy.refused


def test_write_only_bucket_that_refuses_head_still_takes_the_upload(aws, refusing, tmp_path):
    aws.create_bucket(Bucket="dropbox")
    result = small_prepared(tmp_path)
    proxy = refusing(lambda method, path: method in ("HEAD", "GET"))  # PutObject allowed, nothing else
    stats = upload_prepared(result, "s3://dropbox/abid", workers=2)
    assert stats.transferred == 5 + 3 and any(r.startswith("HEAD /dropbox ") or r == "HEAD /dropbox"
                                              for r in proxy.refused)
    keys = {o["Key"] for o in aws.list_objects_v2(Bucket="dropbox")["Contents"]}
    assert "abid/manifest.csv" in keys and len(keys) == 8
