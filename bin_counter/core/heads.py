"""Heads fitted on frozen features: a convex problem solved to its optimum, not trained by SGD.

With the backbone frozen, the study's classifier (BatchNorm -> Dropout -> Linear) is at inference an affine map
of the pooled features. The best such map under cross-entropy with an L2 penalty is a multinomial logistic
regression, a convex problem that full-batch L-BFGS solves exactly in seconds. Its strength is chosen by
stratified cross-validation over images (all views of one image stay in one fold), and the result is written
back into the study's head (BatchNorm holds the standardisation, Linear the coefficients), so the served model,
its test-time views and the registry do not change.

The objective is scikit-learn's `LogisticRegression(C=c)`: C * sum_i w_i * CE_i + ||W||^2 / 2, intercept free.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

log = logging.getLogger(__name__)

C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
DEFAULT_C = 3e-4  # what the CV chose on almost every fold of the dev sample (experiments/studies/head_study)


@dataclass(frozen=True)
class Standardizer:
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardizer:
        flat = features.reshape(-1, features.shape[-1]).double()
        return cls(flat.mean(0).float(), flat.std(0).clamp_min(1e-6).float())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std


def fit_multinomial(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float,
                    sample_weight: torch.Tensor | None = None,
                    init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (K, D) and bias (K,) minimising C * sum_i w_i CE_i + ||W||^2 / 2 (full batch, float32)."""
    x, y = x.float(), y.long()
    n, d = x.shape
    weight = torch.zeros(num_classes, d) if init is None else init[0].float().clone()
    bias = torch.zeros(num_classes) if init is None else init[1].float().clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    w = torch.ones(n) if sample_weight is None else sample_weight.float()
    # dividing the objective by C * n keeps its scale near 1 whatever C and n, so L-BFGS's tolerances mean the same
    scale = 1.0 / (c * n)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=1000, history_size=20, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        ce = nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="none")
        loss = scale * (c * (w * ce).sum() + 0.5 * (weight * weight).sum())
        loss.backward()
        return loss

    with single_thread():
        optimizer.step(objective)
    return weight.detach(), bias.detach()


@contextmanager
def single_thread():
    """A (n x D) @ (D x K) product with K = 5 gains nothing from threads, and on a busy 2-core machine a second
    thread made each step 15x slower (6 ms vs 88 ms measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def view_probabilities(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """(N, V, D) standardised features -> (N, K) probabilities averaged over each image's views (as served)."""
    return torch.softmax(x @ weight.T + bias, -1).mean(1).numpy()


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, one weight per class, scaled so that their mean over the samples is 1: every
    count weighs the same in the loss."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    return len(labels) / (num_classes * counts)


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each sample's class weight (class_weights)."""
    return class_weights(labels, num_classes)[labels]


@dataclass
class LogisticFit:
    scaler: Standardizer
    weight: torch.Tensor  # (K, D), on standardised features
    bias: torch.Tensor  # (K,)
    c: float
    cv_log_loss: dict[float, float] = field(default_factory=dict)
    oof_probs: np.ndarray | None = None  # out-of-fold probabilities of the chosen C, one row per image
    refit_c: float | None = None  # the strength the final head is solved with (c scaled to all the images)

    def probabilities(self, features: torch.Tensor) -> np.ndarray:
        return view_probabilities(self.scaler(features), self.weight, self.bias)

    def write_into(self, head: nn.Sequential) -> None:
        """Into the study's head (BatchNorm1d, Dropout, Linear) in eval mode: BatchNorm standardises exactly."""
        norm, linear = head[0], head[-1]
        with torch.no_grad():
            norm.running_mean.copy_(self.scaler.mean)
            norm.running_var.copy_(self.scaler.std ** 2)
            norm.weight.copy_(torch.sqrt(self.scaler.std ** 2 + norm.eps) / self.scaler.std)
            norm.bias.zero_()
            linear.weight.copy_(self.weight)
            linear.bias.copy_(self.bias)
        head.eval()


def _fit_views(features: torch.Tensor, labels: torch.Tensor, num_classes: int, c: float, balance: bool, init=None):
    """Every view of every image is a training sample with the image's label."""
    n, v, d = features.shape
    y = labels.repeat_interleave(v)
    weights = balanced_weights(y, num_classes) if balance else None
    return fit_multinomial(features.reshape(n * v, d), y, num_classes, c, weights, init)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) image indices of a stratified k-fold, k capped by the rarest count (each fold needs one
    of each); empty when a count has a single image. The same labels and seed give the same folds: tune scores
    every trial on these."""
    present = torch.bincount(labels.long())
    folds = min(folds, int(present[present > 0].min()))
    if folds < 2:
        return []
    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)),
                                                                                      labels.numpy()))


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, c_grid=C_GRID,
                 folds: int = 5, balance: bool = False, seed: int = 0, splits=None) -> LogisticFit:
    """Choose C by stratified k-fold over images (lowest held-out log-loss), then refit on all images.

    `features` is (N, V, D): V views per image (test-time views), all used for fitting and averaged to predict.
    `splits` (from stratified_folds) replaces the folds that `folds` and `seed` would make."""
    labels = labels.long()
    scaler = Standardizer.fit(features)
    x = scaler(features)
    splits = stratified_folds(labels, folds, seed) if splits is None else splits
    if not splits:
        log.warning("logistic head: a count has a single image, so C cannot be cross-validated; using C=%g "
                    "(validation metrics are in-sample)", DEFAULT_C)
        weight, bias = _fit_views(x, labels, num_classes, DEFAULT_C, balance)
        return LogisticFit(scaler, weight, bias, DEFAULT_C, {}, view_probabilities(x, weight, bias))
    oof = {c: np.zeros((len(labels), num_classes)) for c in c_grid}
    for train_idx, held_idx in splits:
        # the fold's own standardisation, so held-out images never shape the features they are scored on
        fold_scaler = Standardizer.fit(features[train_idx])
        xf, xh = fold_scaler(features[train_idx]), fold_scaler(features[held_idx])
        init = None
        for c in sorted(c_grid):  # warm start along the path: each C starts from the previous optimum
            init = _fit_views(xf, labels[train_idx], num_classes, c, balance, init)
            oof[c][held_idx] = view_probabilities(xh, *init)
    scores = {c: log_loss(oof[c], labels.numpy()) for c in c_grid}
    best = min(scores, key=scores.get)
    log.info("logistic head: C=%g chosen by %d-fold CV (held-out log-loss %s)", best, len(splits),
             ", ".join(f"{c:g}: {s:.4f}" for c, s in scores.items()))
    # The folds' heads saw a share of the images; at the same C the head refitted on all of them weighs its data
    # more against the penalty and comes out sharper than the out-of-fold probabilities it is calibrated on
    # (over-confident by 3 points of top-label ECE on the dev folds). The same data-to-penalty ratio keeps the
    # out-of-fold probabilities a faithful preview of the served ones.
    share = float(np.mean([len(train_idx) for train_idx, _ in splits])) / len(labels)
    weight, bias = _fit_views(x, labels, num_classes, best * share, balance)
    return LogisticFit(scaler, weight, bias, best, scores, oof[best], refit_c=best * share)
