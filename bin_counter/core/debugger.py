"""Debugger rules, in the spirit of SageMaker Debugger's built-in rules, evaluated on values training already
computes (per-epoch losses, classifier gradient norms, the training labels). Each finding names the rule, the
epoch it fired at and the number that triggered it, and is logged as an MLflow tag `debugger.<rule>`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Finding:
    rule: str
    epoch: int
    message: str

    def as_tag(self) -> tuple[str, str]:
        return f"debugger.{self.rule}", f"epoch {self.epoch}: {self.message}"


@dataclass
class Thresholds:
    patience: int = 3  # epochs over which the training loss must improve
    min_improvement: float = 0.01  # relative
    overfit_epochs: int = 2  # consecutive epochs of validation loss up while training loss goes down
    vanishing: float = 1e-7  # classifier gradient norm
    exploding: float = 1e3
    imbalance_ratio: float = 3.0  # largest / smallest class in the training split


@dataclass
class Rules:
    thresholds: Thresholds = field(default_factory=Thresholds)
    findings: list[Finding] = field(default_factory=list)

    def _fire(self, rule: str, epoch: int, message: str) -> Finding | None:
        if any(f.rule == rule for f in self.findings):  # report each rule once, where it first fired
            return None
        finding = Finding(rule, epoch, message)
        self.findings.append(finding)
        return finding

    def check_labels(self, labels, classes: list[int]) -> list[Finding]:
        """Class balance of the training split; a class with no image at all counts as zero."""
        counts = Counter({c: 0 for c in classes})
        counts.update(int(label) for label in labels)
        out = []
        if counts and max(counts.values()) / max(min(counts.values()), 1) > self.thresholds.imbalance_ratio:
            common, rare = counts.most_common()[0], counts.most_common()[-1]
            found = self._fire("class_imbalance", 0, f"count {common[0]}: {common[1]} training images, count "
                               f"{rare[0]}: {rare[1]} (ratio > {self.thresholds.imbalance_ratio:g}); "
                               "rebalance or weight the loss")
            out.append(found) if found else None
        return [f for f in out if f]

    def check_epoch(self, history: list[dict]) -> list[Finding]:
        """history: one dict per epoch so far, with train_loss, val_loss and grad_norm (and grad_norm_max)."""
        t = self.thresholds
        row, epoch, out = history[-1], history[-1]["epoch"], []
        if not all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")):
            out.append(self._fire("nan_loss", epoch, f"loss is {row['train_loss']} (train) / {row['val_loss']} "
                                  "(validation); lower the learning rate"))
        grad = row.get("grad_norm_max", row["grad_norm"])
        if math.isfinite(grad) and grad > t.exploding:
            out.append(self._fire("exploding_gradients", epoch, f"classifier gradient norm {grad:.3g} > "
                                  f"{t.exploding:g}; lower the learning rate or clip gradients"))
        if row["grad_norm"] < t.vanishing:
            out.append(self._fire("vanishing_gradients", epoch, f"classifier gradient norm {row['grad_norm']:.3g} < "
                                  f"{t.vanishing:g}; the classifier has stopped learning"))
        if len(history) > t.patience:
            before, now = history[-1 - t.patience]["train_loss"], row["train_loss"]
            if math.isfinite(before) and now > before * (1 - t.min_improvement):
                out.append(self._fire("loss_not_decreasing", epoch, f"training loss {before:.4f} -> {now:.4f} over "
                                      f"{t.patience} epochs; raise the learning rate or check the labels"))
        if len(history) > t.overfit_epochs:
            window = history[-1 - t.overfit_epochs:]
            val_up = all(b["val_loss"] > a["val_loss"] for a, b in zip(window, window[1:]))
            train_down = all(b["train_loss"] < a["train_loss"] for a, b in zip(window, window[1:]))
            if val_up and train_down:
                out.append(self._fire("overfitting", epoch, f"validation loss rose {window[0]['val_loss']:.4f} -> "
                                      f"{row['val_loss']:.4f} while training loss fell; more data, augmentation or "
                                      "fewer epochs"))
        return [f for f in out if f]
