"""Counts you can act on: calibrated probabilities, conformal count sets and a check of recorded quantities.

All three are fitted once, at training time, on held-out probabilities (out of fold for the solved head, the
validation split for an SGD head), and stored in the model as plain numbers, so every engine and the served model
apply them with numpy alone.

- Temperature scaling of the log of the view-averaged probabilities: one number, chosen by held-out log-loss; a
  monotone map, so the most likely count never changes.
- Split-conformal count sets with the LAC score s(x, y) = 1 - p(y | x) (Sadinle et al. 2019), of the conformal
  scores the one with the smallest sets on average: the set at `coverage` is every count whose p-value exceeds
  1 - coverage, where the p-value of count y is (1 + #{held-out scores >= s(x, y)}) / (n + 1).
- The record check: the conformal p-value of the recorded count under the ordinal score r(x, y) = sum_j p(j | x)
  |j - y|, the expected distance between the record and the count in the photo. It is uniform on correct records
  (exchangeability), so calling a record suspect below `false_alarm` questions that share of the correct ones;
  being ordinal, it doubts a record two counts off more than one a count off. On the dev folds it caught 36% of
  records off by two or more at 5% false alarms, against 32% for the LAC score's p-value
  (experiments/studies/calibration_crossval).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

# ECE bins: 15 equal-width bins of confidence, as in Guo et al. 2017 ("On calibration of modern neural networks")
ECE_BINS = 15


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens over-confident probabilities, T < 1 sharpens timid ones."""
    logits = np.log(np.clip(np.asarray(probs, dtype=float), 1e-12, None)) / temperature
    logits -= logits.max(1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature of least held-out log-loss (a convex problem in 1/T, solved on a bounded interval)."""
    found = minimize_scalar(lambda t: negative_log_likelihood(with_temperature(probs, t), labels),
                            bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-4})
    return float(found.x)


@dataclass(frozen=True)
class CountCalibration:
    """Fitted on held-out (probabilities, class index) pairs; `fit` returns it, the model stores `as_dict()`."""

    temperature: float = 1.0
    scores: tuple[float, ...] = ()  # sorted LAC scores 1 - p(true count) of the held-out images, calibrated
    record_scores: tuple[float, ...] = ()  # sorted expected distances of the held-out images' true counts
    coverage: float = 0.9  # the count sets' default coverage
    false_alarm: float = 0.05  # the record check's default share of correct records questioned

    @classmethod
    def fit(cls, probs: np.ndarray, labels: np.ndarray, coverage: float = 0.9,
            false_alarm: float = 0.05) -> CountCalibration:
        probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int)
        temperature = fit_temperature(probs, labels)
        calibrated = with_temperature(probs, temperature)
        rows = np.arange(len(labels))
        scores = np.sort(1.0 - calibrated[rows, labels])
        record_scores = np.sort(expected_distance(calibrated)[rows, labels])
        return cls(temperature, rounded(scores), rounded(record_scores), coverage, false_alarm)

    @classmethod
    def from_dict(cls, doc: dict | None) -> CountCalibration | None:
        """What a model's config.json holds; None for a model logged before calibration."""
        if not doc:
            return None
        return cls(float(doc["temperature"]), tuple(doc["scores"]), tuple(doc["record_scores"]),
                   float(doc["coverage"]), float(doc["false_alarm"]))

    def as_dict(self) -> dict:
        return {**asdict(self), "scores": list(self.scores), "record_scores": list(self.record_scores),
                "method": "temperature; split-conformal sets (LAC); record check (expected distance)"}

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        return with_temperature(probs, self.temperature)

    def p_values(self, calibrated: np.ndarray) -> np.ndarray:
        """(N, K): the LAC p-value of every count for every photo (the count sets), from calibrated probabilities."""
        return conformal_p_values(self.scores, 1.0 - np.asarray(calibrated, dtype=float))

    def record_p_values(self, calibrated: np.ndarray) -> np.ndarray:
        """(N, K): the p-value of every count as a record of every photo (the record check)."""
        return conformal_p_values(self.record_scores, expected_distance(calibrated))

    def count_sets(self, calibrated: np.ndarray, coverage: float | None = None) -> np.ndarray:
        """(N, K) boolean: the counts that hold the true count with probability >= coverage. Never empty: a set
        that no count qualifies for holds the most likely count (only raising coverage)."""
        alpha = 1.0 - (self.coverage if coverage is None else coverage)
        members = self.p_values(calibrated) > alpha
        empty = ~members.any(1)
        members[empty, np.asarray(calibrated)[empty].argmax(1)] = True
        return members


def conformal_p_values(held: tuple[float, ...], scores: np.ndarray) -> np.ndarray:
    """(1 + #{held-out scores >= score}) / (n + 1) for every score; `held` is sorted."""
    held = np.asarray(held)
    at_least = len(held) - np.searchsorted(held, scores - 1e-9, side="left")
    return (1.0 + at_least) / (len(held) + 1.0)


def expected_distance(probs: np.ndarray) -> np.ndarray:
    """(N, K): for every count k, the expected number of counts between k and the count in the photo."""
    k = np.asarray(probs).shape[1]
    return np.asarray(probs, dtype=float) @ np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]).astype(float)


def rounded(values: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)


def count_set_text(members: np.ndarray, classes: list[int]) -> list[str]:
    """`2|3|4`: a set's counts ascending, joined by `|`."""
    values = np.asarray(classes)
    return ["|".join(str(v) for v in values[row]) for row in members]


def entropy(probs: np.ndarray) -> np.ndarray:
    """How unsure a distribution is, in nats; on the dev folds it ranks wrong answers above right ones better than
    the answered count's own probability (experiments/studies/calibration_crossval), so it spends the manual-check
    budget."""
    p = np.clip(np.asarray(probs, dtype=float), 1e-12, 1.0)
    return -(p * np.log(p)).sum(1)


# ---- how well calibrated: what `evaluate` and `crossval` report ---------------------------------------------


def top_label_ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the most likely count: |accuracy - confidence| averaged over confidence
    bins, weighted by the bins' shares."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int)
    return binned_gap(probs.max(1), probs.argmax(1) == labels, bins)


def classwise_ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """The mean over counts of each count's own calibration error (Kull et al. 2019)."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int)
    return float(np.mean([binned_gap(probs[:, k], labels == k, bins) for k in range(probs.shape[1])]))


def binned_gap(confidence: np.ndarray, hit: np.ndarray, bins: int) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap += inside.mean() * abs(hit[inside].mean() - confidence[inside].mean())
    return float(gap)


def reliability_table(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict]:
    """Per confidence bin: its images, their mean confidence and their accuracy (the reliability diagram)."""
    confidence = np.asarray(probs).max(1)
    hit = np.asarray(probs).argmax(1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return [{"bin_low": edges[b], "bin_high": edges[b + 1], "images": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()), "accuracy": float(hit[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def risk_coverage(correct: np.ndarray, uncertainty: np.ndarray, steps: int = 20) -> list[dict]:
    """Accuracy of the bins accepted without a check when the most uncertain are sent to people, against the
    share accepted: the curve that shows whether a ranking puts the wrong answers first."""
    order = np.argsort(uncertainty, kind="stable")  # most certain first
    right = np.asarray(correct, dtype=float)[order]
    rows = []
    for share in np.linspace(1.0 / steps, 1.0, steps):
        kept = max(1, int(round(share * len(right))))
        rows.append({"coverage": float(kept / len(right)), "accuracy": float(right[:kept].mean()), "accepted": kept})
    return rows


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared distance between the probabilities and the one-hot truth, summed over counts."""
    onehot = np.eye(probs.shape[1])[np.asarray(labels, dtype=int)]
    return float(((np.asarray(probs) - onehot) ** 2).sum(1).mean())


def probability_metrics(probs: np.ndarray, labels: np.ndarray, members: np.ndarray | None) -> dict:
    """Calibration (top-label and class-wise ECE, log-loss, Brier) and, with count sets, their coverage."""
    out = {"ece_top_label": top_label_ece(probs, labels), "ece_classwise": classwise_ece(probs, labels),
           "log_loss": negative_log_likelihood(probs, labels), "brier": brier_score(probs, labels)}
    if members is not None:
        covered = members[np.arange(len(labels)), labels]
        out.update({"set_coverage": float(covered.mean()), "set_size": float(members.sum(1).mean())})
    return out
