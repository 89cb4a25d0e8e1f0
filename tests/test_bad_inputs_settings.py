"""Settings read strictly: boolean values, settings files (bad ones are one-line errors, values converted as
options are)."""
from __future__ import annotations

import pytest

from bin_counter.cli import main, parse, train_config


@pytest.mark.parametrize("value, expected", [("on", True), ("off", False), ("yes", True), ("0", False)])
def test_boolean_values_are_read_strictly(value, expected):
    assert train_config(parse(["train", "--tta", value])).tta is expected


def test_an_unknown_boolean_value_is_refused_not_read_as_false(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["train", "--int8", "y"])
    assert ended.value.code == 2 and "expected true or false, got 'y'" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "cannot be read"),  # a directory
    ("5\n", "expected a mapping of option: value, got int"),
    ("- a: 1\n", "expected a mapping of option: value, got list"),
    ("tta: maybe\n", "tta: expected true or false"),
    ("epochs: many\n", "epochs:"),
])
def test_bad_settings_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "dir" if content is None else tmp_path / "config.yaml"
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(SystemExit) as ended:
        main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and message in err and "Traceback" not in err


def test_settings_file_values_are_converted_like_options(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("tta: 'false'\nepochs: 5.0\nlr: '0.01'\n")
    cfg = train_config(parse(["train", "--config", str(path)]))
    assert (cfg.tta, cfg.epochs, cfg.lr) == (False, 5, 0.01) and isinstance(cfg.epochs, int)
