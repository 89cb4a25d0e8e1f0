"""Do the four test-time views earn their 4x inference cost? The 5-fold x 2 protocol of crossval on the dev sample,
default recipe (lite0, 320 px, balanced logistic head, ordinal decoding), from the same cached features:
  4 views: the head fitted on all 4 flips/transposes of each training image, test probabilities averaged over 4;
  1 view:  fitted on the plain view only, tested on the plain view only (what a model without --tta serves).

    python experiments/studies/inference/tta_crossval.py
needs .cache/explore/efficientnet-lite0-320.npz from experiments/studies/head_study/features.py.
"""
import time

import numpy as np
import torch
from sklearn.model_selection import RepeatedStratifiedKFold

from bin_counter.config import TrainConfig
from bin_counter.core.heads import fit_logistic
from bin_counter.core.metrics import decode

CLASSES = [1, 2, 3, 4, 5]
cfg = TrainConfig()
saved = np.load(".cache/explore/efficientnet-lite0-320.npz", allow_pickle=True)
x = torch.tensor(saved["X"].astype(np.float32))
y = torch.tensor(saved["y"] - 1)
splits = RepeatedStratifiedKFold(n_splits=5, n_repeats=2, random_state=1).split(x[:, 0], y)
rows = {"4 views": [], "1 view": []}
start = time.time()
for k, (train_idx, test_idx) in enumerate(splits):
    truth = y[test_idx].numpy() + 1
    for name, views in (("4 views", slice(None)), ("1 view", slice(0, 1))):
        head = fit_logistic(x[train_idx][:, views], y[train_idx], 5, balance=cfg.balance)
        counts = decode(head.probabilities(x[test_idx][:, views]), CLASSES, **cfg.decoding)
        recall = [float((counts[truth == c] == c).mean()) for c in CLASSES]
        rows[name].append(((counts == truth).mean(), np.abs(counts - truth).mean(), min(recall)))
    print(f"fold {k}: 4 views {rows['4 views'][-1][0]:.3f}, 1 view {rows['1 view'][-1][0]:.3f}", flush=True)
for name, values in rows.items():
    r = np.array(values)
    print(f"{name}: accuracy {r[:, 0].mean():.3f} ± {r[:, 0].std():.3f}, MAE {r[:, 1].mean():.3f}, "
          f"lowest per-count recall {r[:, 2].mean():.2f}")
gap = 100 * (np.array(rows["4 views"])[:, 0] - np.array(rows["1 view"])[:, 0])
print(f"4 views - 1 view: {gap.mean():+.1f} points of accuracy (paired folds ± {gap.std():.1f}), "
      f"{time.time() - start:.0f} s")
