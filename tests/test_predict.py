"""predict's inputs and results (commands/predict.py), against a real moto S3, with a counter standing in for a
served model (a function of the image paths, as the Counter protocol says)."""
import json

import pandas as pd

from bin_counter.commands.predict import predict
from bin_counter.config import PredictConfig
from bin_counter.core.dataset import SAMPLE_DIR

PHOTO = next((SAMPLE_DIR / "bin-images").glob("*.jpg")).read_bytes()


def count_three(paths: list[str], records=None, params=None) -> pd.DataFrame:
    return pd.DataFrame({"predicted_count": [3] * len(paths), "confidence": [0.9] * len(paths),
                         "count_set": ["2|3|4"] * len(paths), "uncertainty": [1.0] * len(paths),
                         "record_p": [0.5] * len(paths), "record_check": ["consistent"] * len(paths),
                         "error": [""] * len(paths)})


def test_s3_images_are_paired_with_the_metadata_beside_them_not_a_same_id_elsewhere(aws, tmp_path):
    aws.create_bucket(Bucket="bins")
    aws.put_object(Bucket="bins", Key="monday/bin-images/00001.jpg", Body=PHOTO)  # no metadata of its own
    aws.put_object(Bucket="bins", Key="tuesday/bin-images/00001.jpg", Body=PHOTO)
    aws.put_object(Bucket="bins", Key="tuesday/metadata/00001.json", Body=json.dumps({"EXPECTED_QUANTITY": 7}))
    predict(PredictConfig(input="s3://bins/", output=str(tmp_path / "out.csv")), count_three)
    out = pd.read_csv(tmp_path / "out.csv", dtype={"image_id": str}).set_index("key")
    assert out.loc["tuesday/bin-images/00001.jpg", "expected_quantity"] == 7
    assert pd.isna(out.loc["monday/bin-images/00001.jpg", "expected_quantity"])  # before: tuesday's 7
    assert list(out["image_id"]) == ["00001", "00001"]
