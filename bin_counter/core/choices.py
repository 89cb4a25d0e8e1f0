"""The choices made by name, one table each: the heads and the losses, the splits, the inference engines.

`TrainConfig.validate` checks a name against these tables and `train` dispatches on them, so a new head or loss
is one entry here plus the function it names. No torch here: the CLI reads the tables when it builds its parser.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadSpec:
    fit: str  # the function of core.training that fits it
    profiled_fit: str  # the same under the profiler (core.training)
    # solved on frozen features in one go (no epochs, batches or random training views), not trained by SGD: it
    # cannot fine-tune the backbone or read a shard stream, and the SGD-only settings do not apply to it
    solved: bool


HEADS: dict[str, HeadSpec] = {
    "logistic": HeadSpec("solve_head", "profiled_solve", solved=True),  # core/heads.py
    "sgd": HeadSpec("fit", "profiled_fit", solved=False),  # the study's head, trained by AdamW
}


@dataclass(frozen=True)
class LossSpec:
    expected_term: bool  # adds expected_weight * |expected count - true count| to the cross-entropy


LOSSES: dict[str, LossSpec] = {
    "ce": LossSpec(expected_term=False),  # the study's
    "ce+expected": LossSpec(expected_term=True),
}

SPLITS = ("train", "val", "test")  # a manifest's splits, in prepare's order
ENGINES = ("onnx", "torch")  # what runs a logged model's forward pass (BIN_COUNTER_ENGINE)
