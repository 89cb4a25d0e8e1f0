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
