"""Issue 14, part A: hostile input and faults in prepare, predict's inputs, S3 transfers, shards and the decoder.

Each test is named for the attack or fault it stops. Adversarial inputs are built on the fly (S3 keys, tar
members, images made with Pillow, JSON documents); S3 is a real moto server on 127.0.0.1 reached with real boto3,
sometimes through a loopback proxy that refuses some requests as a locked-down bucket would.
"""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pandas as pd
import pytest
from PIL import Image

from bin_counter import BinCounterError
from bin_counter.commands.prepare import build_data_dir, upload_prepared
from bin_counter.config import PrepareConfig
from bin_counter.core import abid
from bin_counter.core.dataset import SAMPLE_DIR
from bin_counter.core.files import atomic_write_text
from conftest import LoopbackProxy, SlowProxy

BUCKET = "hostile-a"
SAMPLE_JPEGS = sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))


def jpeg(index: int = 0) -> bytes:
    return SAMPLE_JPEGS[index].read_bytes()


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "bin_counter", *args], capture_output=True, text=True, **kwargs)


def assert_one_line_error(result, message: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def files_outside(root, *inside) -> list:
    """Files below root that are in none of the folders `inside` (MLflow's store aside)."""
    return [p for p in root.rglob("*") if p.is_file() and p.name != "mlruns.db" and "mlruns" not in p.parts
            and not any(folder in p.parents for folder in inside)]


def abid_dir(root, pairs: dict[str, tuple[bytes, object]]):
    """A local folder in ABID's layout holding exactly `pairs` (id -> (image bytes, metadata))."""
    (root / "bin-images").mkdir(parents=True)
    (root / "metadata").mkdir()
    for image_id, (image, meta) in pairs.items():
        (root / "bin-images" / f"{image_id}.jpg").write_bytes(image)
        (root / "metadata" / f"{image_id}.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return root


def rejected_reasons(out) -> dict[str, str]:
    frame = pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)
    return dict(zip(frame["image_id"], frame["reason"]))


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


# ---- item 1: names from elsewhere never become paths outside their folder ---------------------------------


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


def test_prepare_refuses_file_list_entries_that_climb_out_or_hold_nul(tmp_path):
    out = tmp_path / "d"
    root = abid_dir(tmp_path / "abid", {"a1": (jpeg(0), {"EXPECTED_QUANTITY": 1}),
                                         "a2": (jpeg(1), {"EXPECTED_QUANTITY": 2})})
    hostile = ["metadata/../../../../etc/passwd.json", "/etc/shadow.json", "metadata/a\u0000b.json",
               "metadata\\..\\..\\x.json"]
    (tmp_path / "fl.json").write_text(json.dumps({"1": ["metadata/a1.json", *hostile], "2": ["metadata/a2.json"]}))
    result = build_data_dir(PrepareConfig(source=str(root), out=str(out), file_list=str(tmp_path / "fl.json"),
                                         split=(0, 0, 1), workers=2))
    assert sorted(result.manifest["image_id"]) == ["a1", "a2"]
    reasons = rejected_reasons(out)
    assert all(entry in reasons and reasons[entry].startswith("unsafe file-list entry") for entry in hostile), reasons
    assert files_outside(tmp_path, out, root) == [tmp_path / "fl.json"]


def test_manifest_path_that_climbs_out_of_data_dir_is_refused(tmp_path):
    from bin_counter.core.manifest import read_manifest

    out = tmp_path / "d"
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2))
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    manifest.loc[0, "path"] = "../../../etc/passwd"
    manifest.to_csv(out / "manifest.csv", index=False)
    with pytest.raises(BinCounterError, match="refused"):
        read_manifest(out)


# ---- item 2: shard members ---------------------------------------------------------------------------------


def write_shard(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def sharded_dir(root, members: list[tuple[str, bytes]]):
    (root / "shards").mkdir(parents=True)
    write_shard(root / "shards" / "val-000000.tar", members)
    (root / "shards" / "index.json").write_text(json.dumps({"val": ["val-000000.tar"]}))
    return root


def test_absolute_shard_member_name_cannot_escape_train_example_folder(tmp_path, caplog):
    from bin_counter.commands.train import example_images
    from bin_counter.config import TrainConfig

    target = tmp_path / "outside" / "evil"
    (tmp_path / "outside").mkdir()
    data = sharded_dir(tmp_path / "data", [(f"{target}.jpg", jpeg(0)), (f"{target}.cls", b"1"),
                                           ("../climb.jpg", jpeg(0)), ("../climb.cls", b"1"),
                                           ("good.jpg", jpeg(1)), ("good.cls", b"2"),
                                           ("good2.jpg", jpeg(2)), ("good2.cls", b"3")])
    examples = tmp_path / "examples"
    examples.mkdir()
    with caplog.at_level(logging.WARNING, logger="bin_counter.cloud.shards"):
        paths = example_images(TrainConfig(data=str(data), stream=True), {}, examples)
    assert not list((tmp_path / "outside").iterdir()) and not (tmp_path / "climb.jpg").exists()
    assert [p for p in paths] == [str(examples / "good.jpg"), str(examples / "good2.jpg")]
    assert "absolute name" in caplog.text and "'..' part" in caplog.text


def test_dotted_ids_keep_their_shard_samples_whole(tmp_path):
    from bin_counter.cloud.shards import samples

    write_shard(tmp_path / "s.tar", [("a.b.jpg", jpeg(0)), ("a.b.cls", b"2"), ("a.b.json", b"{}"),
                                     ("c.jpg", jpeg(1)), ("c.cls", b"4")])
    got = [(s["image_id"], s["count"], s["jpg"] == jpeg(i)) for i, s in enumerate(samples(str(tmp_path / "s.tar")))]
    assert got == [("a.b", 2, True), ("c", 4, True)]


def test_bad_cls_value_and_unknown_count_in_a_shard_are_logged_skips(tmp_path, caplog):
    from bin_counter.cloud.shards import ShardStream
    from bin_counter.core.data import eval_transform

    write_shard(tmp_path / "s.tar", [("x.jpg", jpeg(0)), ("x.cls", b"seven"),
                                     ("y.jpg", jpeg(1)), ("y.cls", b"9"),
                                     ("w.jpg", jpeg(2)), ("w.cls", b"1" * 400),
                                     ("z.jpg", jpeg(3)), ("z.cls", b"3")])
    stream = ShardStream([str(tmp_path / "s.tar")], [1, 2, 3, 4, 5], eval_transform("efficientnet-lite0"))
    with caplog.at_level(logging.WARNING, logger="bin_counter.cloud.shards"):
        labels = [int(label) for _, label, _ in stream]
    assert labels == [2]  # z: count 3 is class index 2
    assert "'seven'" in caplog.text and "count 9 is not one of the classes" in caplog.text
    assert "skipping w" in caplog.text


# ---- item 3: one decoder, JPEG and PNG only, upright ---------------------------------------------------------


def encoded(fmt: str, size=(16, 12), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, name", [("TIFF", "TIFF"), ("WEBP", "WebP"), ("BMP", "BMP"), ("ICO", "ICO"),
                                       ("GIF", "GIF")])
def test_image_formats_other_than_jpeg_and_png_are_refused_before_decoding(fmt, name, tmp_path):
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow cannot write WebP")
    data = encoded(fmt)
    (tmp_path / "x.img").write_bytes(data)
    for source in (data, tmp_path / "x.img"):
        with pytest.raises(ValueError, match=f"^image format {name} is not accepted \\(only JPEG and PNG\\)$"):
            abid.read_image(source)
    assert abid.read_image(encoded("PNG")).size == (16, 12) and abid.read_image(encoded("JPEG")).size == (16, 12)


def test_eps_file_is_refused_without_running_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    calls = []

    def ghostscript(*args, **kwargs):  # what PIL would run to rasterise PostScript
        calls.append(args)
        raise OSError("Ghostscript was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = encoded("EPS")
    assert eps.startswith(b"%!PS")
    with pytest.raises(ValueError, match="image format EPS is not accepted"):
        abid.read_image(eps)
    assert calls == []


def test_sideways_photo_is_turned_upright_by_its_exif_orientation():
    image = Image.new("RGB", (40, 20), "red")
    image.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = abid.read_image(buffer.getvalue())
    assert upright.size == (20, 40)
    red, blue = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]  # the left (red) half is now on top


# ---- item 4: one source per DATA_DIR -----------------------------------------------------------------------


def test_prepare_refuses_an_out_folder_holding_another_source_unless_replace(tmp_path):
    out = tmp_path / "d"
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2))
    old_images = set(p.name for p in (out / "images").iterdir())
    root = abid_dir(tmp_path / "mine", {f"m{i}": (jpeg(i), {"EXPECTED_QUANTITY": 1 + i % 2}) for i in range(4)})
    with pytest.raises(BinCounterError, match="holds a dataset prepared from sample.*--replace"):
        build_data_dir(PrepareConfig(source=str(root), out=str(out), workers=2))
    assert set(p.name for p in (out / "images").iterdir()) == old_images  # refused before touching anything
    result = build_data_dir(PrepareConfig(source=str(root), out=str(out), workers=2, replace=True))
    assert sorted(result.manifest["image_id"]) == ["m0", "m1", "m2", "m3"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["m0.jpg", "m1.jpg", "m2.jpg", "m3.jpg"]
    assert json.loads((out / "dataset.json").read_text())["source"] == str(root.resolve())


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


def test_prepare_without_shard_size_removes_a_stale_shard_index(tmp_path):
    out = tmp_path / "d"
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=2, workers=2, shard_size=4))
    assert (out / "shards" / "index.json").exists()
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2))
    assert not (out / "shards").exists()


# ---- item 5: ids once, filtered pairs listed ---------------------------------------------------------------


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


def test_pairs_outside_the_classes_are_listed_in_rejected(tmp_path):
    root = abid_dir(tmp_path / "abid", {"in1": (jpeg(0), {"EXPECTED_QUANTITY": 1}),
                                        "in2": (jpeg(1), {"EXPECTED_QUANTITY": 2}),
                                        "seven": (jpeg(2), {"EXPECTED_QUANTITY": 7}),
                                        "empty": (jpeg(3), {"EXPECTED_QUANTITY": 0})})
    build_data_dir(PrepareConfig(source=str(root), out=str(tmp_path / "d"), workers=2))
    reasons = rejected_reasons(tmp_path / "d")
    assert reasons == {"seven": "count 7 outside classes 1-5", "empty": "count 0 outside classes 1-5"}


def test_file_list_listing_an_id_twice_is_reported(tmp_path):
    root = abid_dir(tmp_path / "abid", {"a": (jpeg(0), {"EXPECTED_QUANTITY": 1}),
                                        "b": (jpeg(1), {"EXPECTED_QUANTITY": 2})})
    (tmp_path / "fl.json").write_text(json.dumps({"1": ["metadata/a.json"], "2": ["metadata/b.json", "a"]}))
    result = build_data_dir(PrepareConfig(source=str(root), out=str(tmp_path / "d"),
                                          file_list=str(tmp_path / "fl.json"), workers=2, split=(0, 0, 1)))
    assert sorted(result.manifest["image_id"]) == ["a", "b"]
    assert rejected_reasons(tmp_path / "d") == {"a": "duplicate id (kept once)"}


# ---- item 6: metadata and file lists that lie -----------------------------------------------------------------


def test_absurd_expected_quantity_is_rejected_not_folded_into_the_top_class(tmp_path):
    root = abid_dir(tmp_path / "abid", {"ok1": (jpeg(0), {"EXPECTED_QUANTITY": 1}),
                                        "ok2": (jpeg(1), {"EXPECTED_QUANTITY": 6}),
                                        "huge": (jpeg(2), '{"EXPECTED_QUANTITY": 1000000000000000000000000000000}'),
                                        "big": (jpeg(3), {"EXPECTED_QUANTITY": 10_001})})
    result = build_data_dir(PrepareConfig(source=str(root), out=str(tmp_path / "d"), top_bucket=True, workers=2))
    assert dict(zip(result.manifest["image_id"], result.manifest["count"])) == {"ok1": 1, "ok2": 5}
    reasons = rejected_reasons(tmp_path / "d")
    assert "implausible" in reasons["huge"] and "31-digit" in reasons["huge"]
    assert reasons["big"] == "EXPECTED_QUANTITY is implausible (over 10,000): 10001"


@pytest.mark.parametrize("raw, reason", [
    (b'{"EXPECTED_QUANTITY": 1, "EXPECTED_QUANTITY": 5}', "duplicate key 'EXPECTED_QUANTITY'"),
    (b'{"EXPECTED_QUANTITY": 1, "BIN_FCSKU_DATA": {"x": 1, "x": 2}}', "duplicate key 'x'"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_ambiguous_or_hostile_metadata_json_is_rejected_with_a_reason(raw, reason):
    with pytest.raises(ValueError, match=reason):
        abid.parse_count(raw)


def test_file_list_with_a_duplicate_count_key_is_refused(tmp_path):
    path = tmp_path / "fl.json"
    path.write_text('{"1": ["metadata/a.json"], "1": ["metadata/b.json"]}')
    with pytest.raises(BinCounterError, match="duplicate key '1'"):
        abid.read_file_list(path)


def test_non_utf8_file_list_is_one_line_error(tmp_path):
    (tmp_path / "fl.json").write_bytes(b'["metadata/caf\xe9.json"]')  # latin-1
    result = cli("prepare", "--out", str(tmp_path / "d"), "--file-list", str(tmp_path / "fl.json"))
    assert_one_line_error(result, "is not UTF-8 text")


# ---- item 7: temporary files of concurrent writers ---------------------------------------------------------


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


# ---- item 8: downloads stop at the first fatal error; --workers 0 ---------------------------------------------


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


def test_zero_workers_is_one_line_error(tmp_path):
    assert_one_line_error(cli("prepare", "--out", str(tmp_path / "d"), "--workers", "0"),
                          "--workers must be at least 1")


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


# ---- item 9: faults that used to end in a traceback ---------------------------------------------------------


def small_prepared(tmp_path):
    return build_data_dir(PrepareConfig(out=str(tmp_path / "d"), limit_per_class=1, workers=2))


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
