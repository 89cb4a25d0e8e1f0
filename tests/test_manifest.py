"""The prepared DATA_DIR's manifest (core/manifest.py): what a hand-edited or foreign manifest may not hold."""
import shutil

import pandas as pd
import pytest

from bin_counter import BinCounterError
from bin_counter.core.manifest import read_manifest


@pytest.mark.parametrize("checksum", ["", "abc123", "Z" * 64])
def test_manifest_rows_with_an_empty_or_ill_formed_sha256_are_refused(tiny_data, tmp_path, checksum):
    shutil.copy(tiny_data / "manifest.csv", tmp_path / "manifest.csv")
    frame = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    frame.loc[[3, 7], "sha256"] = checksum  # before: both shared the feature cache entry of one image
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(BinCounterError, match=r"manifest.csv: image '\S+' has no valid sha256 .*2 rows in all"):
        read_manifest(tmp_path)
