"""What the model answers for each photo, from its view-averaged probabilities: one implementation for the served
model (every engine), training's test split and `evaluate`, so the three can never disagree."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bin_counter.core.calibration import CountCalibration, count_set_text, entropy
from bin_counter.core.metrics import decode

SUSPECT, CONSISTENT, OUTSIDE = "suspect", "consistent", "outside"


def answer_frame(probs: np.ndarray, classes: list[int], decoding: dict, calibration: CountCalibration | None,
                 records=None, coverage: float | None = None, false_alarm: float | None = None) -> pd.DataFrame:
    """predicted_count, confidence, prob_<count>, count_set, uncertainty, record_p and record_check per row.

    Rows whose probabilities are NaN (unreadable photos) get -1 and empty fields. `records` holds each photo's
    recorded quantity (NaN where none is known); without a calibration (models logged before 0.2) the
    probabilities are used as they are and no count set or record check is made."""
    probs = np.asarray(probs, dtype=float)
    ok = ~np.isnan(probs).any(1)
    raw = np.nan_to_num(probs, nan=1.0 / len(classes))
    calibrated = calibration.probabilities(raw) if calibration else raw
    counts = decode(calibrated, classes, **decoding)
    chosen = calibrated[np.arange(len(calibrated)), np.searchsorted(classes, counts)]
    frame = pd.DataFrame({
        "predicted_count": np.where(ok, counts, -1).astype("int64"),
        "confidence": np.where(ok, chosen, np.nan),  # the (calibrated) probability of the count returned
    })
    for j, count in enumerate(classes):
        frame[f"prob_{count}"] = np.where(ok, calibrated[:, j], np.nan)
    frame["uncertainty"] = np.where(ok, entropy(calibrated), np.nan)
    if calibration is None:
        frame["count_set"] = ""
        frame["record_p"] = np.nan
        frame["record_check"] = ""
        return frame
    frame["count_set"] = np.where(ok, count_set_text(calibration.count_sets(calibrated, coverage), classes), "")
    alarm = calibration.false_alarm if false_alarm is None else false_alarm
    frame["record_p"], frame["record_check"] = record_checks(calibration.record_p_values(calibrated), ok, classes,
                                                             records, alarm)
    return frame


def record_checks(p_values: np.ndarray, ok: np.ndarray, classes: list[int], records,
                  false_alarm: float) -> tuple[np.ndarray, list[str]]:
    """The conformal p-value of each recorded quantity and its verdict: suspect below `false_alarm`, consistent
    otherwise, outside for a record the model cannot judge (0, or above its top count), empty without one."""
    n = len(p_values)
    record_p = np.full(n, np.nan)
    verdicts = [""] * n
    if records is None:
        return record_p, verdicts
    records = pd.to_numeric(pd.Series(records).reset_index(drop=True), errors="coerce").to_numpy(dtype=float)
    index = {count: j for j, count in enumerate(classes)}
    for i, record in enumerate(records):
        if np.isnan(record) or not ok[i]:
            continue
        j = index.get(int(record)) if float(record).is_integer() else None
        if j is None:
            verdicts[i] = OUTSIDE
            continue
        record_p[i] = p_values[i, j]
        verdicts[i] = SUSPECT if record_p[i] < false_alarm else CONSISTENT
    return record_p, verdicts
