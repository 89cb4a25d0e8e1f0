import re

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from bin_counter.core.metrics import STUDY_REGEXES, classification_metrics, json_ready, majority_baseline, study_lines


def test_metrics_equal_scikit_learn_on_hand_made_predictions():
    y_true = [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]
    y_pred = [1, 2, 2, 2, 3, 1, 5, 4, 5, 3, 5]
    classes = [1, 2, 3, 4, 5]
    m = classification_metrics(y_true, y_pred, classes)
    assert m["accuracy"] == accuracy_score(y_true, y_pred) == 7 / 11
    for average in ("macro", "weighted"):
        assert np.isclose(m[f"precision_{average}"], precision_score(y_true, y_pred, average=average))
        assert np.isclose(m[f"recall_{average}"], recall_score(y_true, y_pred, average=average))
        assert np.isclose(m[f"f1_{average}"], f1_score(y_true, y_pred, average=average))
    assert np.allclose(m["per_class"]["f1"], f1_score(y_true, y_pred, average=None))
    errors = np.array(y_pred) - np.array(y_true)
    assert np.isclose(m["mae"], np.abs(errors).mean()) and np.isclose(m["rmse"], np.sqrt((errors ** 2).mean()))
    assert np.isclose(m["within_one"], 9 / 11)  # 3->1 and 5->3 are off by two
    assert m["confusion"].sum() == 11 and m["confusion"][0, 1] == 1
    doc = json_ready(m)
    assert set(doc) >= {"accuracy", "precision_macro", "recall_macro", "f1_macro", "rmse", "mae", "per_class"}
    assert doc["per_class"]["5"]["support"] == 3


def test_class_absent_from_predictions_counts_as_zero_not_crash():
    m = classification_metrics([1, 2, 3], [1, 1, 1], [1, 2, 3])
    assert m["per_class"].loc[1, "precision"] == 0 and np.isclose(m["precision_macro"], (1 / 3) / 3)


def test_study_lines_match_sagemaker_regexes():
    m = classification_metrics([1, 2, 3, 3], [1, 2, 3, 2], [1, 2, 3])
    text = study_lines(0.8123, m)
    values = {name: float(re.search(regex, text).group(1)) for name, regex in STUDY_REGEXES.items()}
    assert values["Average loss"] == 0.8123 and values["Accuracy"] == 0.75
    assert np.isclose(values["F1 Score"], m["f1_macro"], atol=1e-4)


def test_majority_baseline():
    assert majority_baseline([3, 3, 2], [3, 1, 3, 2]) == 0.5


def test_perfect_predictions_on_a_split_without_a_count_score_one_not_point_eight():
    from bin_counter.commands.evaluate import summary_lines

    m = classification_metrics([1, 2, 3, 4, 4], [1, 2, 3, 4, 4], [1, 2, 3, 4, 5])  # no bin of count 5
    assert m["f1_macro"] == m["precision_macro"] == m["recall_macro"] == 1.0  # before: 0.8
    assert m["counts_scored"] == [1, 2, 3, 4] and list(m["per_class"]["class"]) == [1, 2, 3, 4, 5]
    assert json_ready(m)["counts_scored"] == [1, 2, 3, 4] and "5" in json_ready(m)["per_class"]
    assert "macro over counts 1,2,3,4" in summary_lines(m)
    wrong = classification_metrics([1, 2], [5, 2], [1, 2, 3, 4, 5])  # a prediction of an absent count still costs
    assert np.isclose(wrong["recall_macro"], 0.5)
