"""Bad shard members (absolute names, dotted ids, bad `.cls` values): logged skips, nothing written outside."""
from __future__ import annotations

import io
import json
import logging
import tarfile

from conftest import jpeg


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
