"""Calibration, conformal count sets and the record check, on synthetic problems where the truth is known."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bin_counter.core.answers import answer_frame
from bin_counter.core.calibration import (
    CountCalibration,
    classwise_ece,
    risk_coverage,
    top_label_ece,
    with_temperature,
)

CLASSES = [1, 2, 3, 4, 5]
DECODING = {"how": "argmax"}


def synthetic(n: int, seed: int, sharpness: float = 1.0, temperature: float = 1.0):
    """Photos whose true count distribution p(x) is known: labels are drawn from it, and the model reports
    p(x) distorted by `temperature` (over-confident below 1), as an uncalibrated model would."""
    rng = np.random.default_rng(seed)
    truth = rng.dirichlet(np.full(len(CLASSES), sharpness), size=n)
    labels = np.array([rng.choice(len(CLASSES), p=p) for p in truth])
    return with_temperature(truth, temperature), labels


@pytest.mark.parametrize("temperature", [0.3, 0.9, 1.0, 2.5, 12.0])
def test_temperature_scaling_keeps_every_argmax(temperature):
    probs, _ = synthetic(2000, 0)
    assert (with_temperature(probs, temperature).argmax(1) == probs.argmax(1)).all()


def test_temperature_fitted_on_held_out_undoes_over_confidence():
    probs, labels = synthetic(4000, 1, temperature=0.5)  # the model is too sure of itself
    fitted = CountCalibration.fit(probs, labels)
    assert 1.6 < fitted.temperature < 2.4
    assert top_label_ece(fitted.probabilities(probs), labels) < 0.5 * top_label_ece(probs, labels)
    assert classwise_ece(fitted.probabilities(probs), labels) < classwise_ece(probs, labels)


@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_count_sets_reach_their_coverage_on_many_seeds(coverage):
    """Split-conformal: over many calibration/test draws the sets hold the true count with the chosen
    probability (within sampling error), and are smaller than all five counts."""
    covered, sizes = [], []
    for seed in range(30):
        probs, labels = synthetic(1500, seed, temperature=0.7)
        fitted = CountCalibration.fit(probs[:500], labels[:500], coverage=coverage)
        members = fitted.count_sets(fitted.probabilities(probs[500:]))
        covered.append(members[np.arange(1000), labels[500:]].mean())
        sizes.append(members.sum(1).mean())
    assert abs(np.mean(covered) - coverage) < 0.01  # the mean of 30 draws: standard error about 0.002
    assert min(covered) > coverage - 0.05 and np.mean(sizes) < len(CLASSES)


def test_record_p_is_uniform_on_correct_records():
    """The conformal p-value of a correct record is uniform (Kolmogorov-Smirnov, over many calibration draws), so
    --false-alarm 0.05 calls 5% of correct records suspect, and records away from the truth get small p-values."""
    correct, wrong = [], []
    for seed in range(300):
        probs, labels = synthetic(220, seed, sharpness=0.5)
        fitted = CountCalibration.fit(probs[:200], labels[:200])
        p_values = fitted.record_p_values(fitted.probabilities(probs[200:]))
        correct.extend(p_values[np.arange(20), labels[200:]])
        wrong.extend(p_values[np.arange(20), (labels[200:] + 2) % len(CLASSES)])
    correct, wrong = np.array(correct), np.array(wrong)
    assert stats.kstest(correct, "uniform").pvalue > 0.01
    sets = []  # and so are the count sets' (LAC) p-values
    for seed in range(300, 500):
        probs, labels = synthetic(220, seed, sharpness=0.5)
        fitted = CountCalibration.fit(probs[:200], labels[:200])
        sets.extend(fitted.p_values(fitted.probabilities(probs[200:]))[np.arange(20), labels[200:]])
    assert stats.kstest(sets, "uniform").pvalue > 0.01
    assert abs((correct < 0.05).mean() - 0.05) < 0.012
    assert (wrong < 0.05).mean() > 2 * (correct < 0.05).mean()


def test_answer_frame_checks_records_and_marks_what_it_cannot_judge():
    probs, labels = synthetic(400, 3, sharpness=0.3)
    fitted = CountCalibration.fit(probs[:300], labels[:300])
    held = probs[300:304].copy()
    held[3] = np.nan  # an unreadable photo
    records = pd.Series([float(CLASSES[labels[300]]), 0.0, 37.0, 3.0])
    frame = answer_frame(held, CLASSES, DECODING, fitted, records)
    assert frame.loc[0, "record_check"] in ("consistent", "suspect") and 0 < frame.loc[0, "record_p"] <= 1
    assert list(frame.loc[1:2, "record_check"]) == ["outside", "outside"]  # an empty bin, a bin of dozens
    assert frame.loc[3, "predicted_count"] == -1
    assert frame.loc[3, "record_check"] == "" and frame.loc[3, "count_set"] == ""
    sets = [list(map(int, s.split("|"))) for s in frame.loc[:2, "count_set"]]
    assert all(s == sorted(s) and set(s) <= set(CLASSES) for s in sets)
    assert answer_frame(held, CLASSES, DECODING, fitted)["record_check"].eq("").all()  # no records, no verdicts


def test_answer_frame_without_a_calibration_is_the_old_answer():
    """A model logged before 0.2 has no calibration: its probabilities as they are, no sets, no checks."""
    probs, _ = synthetic(50, 4)
    frame = answer_frame(probs, CLASSES, DECODING, None, pd.Series([2.0] * 50))
    assert (frame["predicted_count"] == np.asarray(CLASSES)[probs.argmax(1)]).all()
    assert np.allclose(frame["confidence"], probs.max(1)) and (frame["count_set"] == "").all()
    assert frame["record_p"].isna().all()


def test_risk_coverage_puts_a_ranking_that_knows_its_errors_above_the_base_rate():
    rng = np.random.default_rng(0)
    correct = rng.random(1000) < 0.4
    informed = np.where(correct, rng.random(1000), 1 + rng.random(1000))  # errors ranked most uncertain
    curve = pd.DataFrame(risk_coverage(correct, informed))
    assert curve["accuracy"].iloc[-1] == pytest.approx(correct.mean())
    assert curve.loc[curve["coverage"] <= 0.35, "accuracy"].min() == 1.0


def test_calibration_round_trips_through_the_models_config():
    probs, labels = synthetic(200, 5)
    fitted = CountCalibration.fit(probs, labels, coverage=0.8, false_alarm=0.02)
    again = CountCalibration.from_dict(fitted.as_dict())
    assert again == fitted and CountCalibration.from_dict(None) is None
