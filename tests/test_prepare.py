import json
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from bin_counter import BinCounterError
from bin_counter.commands.prepare import build_data_dir, prepare
from bin_counter.config import PrepareConfig
from bin_counter.core.dataset import SAMPLE_DIR
from bin_counter.core.files import sha256_of
from bin_counter.core.manifest import read_manifest
from conftest import make_abid_dir


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "bin_counter", *args], capture_output=True, text=True, **kwargs)


def test_prepare_bundled_sample_offline(tmp_path):
    result = prepare(PrepareConfig(source="sample", out=str(tmp_path / "d"), workers=2))
    manifest = read_manifest(tmp_path / "d")
    assert len(manifest) == 500 and len(result.rejected) == 0
    assert set(manifest["count"]) == {1, 2, 3, 4, 5}
    assert manifest.groupby("split").size().to_dict() == {"train": 400, "val": 50, "test": 50}
    row = manifest.iloc[0]
    assert sha256_of(tmp_path / "d" / row["path"]) == row["sha256"]
    assert isinstance(row["image_id"], str) and row["image_id"].startswith("0")  # zero-padding survives the CSV
    # MLflow: params, dataset input with a digest, histogram and rejected count
    client = mlflow.MlflowClient()
    logged = client.get_run(mlflow.last_active_run().info.run_id)
    assert logged.data.metrics["prepare/images"] == 500 and logged.data.metrics["prepare/rejected"] == 0
    assert logged.inputs.dataset_inputs[0].dataset.digest
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"class_histogram.png", "class_histogram.csv"} <= artifacts


def test_split_is_stratified_deterministic_and_order_free(tmp_path):
    a = build_data_dir(PrepareConfig(out=str(tmp_path / "a"), seed=3, workers=2)).manifest
    b = build_data_dir(PrepareConfig(out=str(tmp_path / "b"), seed=3, workers=2)).manifest
    c = build_data_dir(PrepareConfig(out=str(tmp_path / "c"), seed=4, workers=2)).manifest
    key = lambda m: m.sort_values("image_id")[["image_id", "split"]].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(key(a), key(b))
    assert not key(a).equals(key(c))
    per_class = a.groupby(["count", "split"]).size().unstack()
    assert (per_class["train"] == 80).all() and (per_class["val"] == 10).all() and (per_class["test"] == 10).all()
    # the same ids listed in another order split the same way
    ids = list(reversed(sorted(a["image_id"])))
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    d = build_data_dir(PrepareConfig(out=str(tmp_path / "d"), seed=3, file_list=str(tmp_path / "ids.json"),
                                    workers=2)).manifest
    pd.testing.assert_frame_equal(key(a), key(d))


def test_evaluation_only_split_and_limit(tmp_path):
    m = build_data_dir(PrepareConfig(out=str(tmp_path / "e"), split=(0, 0, 1), limit_per_class=3, workers=2)).manifest
    assert set(m["split"]) == {"test"} and len(m) == 15


def write_pair(root, image_id, image_bytes, meta):
    (root / "bin-images" / f"{image_id}.jpg").write_bytes(image_bytes)
    (root / "metadata" / f"{image_id}.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


def test_bad_pairs_are_rejected_with_reasons(tmp_path):
    root = make_abid_dir(tmp_path / "abid", per_class=2)
    good = next((SAMPLE_DIR / "bin-images").glob("*.jpg")).read_bytes()
    write_pair(root, "bad_corrupt", b"\xff\xd8\xff\xe0 garbage" * 10, {"EXPECTED_QUANTITY": 2})
    write_pair(root, "bad_truncated", good[: len(good) // 2], {"EXPECTED_QUANTITY": 2})
    write_pair(root, "bad_noqty", good, {"BIN_FCSKU_DATA": {}})
    write_pair(root, "bad_negative", good, {"EXPECTED_QUANTITY": -2})
    write_pair(root, "bad_float", good, {"EXPECTED_QUANTITY": 1.5})
    write_pair(root, "bad_json", good, "{nope")
    (root / "bin-images" / "bad_nometa.jpg").write_bytes(good)
    result = build_data_dir(PrepareConfig(source=str(root), out=str(tmp_path / "d"), workers=2))
    assert len(result.manifest) == 10
    assert not result.manifest["image_id"].str.startswith("bad").any()
    reasons = dict(pd.read_csv(tmp_path / "d" / "rejected.csv", dtype=str).values)
    assert set(reasons) == {"bad_corrupt", "bad_truncated", "bad_noqty", "bad_negative", "bad_float", "bad_json",
                            "bad_nometa"}
    assert "does not decode" in reasons["bad_truncated"] and "does not decode" in reasons["bad_corrupt"]
    assert "EXPECTED_QUANTITY" in reasons["bad_noqty"] and "negative" in reasons["bad_negative"]
    assert "not an integer" in reasons["bad_float"] and "JSON" in reasons["bad_json"]
    assert reasons["bad_nometa"] == "missing metadata"


def test_padded_and_unpadded_ids_are_different_bins(tmp_path):
    root = make_abid_dir(tmp_path / "abid", per_class=2)
    images = sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))
    write_pair(root, "1002", images[0].read_bytes(), {"EXPECTED_QUANTITY": 1})
    write_pair(root, "01002", images[1].read_bytes(), {"EXPECTED_QUANTITY": 5})
    build_data_dir(PrepareConfig(source=str(root), out=str(tmp_path / "d"), workers=2))
    manifest = read_manifest(tmp_path / "d").set_index("image_id")
    assert manifest.loc["1002", "count"] == 1 and manifest.loc["01002", "count"] == 5
    assert manifest.loc["1002", "sha256"] != manifest.loc["01002", "sha256"]


def test_other_class_ranges_and_top_bucket(tmp_path):
    root = make_abid_dir(tmp_path / "abid", per_class=2)
    image = next((SAMPLE_DIR / "bin-images").glob("*.jpg")).read_bytes()
    for image_id, count in (("e0", 0), ("e1", 0), ("big7", 7), ("big9", 9)):
        write_pair(root, image_id, image, {"EXPECTED_QUANTITY": count})
    m05 = build_data_dir(PrepareConfig(source=str(root), out=str(tmp_path / "a"), classes="0-5", workers=2)).manifest
    assert set(m05["count"]) == {0, 1, 2, 3, 4, 5} and "big7" not in set(m05["image_id"])
    folded = build_data_dir(PrepareConfig(source=str(root), out=str(tmp_path / "b"), classes="1-5", top_bucket=True,
                                         workers=2)).manifest.set_index("image_id")
    assert folded.loc["big9", "count"] == 5 and folded.loc["big9", "expected_quantity"] == 9
    m10 = build_data_dir(PrepareConfig(source=str(root), out=str(tmp_path / "c"), classes="1-10", workers=2)).manifest
    assert {7, 9} <= set(m10["count"])


def test_no_half_written_files_after_a_failed_prepare(tmp_path):
    with pytest.raises(BinCounterError, match="no images left"):
        build_data_dir(PrepareConfig(out=str(tmp_path / "d"), classes="7-9", workers=2))
    assert not (tmp_path / "d" / "manifest.csv").exists()
    assert not list((tmp_path).rglob(".*.part-*"))


@pytest.mark.parametrize("args, message", [
    (["--source", "/no/such/dir"], "unknown source"),
    (["--classes", "8-9"], "no images left"),
    (["--split", "0.5,0.5"], "--split"),
    (["--file-list", "missing.json"], "file list not found"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    result = cli("prepare", "--out", str(tmp_path / "d"), *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_malformed_file_list_is_one_line(tmp_path):
    (tmp_path / "fl.json").write_text('{"1": "metadata/1.json"}')
    result = cli("prepare", "--out", str(tmp_path / "d"), "--file-list", str(tmp_path / "fl.json"))
    assert result.returncode == 2 and "must map counts" in result.stderr and "Traceback" not in result.stderr




def test_prepare_into_a_folder_that_is_not_a_data_dir_deletes_none_of_its_files(tmp_path):
    out = tmp_path / "photos"
    (out / "images").mkdir(parents=True)
    (out / "shards").mkdir()
    mine = [out / "images" / "holiday.jpg", out / "shards" / "notes.txt", out / "todo.txt"]
    for path in mine:
        path.write_bytes(b"the user's own file")
    with pytest.raises(BinCounterError, match="not a DATA_DIR written by prepare.*--replace"):
        build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2))
    assert not (out / "manifest.csv").exists()
    result = build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2, replace=True))
    again = build_data_dir(PrepareConfig(out=str(out), limit_per_class=2, workers=2))  # prunes nothing it did not write
    assert len(result.manifest) == 5 and len(again.manifest) == 10
    assert all(path.read_bytes() == b"the user's own file" for path in mine)


def test_rerun_after_an_interrupted_first_prepare_is_not_refused(tmp_path):
    out = tmp_path / "d"
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2))
    (out / "dataset.json").unlink()  # what an interrupted first run leaves: dataset.json is written last
    assert len(build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2)).manifest) == 5


def test_prepare_with_fewer_images_prunes_the_ones_it_wrote_before(tmp_path):
    out = tmp_path / "d"
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=2, workers=2, shard_size=3))
    result = build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2))
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.jpg" for i in result.manifest["image_id"])
    assert not (out / "shards").exists()


def test_editing_the_source_image_never_changes_the_prepared_copy(tmp_path):
    import os

    root = make_abid_dir(tmp_path / "abid", per_class=1)
    out = tmp_path / "d"
    first = build_data_dir(PrepareConfig(source=str(root), out=str(out), workers=2))
    row = first.manifest.iloc[0]
    source = root / "bin-images" / f"{row['image_id']}.jpg"
    with open(source, "r+b") as handle:  # edited in place: the same inode
        handle.seek(200)
        handle.write(b"\x00" * 64)
    assert sha256_of(out / row["path"]) == row["sha256"]  # before: a hard link, changed under its checksum
    os.unlink(out / row["path"])
    os.link(source, out / row["path"])  # as an earlier version left it
    build_data_dir(PrepareConfig(source=str(root), out=str(out), workers=2))
    assert not os.path.samefile(source, out / row["path"])
