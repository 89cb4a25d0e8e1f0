"""The debugger rules on crafted epoch histories: each fires on the number that should trigger it, stays quiet just
on the other side of its threshold, and reports once, at the epoch it first fired (no training needed)."""
import math

import pytest

from bin_counter.core.debugger import Finding, Rules, Thresholds


def epochs(train_losses, val_losses=None, grad=0.5, **extra) -> list[dict]:
    val_losses = val_losses or [1.5] * len(train_losses)
    return [{"epoch": i + 1, "train_loss": t, "val_loss": v, "grad_norm": grad, **extra}
            for i, (t, v) in enumerate(zip(train_losses, val_losses))]


def fired(rules: Rules, history: list[dict]) -> dict[str, Finding]:
    """Feed the history epoch by epoch, as fit() does; the findings by rule."""
    out = {}
    for i in range(1, len(history) + 1):
        out.update({f.rule: f for f in rules.check_epoch(history[:i])})
    return out


def test_a_healthy_history_and_balanced_labels_fire_nothing():
    rules = Rules()
    healthy = epochs([1.6 - 0.1 * e for e in range(6)], [1.6 - 0.05 * e for e in range(6)])
    assert fired(rules, healthy) == {} and rules.check_labels([1, 1, 2, 2, 3], [1, 2, 3]) == []
    assert rules.findings == []


@pytest.mark.parametrize("train, val", [(math.nan, 1.0), (1.0, math.inf), (-math.inf, 1.0)])
def test_nan_or_inf_loss_fires_at_its_epoch(train, val):
    history = epochs([1.5, 1.4, train], [1.5, 1.4, val])
    finding = fired(Rules(), history)["nan_loss"]
    assert finding.epoch == 3 and "lower the learning rate" in finding.message


def test_exploding_gradients_read_the_largest_step_norm_against_the_threshold():
    assert "exploding_gradients" not in fired(Rules(), epochs([1.5, 1.4], grad=0.5, grad_norm_max=1e3))
    finding = fired(Rules(), epochs([1.5, 1.4], grad=0.5, grad_norm_max=1001.0))["exploding_gradients"]
    assert finding.epoch == 1 and "1e+03" in finding.message
    # without a per-step maximum the epoch's mean norm is used; a NaN norm is the nan rule's business, not this one
    assert fired(Rules(), epochs([1.5], grad=5e3))["exploding_gradients"].epoch == 1
    assert "exploding_gradients" not in fired(Rules(), epochs([1.5], grad=math.nan))


def test_vanishing_gradients_below_the_threshold_only():
    assert "vanishing_gradients" not in fired(Rules(), epochs([1.5, 1.4], grad=1e-7))
    finding = fired(Rules(), epochs([1.5, 1.4], grad=1e-8))["vanishing_gradients"]
    assert finding.epoch == 1 and "stopped learning" in finding.message


def test_loss_not_decreasing_needs_patience_epochs_and_a_relative_gain():
    # three epochs of history are not yet enough to judge a patience of 3
    assert "loss_not_decreasing" not in fired(Rules(), epochs([1.0, 1.0, 1.0]))
    flat = fired(Rules(), epochs([1.0, 1.0, 1.0, 0.995]))["loss_not_decreasing"]  # 0.5% < 1% over 3 epochs
    assert flat.epoch == 4 and "1.0000 -> 0.9950 over 3 epochs" in flat.message
    assert "loss_not_decreasing" not in fired(Rules(), epochs([1.0, 1.0, 1.0, 0.98]))  # 2% is progress
    # the window slides: a late plateau fires at the epoch that completes it
    late = fired(Rules(), epochs([2.0, 1.5, 1.0, 0.8, 0.8, 0.8, 0.8]))["loss_not_decreasing"]
    assert late.epoch == 7
    assert fired(Rules(Thresholds(patience=1)), epochs([1.0, 1.0]))["loss_not_decreasing"].epoch == 2


def test_overfitting_needs_validation_up_and_training_down_for_consecutive_epochs():
    overfit = fired(Rules(), epochs([1.5, 1.2, 1.0, 0.8], [1.0, 1.1, 1.2, 1.3]))["overfitting"]
    assert overfit.epoch == 3 and "1.0000 -> 1.2000" in overfit.message
    # one epoch of rising validation loss is noise; both losses rising is not overfitting
    assert "overfitting" not in fired(Rules(), epochs([1.5, 1.2, 1.0, 0.8], [1.0, 1.1, 1.05, 1.1]))
    assert "overfitting" not in fired(Rules(), epochs([1.0, 1.1, 1.2], [1.0, 1.1, 1.2]))


def test_class_imbalance_ratio_and_missing_classes():
    assert Rules().check_labels([1] * 6 + [2] * 2, [1, 2]) == []  # ratio 3 is allowed
    (finding,) = Rules().check_labels([1] * 7 + [2] * 2, [1, 2])  # 3.5 is not
    assert finding.rule == "class_imbalance" and finding.message.startswith("count 1: 7 training images, count 2: 2")
    (missing,) = Rules().check_labels([1] * 4 + [2] * 2, [1, 2, 3])  # a class with no image counts as zero
    assert "count 3: 0 " in missing.message
    assert Rules(Thresholds(imbalance_ratio=10)).check_labels([1] * 7 + [2] * 2, [1, 2]) == []


def test_each_rule_is_reported_once_where_it_first_fired_and_becomes_a_tag():
    rules = Rules()
    history = epochs([1.5, 1.4, 1.3], grad=1e-9)
    first = rules.check_epoch(history[:1])
    assert [f.rule for f in first] == ["vanishing_gradients"]
    assert rules.check_epoch(history[:2]) == [] and rules.check_epoch(history) == []
    assert [(f.rule, f.epoch) for f in rules.findings] == [("vanishing_gradients", 1)]
    key, value = first[0].as_tag()
    assert key == "debugger.vanishing_gradients" and value.startswith("epoch 1: classifier gradient norm 1e-09")
