"""Bad inputs to `prepare`: file lists, metadata and manifests that lie or climb out of their folder, an
`--out` folder of another source, counts outside the classes; each a logged rejection or a one-line error."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from bin_counter import BinCounterError
from bin_counter.commands.prepare import build_data_dir
from bin_counter.config import PrepareConfig
from bin_counter.core import abid
from conftest import files_outside, jpeg


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "bin_counter", *args], capture_output=True, text=True, **kwargs)


def assert_one_line_error(result, message: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


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


def test_prepare_without_shard_size_removes_a_stale_shard_index(tmp_path):
    out = tmp_path / "d"
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=2, workers=2, shard_size=4))
    assert (out / "shards" / "index.json").exists()
    build_data_dir(PrepareConfig(out=str(out), limit_per_class=1, workers=2))
    assert not (out / "shards").exists()


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


def test_zero_workers_is_one_line_error(tmp_path):
    assert_one_line_error(cli("prepare", "--out", str(tmp_path / "d"), "--workers", "0"),
                          "--workers must be at least 1")
