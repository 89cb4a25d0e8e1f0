import json

import pytest

from bin_counter import BinCounterError
from bin_counter.core import abid
from bin_counter.core.dataset import SAMPLE_DIR


def test_parse_count_accepts_abid_metadata():
    assert abid.parse_count(b'{"EXPECTED_QUANTITY": 4, "BIN_FCSKU_DATA": {}}') == 4
    assert abid.parse_count('{"EXPECTED_QUANTITY": 0}') == 0


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "not valid JSON"),
    (b'{"BIN_FCSKU_DATA": {}}', "no EXPECTED_QUANTITY"),
    (b'{"EXPECTED_QUANTITY": -1}', "negative"),
    (b'{"EXPECTED_QUANTITY": 2.5}', "not an integer"),
    (b'{"EXPECTED_QUANTITY": "3"}', "not an integer"),
    (b'{"EXPECTED_QUANTITY": true}', "not an integer"),
    (b"[1, 2]", "no EXPECTED_QUANTITY"),
])
def test_parse_count_rejects_bad_metadata(raw, reason):
    with pytest.raises(ValueError, match=reason):
        abid.parse_count(raw)


def test_check_image_decodes_real_jpeg_and_fails_truncated_one():
    data = next((SAMPLE_DIR / "bin-images").glob("*.jpg")).read_bytes()
    info = abid.check_image(data)
    assert info.width > 0 and info.height > 0
    with pytest.raises(ValueError, match="does not decode"):
        abid.check_image(data[: len(data) // 2])  # header intact, body cut: only a full decode notices
    with pytest.raises(ValueError, match="does not decode"):
        abid.check_image(b"\xff\xd8 definitely not a jpeg")


def test_ids_stay_strings():
    assert abid.id_from_key("metadata/01002.json") == "01002"
    assert abid.id_from_key("metadata/1002.json") == "1002"
    assert abid.image_key("01002") == "bin-images/01002.jpg"


def test_read_file_list_study_format_and_plain_list(tmp_path):
    study = tmp_path / "file_list.json"
    study.write_text(json.dumps({"1": ["metadata/01002.json", "metadata/1002.json"], "2": ["metadata/00005.json"]}))
    assert abid.read_file_list(study) == ["01002", "1002", "00005"]
    plain = tmp_path / "ids.json"
    plain.write_text(json.dumps(["01002", "1002", "01002"]))
    assert abid.read_file_list(plain) == ["01002", "1002"]


@pytest.mark.parametrize("content", ["{oops", '{"1": "metadata/1.json"}', "[1, 2]", '"x"', "{}"])
def test_read_file_list_malformed_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BinCounterError, match="file list"):
        abid.read_file_list(path)


def test_parse_classes():
    assert abid.parse_classes("1-5") == [1, 2, 3, 4, 5]
    assert abid.parse_classes("0-5") == [0, 1, 2, 3, 4, 5]
    assert abid.parse_classes("1-10") == list(range(1, 11))
    assert abid.parse_classes("0,2,4") == [0, 2, 4]
    for bad in ("x", "3", "5-1"):
        with pytest.raises(BinCounterError):
            abid.parse_classes(bad)


def test_a_tiny_one_bit_png_of_40_megapixels_is_refused_before_decoding(monkeypatch):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (6300, 6300)).save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < 20_000  # before: accepted, and 120 MB of RGB decoded per request row
    with pytest.raises(ValueError, match=r"6300x6300, over the 12,000,000-pixel limit \(BIN_COUNTER_MAX_IMAGE_PIX"):
        abid.read_image(buffer.getvalue())
    photo = next((SAMPLE_DIR / "bin-images").glob("*.jpg"))
    assert abid.read_image(photo).width > 0  # bin photos are far below it
    monkeypatch.setenv("BIN_COUNTER_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ValueError, match="over the 1,000-pixel limit"):
        abid.read_image(photo)
