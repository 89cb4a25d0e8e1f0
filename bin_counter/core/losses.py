"""The SGD head's training loss, chosen by name (core.choices.LOSSES)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from bin_counter.core import heads
from bin_counter.core.choices import LOSSES

if TYPE_CHECKING:
    from bin_counter.config import TrainConfig


class CountingLoss(nn.Module):
    """Cross-entropy (class-weighted with `balance`), plus, with `expected_weight`, the distance between the
    expected count under the predicted distribution and the true count: counts are ordered, and being off by
    one should cost less than being off by four."""

    def __init__(self, classes: list[int], class_weights: torch.Tensor | None = None, expected_weight: float = 0.0):
        super().__init__()
        self.register_buffer("values", torch.tensor(classes, dtype=torch.float32))
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)
        self.expected_weight = expected_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, labels, weight=self.class_weights)
        if self.expected_weight:
            expected = logits.float().softmax(1) @ self.values
            loss = loss + self.expected_weight * (expected - self.values[labels]).abs().mean()
        return loss


def make_criterion(cfg: TrainConfig, classes: list[int], train_counts) -> CountingLoss:
    """`cfg.loss`, class-balanced over `train_counts` (the training labels, as counts) with `cfg.balance`."""
    weights = None
    if cfg.balance:
        labels = torch.tensor([classes.index(int(count)) for count in train_counts], dtype=torch.long)
        weights = heads.class_weights(labels, len(classes))
    return CountingLoss(classes, weights, cfg.expected_weight if LOSSES[cfg.loss].expected_term else 0.0)
